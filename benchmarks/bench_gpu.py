"""The GPU against this machine's CPU on the same work, both in this process (issue 22, goal 5):
training steps of each method at its defaults, PGD, and DENT.

1. Training: a step (the method's loss, backward, an Adam step) of wk-small at the method's
   default batch size and final ε (dual: 10 projections, by pixgen.dual's plain-torch path on
   the GPU), on MNIST training digits.
2. PGD: 40 steps at ε 0.3 on 250 test digits, no digit dropped once broken (`compact=False`), so
   the work does not depend on the network (untrained here).
3. DENT: 6 AdaMod steps and the prediction, batches of 128 test digits, BN and BN-free networks.

Prints `name: ours X, baseline Y, ratio R×` with ours on the GPU and the baseline on the CPU with
torch's default threads (its cores), each the median of ROUNDS rounds that time both in turn.
Without CUDA it prints one line saying so and exits 0, so `make bench` runs it anywhere;
`bench_gpu.py cpu` runs the GPU side on the CPU too (ratios ≈ 1), to check the script here.
Run from the repository root: `.venv/bin/python benchmarks/bench_gpu.py [device]`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from pixgen import attacks, data, methods, models, train
from pixgen.dent import DEFENSES, Dent

ROUNDS = 5
TRAIN_BATCHES = 4  # per round
PGD_DIGITS, PGD_EPS = 250, 0.3
CPU = torch.device("cpu")


def timed(device: torch.device, work) -> float:
    """Seconds for work(), the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(name: str, make_work, count: int, devices: tuple[torch.device, torch.device]) -> None:
    """make_work(device) -> a callable doing `count` images of work there; one warm-up call each."""
    works = [make_work(d) for d in devices]
    for work in works:
        work()
    rates = [[], []]
    for _ in range(ROUNDS):
        for side, (device, work) in enumerate(zip(devices, works)):
            rates[side].append(count / timed(device, work))
    ours, baseline = (statistics.median(r) for r in rates)
    print(f"{name}: ours {ours:.4g} img/s, baseline {baseline:.4g} img/s, ratio {ours / baseline:.2f}×", flush=True)


def training_work(method: str, x: torch.Tensor, y: torch.Tensor):
    config = methods.TrainConfig(method=method)
    step = methods.Step(config, epoch=0, index=1, total=1)  # past any ramp: the final ε
    batch = config.batch_size

    def make(device: torch.device):
        torch.manual_seed(0)
        model = models.build(config.arch).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        xs, ys = x[: batch * TRAIN_BATCHES].to(device), y[: batch * TRAIN_BATCHES].to(device)

        def work():
            for s in range(0, len(ys), batch):
                loss, _ = methods.METHODS[method].loss(model, xs[s : s + batch], ys[s : s + batch], step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return work

    return make, batch * TRAIN_BATCHES


def pgd_work(x: torch.Tensor, y: torch.Tensor):
    def make(device: torch.device):
        torch.manual_seed(0)
        model = models.build("wk-small").to(device).eval()
        attack = attacks.build("pgd", model, PGD_EPS, compact=False)
        xs, ys = x[:PGD_DIGITS].to(device), y[:PGD_DIGITS].to(device)
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
    name = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if name == "cuda" and not torch.cuda.is_available():
        print("gpu: no CUDA device here; nothing measured (goal 5 needs a GPU machine: docs/benchmarks.md, 'On a GPU')")
        return
    devices = (torch.device(name), CPU)
    label = torch.cuda.get_device_name(devices[0]) if name == "cuda" else "cpu"
    print(f"gpu: ours on {label}, baseline on the CPU with {torch.get_num_threads()} torch threads", flush=True)

    images, labels = data.load("mnist", "train")
    largest = max(methods.METHODS[m].defaults.get("batch_size", 128) for m in methods.METHODS) * TRAIN_BATCHES
    x, y = train.to_tensors(*(a[data.balanced_subset(labels, largest)] for a in (images, labels)), CPU)
    for method in ("standard", "pgd", "dual", "ibp"):
        compare(f"{method} training step (wk-small, its defaults)", *training_work(method, x, y), devices)
    test_images, test_labels = data.load("mnist", "test")
    x, y = train.to_tensors(*(a[data.balanced_subset(test_labels, PGD_DIGITS)] for a in (test_images, test_labels)), CPU)
    compare(f"pgd attack (40 steps, ε {PGD_EPS}, {PGD_DIGITS} digits)", *pgd_work(x, y), devices)
    for arch in ("wk-small", "wk-small-bn"):
        compare(f"dent {arch} (6 steps, batch {DEFENSES['dent'].batch_size})", *dent_work(arch, x), devices)


if __name__ == "__main__":
    main()
