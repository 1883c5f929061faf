"""The GPU against this machine's CPU on the same work, both in this process (issue 22, goal 5):
training epochs of each method at its defaults, PGD, and DENT.

1. Training: `train.train_epoch` (the loop `pixgen train` runs, under its deterministic-kernel
   switch) over TRAIN_BATCHES batches of wk-small at the method's default batch size, in its last
   epoch (past any ε ramp); on MNIST training digits. Dual runs pixgen.dual's Numba kernels on the
   CPU and its plain-torch path on the GPU.
2. PGD: 40 steps at ε 0.3 on 250 test digits labelled with the network's own predictions, so that
   every digit starts unbroken and stays in the batch (`compact=False`): the work does not depend
   on the (untrained) network.
3. DENT: 6 AdaMod steps and the prediction, batches of 128 test digits, BN and BN-free networks.

Prints `name: ours X, baseline Y, ratio R×` with ours on the GPU and the baseline on the CPU with
torch's default threads (its cores). Each side's rate is the median of ROUNDS rounds that time
both in turn, a round repeating its work for at least MIN_ROUND seconds, so that a GPU round is
not a few milliseconds at idle clocks. A piece that fails prints its error and the others go on.
Without CUDA it prints one line saying so and exits 0, so `make bench` runs it anywhere;
`bench_gpu.py cpu` runs the GPU side on the CPU too (ratios ≈ 1), to check the script here.
Run from the repository root: `.venv/bin/python benchmarks/bench_gpu.py [device]`.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dual import line  # noqa: E402

from pixgen import attacks, data, methods, models, train  # noqa: E402
from pixgen.dent import DEFENSES, Dent  # noqa: E402

ROUNDS = 5
MIN_ROUND = 0.2  # seconds
METHODS = ("standard", "pgd", "dual", "ibp")
TRAIN_BATCHES = 4
PGD_DIGITS, PGD_EPS = 250, 0.3
CPU = torch.device("cpu")


def timed(device: torch.device, work, repeats: int = 1) -> float:
    """Seconds for `repeats` calls of work(), the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(name: str, make_work, count: int, devices: tuple[torch.device, torch.device]) -> bool:
    """make_work(device) -> a callable doing `count` images of work there. False if it failed."""
    try:
        works = [make_work(d) for d in devices]
        repeats = [math.ceil(MIN_ROUND / timed(d, w)) for d, w in zip(devices, works)]  # the first call warms up
        rates = [[], []]
        for _ in range(ROUNDS):
            for side, (device, work) in enumerate(zip(devices, works)):
                rates[side].append(repeats[side] * count / timed(device, work, repeats[side]))
        line(name, statistics.median(rates[0]), statistics.median(rates[1]), " img/s")
        return True
    except Exception:
        print(f"{name}: failed", flush=True)
        traceback.print_exc()
        return False


def training_work(method: str, x: torch.Tensor, y: torch.Tensor):
    config = methods.TrainConfig(method=method)
    count = config.batch_size * TRAIN_BATCHES

    def make(device: torch.device):
        torch.manual_seed(0)
        model = models.build(config.arch).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        xs, ys = x[:count].to(device), y[:count].to(device)
        batches = [(xs[s : s + config.batch_size], ys[s : s + config.batch_size]) for s in range(0, count, config.batch_size)]

        def work():
            with models.deterministic(device):
                train.train_epoch(model, optimizer, batches, config, config.epochs - 1, TRAIN_BATCHES)

        return work

    return make, count


def pgd_work(x: torch.Tensor):
    def make(device: torch.device):
        torch.manual_seed(0)
        model = models.build("wk-small").to(device).eval()
        attack = attacks.build("pgd", model, PGD_EPS, compact=False)
        xs = x[:PGD_DIGITS].to(device)
        with torch.no_grad():
            ys = model(xs).argmax(1)
        return lambda: attack(xs, ys)

    return make, PGD_DIGITS


def dent_work(arch: str, x: torch.Tensor):
    config = DEFENSES["dent"]

    def make(device: torch.device):
        torch.manual_seed(0)
        dent = Dent(models.build(arch).eval(), config).to(device)
        xs = x[: config.batch_size].to(device)

        def work():
            with torch.no_grad():
                dent(xs)

        return work

    return make, config.batch_size


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu: no CUDA device here; nothing measured (goal 5 needs a GPU machine: docs/benchmarks.md, 'On a GPU')")
        return
    devices = (device, CPU)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"gpu: ours on {label}, baseline on the CPU with {torch.get_num_threads()} torch threads", flush=True)

    images, labels = data.load("mnist", "train")
    largest = max(methods.TrainConfig(method=m).batch_size for m in METHODS) * TRAIN_BATCHES
    x, y = train.to_tensors(*(a[data.balanced_subset(labels, largest)] for a in (images, labels)), CPU)
    done = [compare(f"{method} training ({TRAIN_BATCHES} steps of wk-small at its defaults)", *training_work(method, x, y), devices) for method in METHODS]
    test_images, test_labels = data.load("mnist", "test")
    x, _ = train.to_tensors(*(a[data.balanced_subset(test_labels, PGD_DIGITS)] for a in (test_images, test_labels)), CPU)
    done.append(compare(f"pgd attack (40 steps, ε {PGD_EPS}, {PGD_DIGITS} digits)", *pgd_work(x), devices))
    for arch in ("wk-small", "wk-small-bn"):
        done.append(compare(f"dent {arch} (6 steps, batch {DEFENSES['dent'].batch_size})", *dent_work(arch, x), devices))
    if not all(done):
        sys.exit(f"gpu: {done.count(False)} of {len(done)} measurements failed (above)")


if __name__ == "__main__":
    main()
