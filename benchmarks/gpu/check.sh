#!/usr/bin/env bash
# Issue 22, goal 5, on a lent GPU machine, as one prepared run (docs/benchmarks.md, "On a GPU"):
# the GPU against the CPU (bench_gpu.py), `pixgen run pipelines/smoke.yaml` on the GPU, then
# make bench's CPU benchmarks (with CUDA hidden) for as long as the deadline leaves. Logs go to
# $OUT.
#
# Here, once: `.venv/bin/python benchmarks/gpu/prepare.py` (builds .gpu/). Then through the device
# tool: run(command="bash benchmarks/gpu/check.sh", carry=[".gpu"], timeout_s=360).
# The machine's image has torch but not zarr, dask or the attack libraries, and reaches no
# registry: they come as wheels in .gpu/. DEADLINE (seconds, default 330) bounds the whole
# script, so that a second try, run at once on the still-warm machine, can fit in the device
# tool's 15 minutes (its start, a minute or more, counts too).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/pixgen-gpu-out}
WORK=${WORK:-/tmp/pixgen-gpu}
DEADLINE=$(( $(date +%s) + ${DEADLINE:-330} ))
# seconds left before the deadline, at most $1 if given (timeout 0 would mean none)
left() { local s=$(( DEADLINE - $(date +%s) )); s=$(( s < ${1:-s} ? s : ${1:-s} )); echo $(( s > 1 ? s : 1 )); }
rm -rf "$WORK"  # a second try on the same machine must not find the first one's cached stages
mkdir -p "$OUT"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .gpu/wheels/*.whl || { echo "check: installing .gpu/wheels failed (run benchmarks/gpu/prepare.py here first)"; exit 1; }
export PYTHONPATH="$WORK/site:$PWD" PYTHONUNBUFFERED=1 PIXGEN_DATA_ROOT="$WORK/data"
ls .gpu/data/*/raw/*.gz > /dev/null || { echo "check: no data in .gpu/data (run benchmarks/gpu/prepare.py here first)"; exit 1; }
for f in .gpu/data/*/raw/*.gz; do
    raw="$WORK/data/${f#.gpu/data/}"
    mkdir -p "$(dirname "$raw")" && gunzip -c "$f" > "${raw%.gz}"
done

{
    nvidia-smi -L 2>&1
    "$PY" benchmarks/machine.py
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/machine.txt"

timeout -k 10 "$(left 150)" "$PY" benchmarks/bench_gpu.py > "$OUT/bench_gpu.txt" 2>&1
bench=$?
cat "$OUT/bench_gpu.txt"

start=$(date +%s)
threads=$(( $(nproc) / 4 > 1 ? $(nproc) / 4 : 1 ))  # the cores shared by the 4 stages at a time
OMP_NUM_THREADS=$threads timeout -k 10 "$(left)" "$PY" -m pixgen run pipelines/smoke.yaml --root "$WORK/smoke" --jobs 4 > "$OUT/smoke.txt" 2>&1
smoke=$?
echo "smoke: exit $smoke after $(( $(date +%s) - start )) s (pipelines/smoke.yaml, 4 stages at a time, OMP_NUM_THREADS=$threads; the log: smoke.txt)" | tee -a "$OUT/smoke.txt"

for f in benchmarks/bench_*.py; do
    [ "$f" != benchmarks/bench_gpu.py ] || continue
    [ "$(left)" -gt 20 ] || { echo "cpu benches: no time left for $f and after" >> "$OUT/bench_cpu.txt"; break; }
    echo "== $f" >> "$OUT/bench_cpu.txt"
    CUDA_VISIBLE_DEVICES= timeout -k 10 "$(left)" "$PY" "$f" >> "$OUT/bench_cpu.txt" 2>&1 || echo "$f: exit $? (a timeout is 124)" >> "$OUT/bench_cpu.txt"
done
cat "$OUT/bench_cpu.txt"
echo "check: bench_gpu.py exit $bench, smoke exit $smoke"
[ "$bench" = 0 ] && [ "$smoke" = 0 ]
