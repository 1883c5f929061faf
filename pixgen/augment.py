"""`pixgen augment`: PixMix-augmented MNIST training shards, precomputed with Dask into Zarr.

The asset holds `images` (epochs, N, 28, 28) uint8, one Zarr chunk per (epoch, chunk of samples)
and one Dask task per chunk, plus `labels` and the MNIST `indices` (N,) of the digits. A task draws
its chunk's PixMix choices from SeedSequence([seed, epoch, chunk]), so the bytes do not depend on
the number of workers, the scheduler or resumes. Tasks carry only a small job description; a
worker has MNIST and the mixing pictures once (cached per process, and inherited by the local
workers, which are forked), so the graph stays small and memory stays flat however many epochs
there are.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec

from . import PixgenError, assets, data, pixmix

STAGE = "augment"
CONNECT_TIMEOUT_S = 5
# Writing the shards, not PixMix, bounded `augment`: zarr's default zstd (level 3) took 5.8 ms to
# write a 2,000-digit chunk, about as long as PixMix takes to make it; LZ4 takes 2.3 ms (zstd
# level 1: 3.5 ms) and reads back in 0.9 ms against 1.9, for chunks 0.46 of raw against 0.34 (22
# against 16 MB per 60,000-digit epoch).
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")  # one-byte pixels: nothing to shuffle


@dataclass(frozen=True)
class AugmentConfig:
    epochs: int = 1
    seed: int = 0
    k: int = 4
    beta: float = 3.0
    severity: float = 3.0
    ops: tuple[str, ...] = pixmix.OPS
    chunk: int = 2000
    train_size: int | None = None
    dataset: str = "mnist"

    def __post_init__(self):
        pixmix.check_ops(self.ops)
        if self.epochs < 1 or self.k < 0 or self.chunk < 1 or self.seed < 0:
            raise PixgenError(
                f"need epochs >= 1, k >= 0, chunk >= 1 and seed >= 0; got {self.epochs}, {self.k}, {self.chunk}, {self.seed}"
            )
        if self.beta <= 0 or not 0.1 < self.severity <= 10:
            raise PixgenError(f"need beta > 0 and 0.1 < severity <= 10; got {self.beta}, {self.severity}")
        data.spec(self.dataset)


@dataclass(frozen=True)
class _Job:
    """What every task needs, by reference: absolute paths, so remote workers find the same files."""

    config: AugmentConfig
    mixing: tuple[str, ...]
    data_root: str
    n: int

    @property
    def chunks(self) -> int:
        return -(-self.n // self.config.chunk)

    def chunk_writes(self, unit: int) -> assets.Writes:
        """One task: PixMix one chunk of one epoch (and, in epoch 0, its labels)."""
        cfg = self.config
        epoch, chunk = divmod(unit, self.chunks)
        images, labels, indices = _train_digits(self.data_root, cfg.dataset, cfg.train_size)
        mixing = _mixing_pictures(self.mixing)
        rows = slice(chunk * cfg.chunk, min(self.n, (chunk + 1) * cfg.chunk))
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, epoch, chunk]))
        draws = pixmix.draw(rng, rows.stop - rows.start, len(mixing), k=cfg.k, beta=cfg.beta,
                            severity=cfg.severity, ops=cfg.ops, size=images.shape[-1])  # fmt: skip
        # Dask already runs one task per worker, so the kernel stays on this task's thread.
        writes = {"images": ((epoch, rows), pixmix.apply(images[rows], mixing, draws, parallel=False))}
        if epoch == 0:
            writes |= {"labels": (rows, labels[rows]), "indices": (rows, indices[rows])}
        return writes


def run(config: AugmentConfig, mixing_paths, out, workers: int = 1, scheduler: str | None = None,
        force: bool = False, data_root=None) -> Path:
    """Build (or resume) the shards asset at `out`; return its path."""
    out = Path(out).resolve()
    mixing = tuple(str(Path(p).resolve()) for p in mixing_paths)
    if not mixing:
        raise PixgenError("no mixing asset given; pass --mixing PATH (e.g. a `pixgen fractals` asset)")
    if workers < 1:
        raise PixgenError(f"--workers must be at least 1, got {workers}")
    size = data.spec(config.dataset).size
    inputs = {f"mixing{i}": check_mixing(path, size) for i, path in enumerate(mixing)}
    _mixing_pictures(mixing)  # read (and cached) before the asset exists, so a damaged chunk stops nothing half-made
    # Connect before the slow part, so a wrong address fails in seconds.
    with _connect(scheduler) as client:
        root = str(data.data_root(data_root).resolve())
        images, labels, _ = _train_digits(root, config.dataset, config.train_size)
        inputs[f"{config.dataset}-train"] = data.identity(images, labels)
        job = _Job(config, mixing, root, len(labels))
        n, c = job.n, config.chunk
        plan = assets.Plan(STAGE, config, units=config.epochs * job.chunks, inputs=inputs, arrays={
            "images": assets.ArraySpec((config.epochs, n, size, size), (1, c, size, size), "uint8", ("epoch", "sample", "y", "x"), COMPRESSOR),
            "labels": assets.ArraySpec((n,), (c,), "int64", ("sample",)),
            "indices": assets.ArraySpec((n,), (c,), "int64", ("sample",)),
        })  # fmt: skip
        return assets.build(out, plan, job.chunk_writes, force=force, workers=workers, client=client)


def check_mixing(path: str, size: int) -> str:
    """Fail early, in one line, on a mixing asset PixMix cannot use; return its identity."""
    group = assets.open_asset(path)
    if "images" not in group:
        raise PixgenError(f"{path} has no `images` array, so it is not a mixing set; use a fractals or featvis asset")
    arr = group["images"]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (size, size) or arr.dtype != np.uint8:
        raise PixgenError(f"{path}: mixing images must be (N, {size}, {size}) uint8, got {tuple(arr.shape)} {arr.dtype}")
    if arr.shape[0] == 0:
        raise PixgenError(f"{path} holds no mixing images; rebuild it with a positive --count")
    return assets.asset_id(dict(group.attrs))


@functools.lru_cache(maxsize=2)
def _train_digits(root: str, dataset: str, train_size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, MNIST indices) of the training subset; loaded once per worker process."""
    images, labels = data.load(dataset, "train", root)
    indices = data.balanced_subset(labels, train_size)
    return images[indices], labels[indices], indices


@functools.lru_cache(maxsize=2)
def _mixing_pictures(paths: tuple[str, ...]) -> np.ndarray:
    """All mixing pictures, concatenated in the order given; loaded once per worker process."""
    return np.concatenate([assets.read(assets.open_asset(path), "images") for path in paths])


@contextlib.contextmanager
def _connect(address: str | None):
    """A dask.distributed Client of the cluster at `address`, or None for the local scheduler."""
    if address is None:
        yield None
        return
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise PixgenError(
            f"cannot reach a Dask scheduler at {address} within {CONNECT_TIMEOUT_S}s ({type(exc).__name__}); "
            "start one with `dask scheduler` and `dask worker ADDRESS`, or drop --scheduler"
        ) from None
    with client:
        yield client


def save_preview(path, png, data_root=None, count: int = 32, ncol: int = 16) -> Path:
    """A PNG of rows of original digits, each above the same digits after PixMix (epoch 0)."""
    from .grids import save_grid

    group = assets.open_asset(path, stage=STAGE)
    count = min(count, group["labels"].shape[0])
    originals = data.load(group.attrs["config"].get("dataset", "mnist"), "train", data_root)[0][group["indices"][:count]]
    mixed = group["images"][0, :count]
    rows = []
    for start in range(0, count, ncol):
        rows += [originals[start : start + ncol], mixed[start : start + ncol]]
    pairs = np.concatenate([_pad(row, ncol) for row in rows])
    return save_grid(pairs, png, ncol=ncol)


def _pad(row: np.ndarray, ncol: int) -> np.ndarray:
    """A short last row padded with black, so originals and their PixMix versions stay aligned."""
    return np.concatenate([row, np.zeros((ncol - len(row), *row.shape[1:]), row.dtype)])
