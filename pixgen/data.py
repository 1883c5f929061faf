"""Raw datasets (a registry: name → torchvision class, image shape, classes, natural-image OOD
set), the data-root rules, fixed class-balanced subsets, and the PixMix shards as a batch source."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

from dataclasses import dataclass

import numpy as np

from . import PixgenError
from .assets import asset_id, open_asset



@dataclass(frozen=True)
class Dataset:
    torchvision: str  # class name in torchvision.datasets, and the folder under the data root
    size: int  # images are size × size
    channels: int
    classes: int
    ood: str  # the other dataset whose test split is this one's natural out-of-distribution set
    # The last `validation` digits of the raw training split: held out of training and of the
    # shards, read by training's per-epoch checks and final certificate, so that nothing before
    # evaluate and certify sees a test digit.
    validation: int = 5000

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


DATASETS = {
    "mnist": Dataset("MNIST", 28, 1, 10, ood="fashion-mnist"),
    "fashion-mnist": Dataset("FashionMNIST", 28, 1, 10, ood="mnist"),
}
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def data_root(option: str | os.PathLike | None = None) -> Path:
    """--data-root, else $PIXGEN_DATA_ROOT, else ./data/raw."""
    return Path(option or os.environ.get("PIXGEN_DATA_ROOT") or "data/raw")


def spec(dataset: str) -> Dataset:
    if dataset not in DATASETS:
        raise PixgenError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


@functools.lru_cache(maxsize=8)
def _load(dataset: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(root) / spec(dataset).torchvision / "raw"
    if not all((folder / name).is_file() for name in RAW_FILES):
        _download(dataset, root)
    prefix = "train" if train else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte", 3)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte", 1).astype(np.int64)
    if len(images) != len(labels) or images.shape[1:] != (spec(dataset).size,) * 2 or labels.max(initial=0) >= spec(dataset).classes:
        raise PixgenError(f"{folder} holds {images.shape} images for {len(labels)} labels up to {labels.max(initial=0)}; replace its files with the {dataset} originals")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (LeCun's format: magic 0x0000 0x08 ndim, big-endian sizes, then the bytes) as
    uint8, read with numpy: torchvision reads the same files but would make every process that
    only needs pixels import torch (2 s, 0.6 GB resident)."""
    raw = np.fromfile(path, np.uint8)
    header = 4 + 4 * ndim
    sizes = tuple(int(n) for n in raw[4:header].view(">u4")) if len(raw) >= header else ()
    if raw[:4].tolist() != [0, 0, 8, ndim] or len(raw) != header + math.prod(sizes):
        raise PixgenError(f"{path} is not an intact IDX file of unsigned bytes with {ndim} dimension(s); replace it with the original")
    return raw[header:].reshape(sizes)


def _download(dataset: str, root: str) -> None:
    """Fetch the raw files through torchvision, or fail in one line saying where to put them."""
    from torchvision import datasets

    folder = Path(root) / spec(dataset).torchvision
    made = [p for p in (Path(root), folder, folder / "raw") if not p.exists()]
    try:
        getattr(datasets, spec(dataset).torchvision)(root, download=True)
    except Exception as exc:
        for path in reversed(made):  # leave the data root as it was, not strewn with empty folders
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise PixgenError(
            f"{dataset} not found in {folder / 'raw'} and could not be downloaded ({type(exc).__name__}); "
            f"put {', '.join(RAW_FILES)} there, or point --data-root / PIXGEN_DATA_ROOT at a "
            "torchvision-layout root that has them"
        ) from None


SPLITS = ("train", "validation", "test")


def load(dataset: str = "mnist", split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size), labels int64 (N,)) of a split; read-only arrays. "train" is
    the raw training split less its last `validation` digits, which are "validation"."""
    if split not in SPLITS:
        raise PixgenError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    held = spec(dataset).validation  # an unknown name fails here, in one line
    images, labels = _load(dataset, str(data_root(root)), split != "test")
    if split == "train":
        return images[:-held], labels[:-held]
    if split == "validation":
        return images[-held:], labels[-held:]
    return images, labels


def identity(images: np.ndarray, labels: np.ndarray) -> str:
    """Content hash of a dataset slice, recorded in the inputs of the assets made from it."""
    digest = hashlib.sha256()
    # The arrays' own buffers: copying them first (`tobytes`) took 43 ms for MNIST's training
    # images against 22 ms, and every `augment` pays it before its first unit.
    digest.update(np.ascontiguousarray(images))
    digest.update(np.ascontiguousarray(labels))
    return digest.hexdigest()[:16]


def balanced_subset(labels: np.ndarray, size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed class-balanced subset of `size` items (all indices if size is None).

    Classes get size // n_classes items each, the remainder going to the lowest classes; the
    choice within a class is a seeded permutation, so the subset depends only on (labels, size, seed).
    """
    if size is not None and not 0 < size <= len(labels):
        raise PixgenError(f"a subset of {size} items is asked for, but the split has {len(labels)}; give a size from 1 to {len(labels)}, or none for all")
    if size is None or size == len(labels):
        return np.arange(len(labels))
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


def open_shards(path, dataset: str, train_identity: str, train_count: int) -> str:
    """The shards asset at `path`, checked to be PixMix copies of this run's training images:
    (epochs, N, size, size) uint8, built from the same slice of the dataset's training split.
    Returns its asset id."""
    group = open_asset(path, stage="augment")
    if "images" not in group or "labels" not in group:
        raise PixgenError(f"{path} has no images/labels arrays; rebuild it with pixgen augment")
    images, labels = group["images"], group["labels"]
    size = spec(dataset).size
    if images.ndim != 4 or tuple(images.shape[2:]) != (size, size) or images.dtype != np.uint8 or labels.shape != images.shape[1:2]:
        raise PixgenError(f"{path}: shards must be images (epochs, N, {size}, {size}) uint8 with labels (N,), got {tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}")
    built_from = dict(group.attrs).get("inputs", {}).get(f"{dataset}-train")
    if built_from != train_identity:
        raise PixgenError(
            f"{path} was not built from this run's {dataset} training images ({images.shape[1]} images, data id {built_from}; "
            f"this run trains on {train_count}, id {train_identity}); rebuild it with pixgen augment --dataset {dataset} --train-size {train_count}, "
            f"or pass --train-size {images.shape[1]} if it was built from this dataset"
        )
    return asset_id(dict(group.attrs))


def shard_epochs(path, epochs: int, batch_size: int, seed: int, device, log):
    """`batches(epoch)` for train.fit: training epoch e reads shard epoch e % E."""
    count = open_asset(path, stage="augment")["images"].shape[0]
    if epochs > count:
        log(f"the shards hold {count} PixMix epochs for {epochs} training epochs: epoch e reads shard epoch e % {count}")

    def batches(epoch: int):
        if epoch >= count:
            log(f"epoch {epoch + 1}: reusing shard epoch {epoch % count}")
        for x, y in shard_batches(path, epoch, batch_size, seed):
            yield x.to(device), y.to(device)

    return batches
