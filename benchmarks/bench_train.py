"""The data side of training, and the dual method's cost.

1. One epoch of pixmix training (wk-small, batch 128, Adam) on a 10,000-digit class-balanced
   subset of MNIST train: read from `pixgen augment` shards (ours) against PixMix done on the fly
   per image in a torch DataLoader (baseline: the reference code's way, bench_pixmix's per-image
   PIL PixMix, 2 worker processes), both on this machine's cores in this process.
2. The fraction of step time spent waiting for the next batch, for both (goal from shards: < 5%).
3. The dual method's training throughput at its defaults (batch 32, 10 projections, at the final
   ε 0.1) against Wong & Kolter's 50 projections, on an untrained wk-small.

Prints `name: ours X, baseline Y, ratio R×`. Run from the repository root:
`.venv/bin/python benchmarks/bench_train.py` (or `make bench`). Building the shards is not timed
(it is `pixgen augment`'s work, benchmarked in bench_pixmix.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_pixmix import baseline_pixmix, mixing_pictures, write_mixing_asset  # noqa: E402

from pixgen import augment, data, methods, models, train  # noqa: E402

TRAIN_SIZE = 10_000
BATCH = 128
LOADER_WORKERS = 2  # the machine's cores, as the reference runs PixMix in DataLoader workers
DUAL_IMAGES = 500


class OnTheFly(torch.utils.data.Dataset):
    """PixMix per image at __getitem__, each digit's draws from SeedSequence([epoch, index])."""

    def __init__(self, digits: np.ndarray, labels: np.ndarray, mixing: np.ndarray, epoch: int = 0):
        self.digits, self.labels, self.epoch = digits, labels, epoch
        self.mixing = [Image.fromarray(m) for m in mixing]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        rng = np.random.default_rng(np.random.SeedSequence([self.epoch, index]))
        with np.errstate(over="ignore"):
            image = baseline_pixmix(Image.fromarray(self.digits[index]), self.mixing, rng)
        return torch.from_numpy(image).unsqueeze(0).float().div_(255), int(self.labels[index])


def timed_epoch(batches) -> tuple[float, float, int]:
    """(seconds, fraction of them spent waiting for batches, images) of one training epoch."""
    torch.manual_seed(0)
    model = models.build("wk-small").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    wait = seen = 0
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        before = time.perf_counter()
        batch = next(iterator, None)
        wait += time.perf_counter() - before
        if batch is None:
            break
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    total = time.perf_counter() - start
    return total, wait / total, seen


def dual_throughput(projections: int, images: torch.Tensor, labels: torch.Tensor) -> float:
    config = methods.TrainConfig(method="dual", epochs=1, projections=projections)
    torch.manual_seed(0)
    model = models.build("wk-small").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = methods.Step(config, epoch=0, index=1, total=1)  # past the ramp: the final ε
    start = time.perf_counter()
    for s in range(0, len(labels), config.batch_size):
        loss, _ = methods.dual_loss(model, images[s : s + config.batch_size], labels[s : s + config.batch_size], step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(labels) / (time.perf_counter() - start)


def line(name: str, ours: float, baseline: float, unit: str, higher_is_better: bool = False) -> None:
    """The ratio says how many times better ours is."""
    ratio = ours / baseline if higher_is_better else baseline / ours
    print(f"{name}: ours {ours:.4g}{unit}, baseline {baseline:.4g}{unit}, ratio {ratio:.2f}×", flush=True)


def main() -> None:
    digits, labels = data.load("mnist", "train")
    subset = data.balanced_subset(labels, TRAIN_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        mixing = mixing_pictures()
        mixing_asset = write_mixing_asset(Path(tmp) / "mixing.zarr", mixing)
        shards = augment.run(augment.AugmentConfig(epochs=1, train_size=TRAIN_SIZE), [mixing_asset], Path(tmp) / "shards.zarr", workers=2)
        timed_epoch(data.shard_batches(shards, 0, BATCH))  # load zarr's codecs and torch's kernels once
        ours, ours_wait, n = timed_epoch(data.shard_batches(shards, 0, BATCH))
    loader = torch.utils.data.DataLoader(
        OnTheFly(digits[subset], labels[subset], mixing), batch_size=BATCH, shuffle=True, num_workers=LOADER_WORKERS,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    baseline, baseline_wait, _ = timed_epoch(loader)
    line(f"pixmix training epoch ({n} digits, wk-small, batch {BATCH})", ours, baseline, " s")
    line("data wait, share of step time (goal < 5%)", 100 * ours_wait, 100 * baseline_wait, "%")

    x, y = train.to_tensors(digits[subset[:DUAL_IMAGES]], labels[subset[:DUAL_IMAGES]], torch.device("cpu"))
    line(f"dual training at defaults (wk-small, batch {methods.METHODS['dual'].defaults['batch_size']}, ε 0.1; 10 vs 50 projections, {DUAL_IMAGES} digits)", dual_throughput(10, x, y), dual_throughput(50, x, y), " img/s", True)


if __name__ == "__main__":
    main()
