"""DENT's cost per batch against static forward-and-backward passes.

`<defence> <arch>: ours X batch/s, baseline Y batch/s, ratio R×`, for each DENT defence
(pixgen.dent.DEFENSES: `dent` adapts the model, `dent-input` the model and the input; 6 AdaMod
steps, shot loss) on a batch of its 128 MNIST digits, against (steps + 1) forward-and-backward
passes of the static network on the same batch (the least any 6-step adaptation plus a
prediction can cost). Goal: ratio ≤ 1.5 on every architecture. A second figure, `before`, is the
same DENT with the image convolution's input gradient left to oneDNN (pixgen.dent.ImageConv
undone), the path before this round. Timed alternately in this process (best of REPEATS), so the
ratios survive a noisy machine. Networks are untrained (cost does not depend on the weights).
The attacks' and a whole evaluation's cost: benchmarks/bench_evaluate.py.
Run from the repository root: `.venv/bin/python benchmarks/bench_dent.py` (or `make bench`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pixgen import models
from pixgen.dent import DEFENSES, Dent, ImageConv

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
    before = Dent(model, config)
    before.model = nn.Sequential(*[m.conv if isinstance(m, ImageConv) else m for m in before.model])
    times = {"dent": [], "before": [], "static": []}
    with torch.no_grad():
        dent(x), before(x)  # warm-up
    for _ in range(REPEATS):
        for name, run in (("dent", dent), ("before", before)):
            start = time.perf_counter()
            with torch.no_grad():
                run(x)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        static_passes(model, x, config.steps + 1)
        times["static"].append(time.perf_counter() - start)
    ours, old, base = min(times["dent"]), min(times["before"]), min(times["static"])
    print(f"{defence} {arch}: ours {1 / ours:.2f} batch/s, baseline {1 / base:.2f} batch/s, ratio {ours / base:.2f}× "
          f"(before {old / base:.2f}×; batch {config.batch_size}, {config.steps} steps against {config.steps + 1} forward+backward; goal ≤ 1.5×)")


if __name__ == "__main__":
    for defence in DEFENSES:
        for arch in ("wk-small", "wk-small-bn", "madry-cnn"):
            dent_cost(defence, arch)
