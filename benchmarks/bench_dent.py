"""DENT's cost per batch against static forward-and-backward passes, then a whole `evaluate`.

1. `<defence> <arch>: ours X batch/s, baseline Y batch/s, ratio R×`, for each DENT defence
   (pixgen.dent.DEFENSES: `dent` adapts the model, `dent-input` the model and the input; 6 AdaMod
   steps, shot loss) on a batch of its 128 MNIST digits, against (steps + 1) forward-and-backward
   passes of the static network on the same batch (the least any 6-step adaptation plus a
   prediction can cost). Goal: ratio ≤ 1.5 on every architecture. Timed alternately in this
   process, so the ratio survives a noisy machine. Networks are untrained (cost does not depend
   on the weights).
2. `adaptive <attack> wk-small: X ms per digit`: each attack of pixgen.adaptive at its defaults,
   ε 0.1, on one DENT batch (`dent`, 128 digits; `eot_batches` on 32 digits, a pool of 128).
3. `evaluate`: the wall time of `pixgen evaluate` for one wk-small network, default suite
   (clean, FGSM 0…0.5 step 0.02, PGD-40 0…0.5 step 0.1, calibration, OOD, consistency; no
   MNIST-C, no DENT) on 200 test digits.
Run from the repository root: `.venv/bin/python benchmarks/bench_dent.py` (or `make bench`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from pixgen import adaptive, evaluate, models
from pixgen.dent import DEFENSES, Dent

REPEATS = 9


def static_passes(model, x, passes: int) -> None:
    x = x.clone().requires_grad_()
    for _ in range(passes):
        torch.autograd.grad(model(x).logsumexp(1).sum(), x)


def dent_cost(defence: str, arch: str) -> None:
    torch.manual_seed(0)
    model = models.build(arch).eval()
    config = DEFENSES[defence]
    x = torch.rand(config.batch_size, 1, 28, 28)
    dent = Dent(model, config)
    times = {"dent": [], "static": []}
    with torch.no_grad():
        dent(x)  # warm-up
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            dent(x)
        times["dent"].append(time.perf_counter() - start)
        start = time.perf_counter()
        static_passes(model, x, config.steps + 1)
        times["static"].append(time.perf_counter() - start)
    ours, base = min(times["dent"]), min(times["static"])
    print(f"{defence} {arch}: ours {1 / ours:.2f} batch/s, baseline {1 / base:.2f} batch/s, ratio {ours / base:.2f}× "
          f"(batch {config.batch_size}, {config.steps} steps against {config.steps + 1} forward+backward; goal ≤ 1.5×)")


def attack_cost() -> None:
    torch.manual_seed(0)
    dent = Dent(models.build("wk-small").eval(), DEFENSES["dent"])
    x, y = torch.rand(dent.config.batch_size, 1, 28, 28), torch.randint(0, 10, (dent.config.batch_size,))
    for name in ("transfer", "fixed_point", "adaptive_pgd", "eot_batches"):
        digits = 32 if name == "eot_batches" else len(x)
        params = {"pool": x} if name == "eot_batches" else {}
        start = time.perf_counter()
        getattr(adaptive, name)(dent, x[:digits], y[:digits], 0.1, 0, **params)
        print(f"adaptive {name} wk-small: {1000 * (time.perf_counter() - start) / digits:.1f} ms per digit ({digits} digits, defaults)")


def evaluate_time() -> None:
    config = evaluate.EvalConfig(suites=("clean", "calibration", "ood", "consistency"), test_size=200)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        folder = Path(tmp) / "wk-small"
        models.save(folder, models.build("wk-small"), {"arch": "wk-small", "method": "standard", "complete": True})
        start = time.perf_counter()
        evaluate.run(config, folder, Path(tmp) / "out.zarr")
        print(f"evaluate (wk-small, default suite, 200 digits, no DENT): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    for defence in DEFENSES:
        for arch in ("wk-small", "wk-small-bn", "madry-cnn"):
            dent_cost(defence, arch)
    attack_cost()
    evaluate_time()
