"""Raw datasets through torchvision, the data-root rules, and fixed class-balanced subsets."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from . import PixgenError

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def data_root(option: str | os.PathLike | None = None) -> Path:
    """--data-root, else $PIXGEN_DATA_ROOT, else ./data/raw."""
    return Path(option or os.environ.get("PIXGEN_DATA_ROOT") or "data/raw")


@functools.lru_cache(maxsize=8)
def _load(dataset: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets

    if dataset not in DATASETS:
        raise PixgenError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    cls = getattr(datasets, DATASETS[dataset])
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(root, train=train, download=True)
        except Exception as exc:
            folder = Path(root) / DATASETS[dataset] / "raw"
            raise PixgenError(
                f"{dataset} not found in {folder} and could not be downloaded ({type(exc).__name__}); "
                f"put {', '.join(RAW_FILES)} there, or point --data-root / PIXGEN_DATA_ROOT at a "
                "torchvision-layout root that has them"
            ) from None
    images = ds.data.numpy().astype(np.uint8, copy=False)
    labels = ds.targets.numpy().astype(np.int64, copy=False)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load(dataset: str = "mnist", split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of a split ("train" or "test"); read-only arrays."""
    if split not in ("train", "test"):
        raise PixgenError(f"unknown split {split!r}; choose train or test")
    return _load(dataset, str(data_root(root)), split == "train")


def identity(images: np.ndarray, labels: np.ndarray) -> str:
    """Content hash of a dataset slice, recorded in the inputs of the assets made from it."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()[:16]


def balanced_subset(labels: np.ndarray, size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed class-balanced subset of `size` items (all indices if size is None).

    Classes get size // n_classes items each, the remainder going to the lowest classes; the
    choice within a class is a seeded permutation, so the subset depends only on (labels, size, seed).
    """
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    if size <= 0:
        raise PixgenError(f"subset size must be positive, got {size}")
    classes = np.unique(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, size]))
    base, extra = divmod(size, len(classes))
    picked = []
    for i, cls in enumerate(classes):
        members = np.flatnonzero(labels == cls)
        take = min(len(members), base + (i < extra))
        picked.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(picked))


def shard_batches(path: str | os.PathLike, epoch: int, batch_size: int = 128, seed: int = 0, window: int = 4):
    """Yield one training epoch of a `pixgen augment` asset as torch batches (images float32
    (B, 1, 28, 28) in [0, 1], labels int64 (B,)), every sample once.

    Training epoch `epoch` reads shard epoch `epoch % E`. Whole Zarr chunks are read in an order
    drawn from (seed, epoch), `window` chunks at a time, and their samples shuffled together, so the
    order mixes within and across chunks, is the same on every run, and memory holds one window.
    """
    import torch

    from .assets import open_asset

    group = open_asset(path, stage="augment")
    images, labels = group["images"], group["labels"][:]
    chunk = images.chunks[1]
    starts = np.arange(0, images.shape[1], chunk)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    shard_epoch = epoch % images.shape[0]
    pending_x, pending_y = np.empty((0, *images.shape[2:]), np.uint8), np.empty(0, np.int64)
    order = rng.permutation(starts)
    for first in range(0, len(order), window):
        parts = [(images[shard_epoch, s : s + chunk], labels[s : s + chunk]) for s in order[first : first + window]]
        xs = np.concatenate([pending_x, *(x for x, _ in parts)])
        ys = np.concatenate([pending_y, *(y for _, y in parts)])
        mix = rng.permutation(len(ys))
        xs, ys = xs[mix], ys[mix]
        last = first + window >= len(order)
        full = len(ys) if last else len(ys) - len(ys) % batch_size
        for b in range(0, full, batch_size):
            x = torch.from_numpy(xs[b : b + batch_size]).unsqueeze(1).float().div_(255)
            yield x, torch.from_numpy(ys[b : b + batch_size])
        # The remainder joins the next window rather than making a short batch mid-epoch.
        pending_x, pending_y = xs[full:], ys[full:]
