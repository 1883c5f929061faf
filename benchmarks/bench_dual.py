"""pixgen.dual against convex-adversarial 0.4.4 (`RobustBounds(bounded_input=True)`), both in this process
on 2 torch threads, in alternating rounds (the median round's figures) so that a busy machine
slows both alike.

1. Dual training: wk-small, batch 32, 10 projections, ε 0.1 (the method's defaults past the ramp):
   the bound, cross-entropy of it, backward and an Adam step, on MNIST training digits. Each side
   trains its own copy of one initialisation.
2. The exact bound (certification) on MNIST test digits in batches of 50 (bounds.dual_certified's), on
   the net that ours trained in 1 (a robust net has few unstable ReLUs; a random one has many).

Prints `name: ours X, baseline Y, ratio R×`. Run from the repository root:
`PYTHONPATH=. .venv/bin/python benchmarks/bench_dual.py [threads]` (threads: 2 unless given; on a
machine that other jobs keep busy, 2 spinning OpenMP threads can slow both sides several times over).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from pixgen import data, dual, heap, methods, models, train

BATCH, PROJECTIONS, EPS = 32, 10, 0.1
TRAIN_BATCHES = 8  # per side and round
CERTIFY_BATCH, CERTIFY_BATCHES = 50, 1
ROUNDS = 7


def ours(model, x, y, eps, projections=0):
    return dual.bounds(model, x, y, eps, projections)


def library(model, x, y, eps, projections=0):
    from convex_adversarial.dual_network import RobustBounds

    kwargs = {"proj": projections, "norm_type": "l1_median"} if projections else {"norm_type": "l1"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ReLU projection has no origin crossing")  # normal on a robust net
        return RobustBounds(model, eps, bounded_input=True, **kwargs)(x, y)


def train_steps(bound, model, optimizer, x, y) -> float:
    """Seconds for one step per batch."""
    start = time.perf_counter()
    for s in range(0, len(y), BATCH):
        loss = F.cross_entropy(bound(model, x[s : s + BATCH], y[s : s + BATCH], EPS, PROJECTIONS), y[s : s + BATCH])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def certify_time(bound, model, x, y) -> float:
    start = time.perf_counter()
    for s in range(0, len(y), CERTIFY_BATCH):
        bound(model, x[s : s + CERTIFY_BATCH], y[s : s + CERTIFY_BATCH], EPS)
    return time.perf_counter() - start


def line(name: str, ours: float, baseline: float, unit: str) -> None:
    print(f"{name}: ours {ours:.4g}{unit}, baseline {baseline:.4g}{unit}, ratio {ours / baseline:.2f}×", flush=True)


def alternate(time_side, sides, x, y, per_round: int) -> dict[str, float]:
    """Images per second per side: the median over rounds, each round timing every side in turn
    on the round's own images, so that a burst of load elsewhere costs one round, not a side."""
    rates = {name: [] for name in sides}
    for r in range(ROUNDS):
        xs, ys = x[r * per_round : (r + 1) * per_round], y[r * per_round : (r + 1) * per_round]
        for name in sides:
            rates[name].append(per_round / time_side(name, xs, ys))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    # As `pixgen train` runs both bounds: without it each side faults its freed memory back in,
    # page by page, the library more (exact bound 6.8–7.6×; with it 3.5×, though in about half the
    # runs the library still faults and gives 5–9×: docs/benchmarks.md, 2 December).
    heap.keep_freed_memory()
    warnings.filterwarnings("ignore", message="ReLU projection has no origin crossing")
    bounds = {"ours": ours, "library": library}

    images, labels = data.load("mnist", "train")
    subset = data.balanced_subset(labels, BATCH * TRAIN_BATCHES * ROUNDS)
    x, y = train.to_tensors(images[subset], labels[subset], torch.device("cpu"))
    torch.manual_seed(0)
    start = models.build("wk-small").train()
    sides = {name: copy.deepcopy(start) for name in bounds}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=methods.METHODS["dual"].defaults["lr"]) for name, m in sides.items()}
    for name in sides:  # load each side's kernels once
        train_steps(bounds[name], sides[name], optimizers[name], x[:BATCH], y[:BATCH])
    rates = alternate(lambda name, xs, ys: train_steps(bounds[name], sides[name], optimizers[name], xs, ys), sides, x, y, BATCH * TRAIN_BATCHES)
    line("dual training", rates["ours"], rates["library"], " img/s")

    test_images, test_labels = data.load("mnist", "test")
    subset = data.balanced_subset(test_labels, CERTIFY_BATCH * CERTIFY_BATCHES * ROUNDS)
    x, y = train.to_tensors(test_images[subset], test_labels[subset], torch.device("cpu"))
    model = sides["ours"].eval()
    rates = alternate(lambda name, xs, ys: certify_time(bounds[name], model, xs, ys), sides, x, y, CERTIFY_BATCH * CERTIFY_BATCHES)
    line("dual exact bound", rates["ours"], rates["library"], " img/s")


if __name__ == "__main__":
    main()
