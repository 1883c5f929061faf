"""`pixgen augment`: PixMix-augmented MNIST training shards, precomputed with Dask into Zarr.

The asset holds `images` (epochs, N, 28, 28) uint8, one Zarr chunk per (epoch, chunk of samples)
and one Dask task per chunk, plus `labels` and the MNIST `indices` (N,) of the digits. A task draws
its chunk's PixMix choices from SeedSequence([seed, epoch, chunk]), so the bytes do not depend on
the number of workers, the scheduler or resumes. Tasks carry only a small job description; each
worker loads MNIST and the mixing pictures once (cached per process), so the graph stays small and
memory stays flat however many epochs there are.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PixgenError, assets, data, pixmix
from .progress import bar

STAGE = "augment"
SIZE = 28
CONNECT_TIMEOUT_S = 5


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

    def __post_init__(self):
        pixmix.check_ops(self.ops)
        if self.epochs < 1 or self.k < 0 or self.chunk < 1 or self.seed < 0:
            raise PixgenError(
                f"need epochs >= 1, k >= 0, chunk >= 1 and seed >= 0; got {self.epochs}, {self.k}, {self.chunk}, {self.seed}"
            )
        if self.beta <= 0 or not 0.1 < self.severity <= 10:
            raise PixgenError(f"need beta > 0 and 0.1 < severity <= 10; got {self.beta}, {self.severity}")


@dataclass(frozen=True)
class _Job:
    """What every task needs, by reference: absolute paths, so remote workers find the same files."""

    config: AugmentConfig
    out: str
    mixing: tuple[str, ...]
    data_root: str
    n: int

    @property
    def chunks(self) -> int:
        return -(-self.n // self.config.chunk)


def run(config: AugmentConfig, mixing_paths, out, workers: int = 1, scheduler: str | None = None,
        force: bool = False, data_root=None) -> Path:
    """Build (or resume) the shards asset at `out`; return its path."""
    out = Path(out).resolve()
    mixing = tuple(str(Path(p).resolve()) for p in mixing_paths)
    if not mixing:
        raise PixgenError("no mixing asset given; pass --mixing PATH (e.g. a `pixgen fractals` asset)")
    if workers < 1:
        raise PixgenError(f"--workers must be at least 1, got {workers}")
    inputs = {f"mixing{i}": check_mixing(path) for i, path in enumerate(mixing)}
    # Connect before the slow part, so a wrong address fails in seconds.
    with _connect(scheduler) as client:
        root = str(data.data_root(data_root).resolve())
        images, labels, _ = _train_digits(root, config.train_size)
        inputs["mnist-train"] = data.identity(images, labels)
        job = _Job(config, str(out), mixing, root, len(labels))
        todo = assets.prepare(
            out, stage=STAGE, config=config, inputs=inputs, units=config.epochs * job.chunks, force=force,
            arrays={
                "images": assets.ArraySpec((config.epochs, job.n, SIZE, SIZE), (1, config.chunk, SIZE, SIZE), "uint8"),
                "labels": assets.ArraySpec((job.n,), (config.chunk,), "int64"),
                "indices": assets.ArraySpec((job.n,), (config.chunk,), "int64"),
            },
        )  # fmt: skip
        if todo:
            _compute(job, todo, workers, client)
            assets.finish(out)
    return out


def check_mixing(path: str) -> str:
    """Fail early, in one line, on a mixing asset PixMix cannot use; return its identity."""
    group = assets.open_asset(path)
    if "images" not in group:
        raise PixgenError(f"{path} has no `images` array, so it is not a mixing set; use a fractals or featvis asset")
    arr = group["images"]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (SIZE, SIZE) or arr.dtype != np.uint8:
        raise PixgenError(f"{path}: mixing images must be (N, {SIZE}, {SIZE}) uint8, got {tuple(arr.shape)} {arr.dtype}")
    if arr.shape[0] == 0:
        raise PixgenError(f"{path} holds no mixing images; rebuild it with a positive --count")
    return assets.asset_id(dict(group.attrs))


@functools.lru_cache(maxsize=2)
def _train_digits(root: str, train_size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, MNIST indices) of the training subset; loaded once per worker process."""
    images, labels = data.load("mnist", "train", root)
    indices = data.balanced_subset(labels, train_size)
    return images[indices], labels[indices], indices


@functools.lru_cache(maxsize=2)
def _mixing_pictures(paths: tuple[str, ...]) -> np.ndarray:
    """All mixing pictures, concatenated in the order given; loaded once per worker process."""
    return np.concatenate([assets.open_asset(path)["images"][:] for path in paths])


def _write_chunk(job: _Job, unit: int) -> None:
    """One task: PixMix one chunk of one epoch and write it (and, in epoch 0, its labels)."""
    cfg = job.config
    epoch, chunk = divmod(unit, job.chunks)
    images, labels, indices = _train_digits(job.data_root, cfg.train_size)
    mixing = _mixing_pictures(job.mixing)
    rows = slice(chunk * cfg.chunk, min(job.n, (chunk + 1) * cfg.chunk))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, epoch, chunk]))
    draws = pixmix.draw(rng, rows.stop - rows.start, len(mixing), k=cfg.k, beta=cfg.beta,
                        severity=cfg.severity, ops=cfg.ops, size=SIZE)  # fmt: skip
    # Dask already runs one task per worker, so the kernel stays on this task's thread.
    writes = {"images": ((epoch, rows), pixmix.apply(images[rows], mixing, draws, parallel=False))}
    if epoch == 0:
        writes |= {"labels": (rows, labels[rows]), "indices": (rows, indices[rows])}
    assets.write_unit(job.out, unit, writes)


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


def _compute(job: _Job, todo: list[int], workers: int, client) -> None:
    import dask

    tasks = [dask.delayed(_write_chunk, pure=False)(job, unit) for unit in todo]
    with bar(total=len(tasks), desc="augment", unit="chunk") as progress:
        if client is None:
            _compute_local(tasks, workers, progress)
        else:
            _compute_distributed(tasks, client, progress)


def _compute_local(tasks, workers: int, progress) -> None:
    """Dask's threaded scheduler: the kernel and Zarr's codecs release the GIL, and threads share
    one copy of MNIST and the mixing set (measured faster than processes; see docs/commands.md,
    "pixgen augment")."""
    import dask
    from dask.callbacks import Callback

    with Callback(posttask=lambda *_: progress.update()):
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def _compute_distributed(tasks, client, progress) -> None:
    from distributed import as_completed

    for future in as_completed(client.compute(tasks)):
        future.result()
        progress.update()


def save_preview(path, png, data_root=None, count: int = 32, ncol: int = 16) -> Path:
    """A PNG of rows of original digits, each above the same digits after PixMix (epoch 0)."""
    from .grids import save_grid

    group = assets.open_asset(path, stage=STAGE)
    count = min(count, group["labels"].shape[0])
    originals = data.load("mnist", "train", data_root)[0][group["indices"][:count]]
    mixed = group["images"][0, :count]
    rows = []
    for start in range(0, count, ncol):
        rows += [originals[start : start + ncol], mixed[start : start + ncol]]
    pairs = np.concatenate([_pad(row, ncol) for row in rows])
    return save_grid(pairs, png, ncol=ncol)


def _pad(row: np.ndarray, ncol: int) -> np.ndarray:
    """A short last row padded with black, so originals and their PixMix versions stay aligned."""
    return np.concatenate([row, np.zeros((ncol - len(row), *row.shape[1:]), row.dtype)])
