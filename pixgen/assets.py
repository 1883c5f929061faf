"""The asset store: one Zarr v3 group per asset, built by one loop for every stage.

An asset's identity is its stage, its config (canonical JSON and hash) and the identities of the
assets it was made from. A stage describes its asset as a `Plan` (arrays, number of units of
work) and hands `build` a function that computes one unit; the store knows no stage. `build`:

1. takes a lock beside the asset (`.<name>.lock`), so two runs never build one asset at once;
2. prepares: a new asset's whole layout (group, arrays, attributes) is written under a temporary
   name beside it and renamed into place, so a reader never finds a half-made layout; an asset
   made otherwise is replaced only with `force`, and the old one goes only after the new layout
   exists;
3. runs the units not yet flagged done (in order, on forked local processes, or as tasks on a
   Dask cluster): a unit's arrays are written whole, then the unit is flagged in `_done`;
4. always finishes: `complete` is set once every unit is flagged, also when a previous run was
   killed after its last unit, so "every unit done but not complete" cannot persist.

Zarr's LocalStore writes every chunk and metadata document by rename, so a kill never leaves a
torn chunk or flag. `PIXGEN_FAULT` (tests only) kills the process at a named point of this loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import PixgenError, __version__
from .config import canonical_json, config_hash
from .processes import die_with_parent
from .progress import bar

DONE = "_done"
UNITS_PER_DISPATCH = 4
Writes = dict[str, tuple[Any, np.ndarray]]  # array name → (selection, data)


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]  # Zarr v3 dimension_names, so xarray opens the asset as a labelled dataset
    compressors: Any = "auto"  # zarr's `compressors` argument; "auto" is zarr's default (zstd)

    def __post_init__(self):
        if not len(self.shape) == len(self.chunks) == len(self.dims):
            raise ValueError(f"shape, chunks and dims differ in rank: {self.shape}, {self.chunks}, {self.dims}")


@dataclass(frozen=True)
class Plan:
    """What a stage will write: its identity, its arrays and how many units of work fill them."""

    stage: str
    config: Any
    arrays: dict[str, ArraySpec]
    units: int
    inputs: dict[str, str] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def identity(self) -> dict:
        return {"stage": self.stage, "config_hash": config_hash(self.config), "inputs": dict(self.inputs)}


def asset_id(attrs: dict) -> str:
    """Content identity of an asset: what made it, not where it lies."""
    return config_hash({k: attrs.get(k) for k in ("stage", "config_hash", "inputs")})


def fault(point: str) -> None:
    """Kill this process at `point` when PIXGEN_FAULT names it (fault-injection tests only)."""
    if os.environ.get("PIXGEN_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- reading ---------------------------------------------------------------------------------


def _read_attrs(path: Path) -> dict:
    meta = path / "zarr.json"
    if not meta.is_file():
        raise PixgenError(f"{path} is not a pixgen asset (no zarr.json); remove it or choose another path")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise PixgenError(f"{path} is damaged: its zarr.json cannot be read ({exc}); rerun with --force or remove it") from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    if doc.get("node_type") != "group" or "pixgen_version" not in attrs:
        raise PixgenError(f"{path} is a Zarr store but not a pixgen asset; remove it or choose another path")
    return attrs


def _todo(path: Path, units: int) -> list[int]:
    try:
        flags = zarr.open_array(str(path / DONE), mode="r")[:]
    except Exception as exc:  # zarr and its codecs raise many types for a damaged array
        raise PixgenError(f"{path} is damaged: its {DONE} array cannot be read ({type(exc).__name__}); rerun with --force or remove it") from None
    return [unit for unit in range(units) if not flags[unit]]


def open_asset(path: str | Path, stage: str | None = None) -> zarr.Group:
    """Open a complete pixgen asset for reading (of the given stage, if named)."""
    path = Path(path)
    if not path.exists():
        raise PixgenError(f"{path} does not exist; build it first or check the path")
    if not path.is_dir():
        raise PixgenError(f"{path} is a file, not a pixgen asset (a Zarr folder); check the path")
    attrs = _read_attrs(path)
    if stage is not None and attrs.get("stage") != stage:
        raise PixgenError(f"{path} is a {attrs.get('stage')} asset, but a {stage} asset is needed here")
    if not attrs.get("complete"):
        raise PixgenError(f"{path} is incomplete; rerun the command that made it to finish it")
    try:
        group = zarr.open_group(str(path), mode="r")
        list(group.array_keys())  # parses every array's metadata: damage shows here, not mid-work
    except Exception as exc:  # zarr raises many types for damaged metadata
        raise PixgenError(f"{path} is damaged: {type(exc).__name__}: {exc}; rebuild it with --force or remove it") from None
    return group


def read(group: zarr.Group, name: str, selection: Any = slice(None)) -> np.ndarray:
    """An array region, with a damaged chunk or metadata reported in one line naming the asset."""
    try:
        return group[name][selection]
    except KeyError:
        raise PixgenError(f"{group.store_path} has no array {name!r}; rebuild it with the current pixgen") from None
    except Exception as exc:
        raise PixgenError(f"{group.store_path} is damaged: its array {name!r} cannot be read ({type(exc).__name__}: {exc}); rebuild it with --force or remove it") from None


def describe(path: str | Path) -> str:
    """Human-readable summary for `pixgen info`."""
    path = Path(path)
    if not path.exists():
        raise PixgenError(f"{path} does not exist")
    attrs = _read_attrs(path)
    group = zarr.open_group(str(path), mode="r")
    todo = _todo(path, attrs["units"])
    lines = [
        f"asset:    {path}",
        f"stage:    {attrs['stage']} (pixgen {attrs['pixgen_version']})",
        f"complete: {bool(attrs.get('complete'))} ({attrs['units'] - len(todo)}/{attrs['units']} units done)",
        f"id:       {asset_id(attrs)}",
        f"config:   {canonical_json(attrs['config'])} (hash {attrs['config_hash']})",
        f"inputs:   {canonical_json(attrs['inputs'])}",
    ]
    try:
        arrays = {name: group[name] for name in sorted(group.array_keys()) if name != DONE}
    except Exception as exc:  # zarr raises many types for damaged metadata
        raise PixgenError(f"{path} is damaged: an array cannot be opened ({type(exc).__name__}: {exc}); rebuild it with --force or remove it") from None
    for name, arr in arrays.items():
        dims = ", ".join(arr.metadata.dimension_names or ())
        lines.append(f"array:    {name} {tuple(arr.shape)} {arr.dtype} chunks {tuple(arr.chunks)} ({dims})")
    extra = {k: v for k, v in attrs.items() if k not in {"pixgen_version", "stage", "config", "config_hash", "inputs", "units", "complete"}}
    for key, value in sorted(extra.items()):
        text = canonical_json(value)
        # Results (an evaluation's) run to megabytes: a summary line here, the whole in zarr/xarray.
        lines.append(f"{key}: {text if len(text) <= 200 else text[:200] + f'… ({len(text):,} characters)'}")
    return "\n".join(lines)


# ---- building --------------------------------------------------------------------------------


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


@contextlib.contextmanager
def lock(path: Path):
    """Hold an exclusive lock on building `path`: a lock file beside it, removed on release. The OS
    frees the lock when its holder dies, so a killed run never blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = _sibling(path, "lock")
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PixgenError(f"{path} is being built by {holder} right now; wait for it to finish (or stop it) and rerun") from None
        # The holder before us may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else can see, and must take the one at the path.
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def recover(path: Path) -> None:
    """Undo what a killed run left beside `path` (call with the lock held, so nobody else is
    writing): a layout never renamed into place is dropped; an old asset moved aside by a --force
    replacement is put back if the new one never arrived, else dropped."""
    shutil.rmtree(staging(path), ignore_errors=True)
    old = _sibling(path, "old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, path)


def staging(path: Path) -> Path:
    """Where a new asset's layout is written before `install` renames it to `path`."""
    return _sibling(path, "partial")


def install(path: Path) -> None:
    """Rename the staged layout to `path`; an asset already there (a --force replacement) is moved
    aside only now, when the new layout exists, and removed once the new one is in place."""
    if path.exists():
        os.rename(path, _sibling(path, "old"))
        fault("replace")
    os.rename(staging(path), path)
    shutil.rmtree(_sibling(path, "old"), ignore_errors=True)


def _create(path: Path, plan: Plan) -> None:
    group = zarr.open_group(str(staging(path)), mode="w")
    fault("layout")
    for name, spec in plan.arrays.items():
        group.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=0,
                           dimension_names=spec.dims, compressors=spec.compressors)  # fmt: skip
    # One chunk per unit so that concurrent workers never rewrite each other's flags.
    group.create_array(DONE, shape=(plan.units,), chunks=(1,), dtype="uint8", fill_value=0, dimension_names=("unit",))
    group.attrs.update(
        {
            "pixgen_version": __version__,
            **plan.identity,
            "config": json.loads(canonical_json(plan.config)),
            "units": plan.units,
            "complete": False,
            **plan.attrs,
        }
    )
    install(path)


def prepare(path: Path, plan: Plan, force: bool = False) -> list[int]:
    """Create the asset, or reopen it to resume; return the units still to do.

    An existing asset made with the same identity is resumed. One made otherwise is replaced
    only with `force`; anything else at `path` is never deleted. Call with the lock held."""
    recover(path)
    fault("setup")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        if not path.is_dir():
            raise PixgenError(f"{path} is a file, not a pixgen asset; remove it or choose another output path")
        old = _read_attrs(path)
        if all(old.get(k) == v for k, v in plan.identity.items()):
            return [] if old.get("complete") else _todo(path, plan.units)
        if not force:
            raise PixgenError(
                f"{path} holds a {old.get('stage')} asset made with another config or inputs "
                f"(hash {old.get('config_hash')}, now {plan.identity['config_hash']}); "
                "pass --force to replace it or choose another output path"
            )
    elif path.exists():
        path.rmdir()  # an empty folder, e.g. made by hand
    _create(path, plan)
    return list(range(plan.units))


def write_unit(path: str | Path, unit: int, writes: Writes, arrays: dict[str, zarr.Array] | None = None) -> None:
    """Write one unit's regions, then flag the unit done. `arrays`: the asset's, from
    `open_for_writing`, for a caller that writes many units."""
    arrays = arrays or open_for_writing(path)
    for name, (selection, data) in writes.items():
        arrays[name][selection] = data
    arrays[DONE][unit] = 1


def open_for_writing(path: str | Path) -> dict[str, zarr.Array]:
    """The asset's arrays by name, ready for `write_unit`. Opening them costs about 1 ms, a fifth of
    writing a 2,000-digit shard chunk, so a local build opens them once per process (the parent's
    and each worker's), not per unit."""
    group = zarr.open_group(str(path), mode="r+")
    # Zarr otherwise compares every chunk with the fill value to skip empty ones, which cost more
    # than compressing it (4 ms per 1.5 MB chunk); a unit's chunks are written whole anyway.
    return {name: array.with_config({"write_empty_chunks": True}) for name, array in group.arrays()}


def _finish(path: Path, summary: Callable[[zarr.Group], dict] | None, reread_flags: bool) -> None:
    group = zarr.open_group(str(path), mode="r+")
    # A local unit returns only after its flag is written to this file system; a cluster's worker
    # could write to a disk of its own under the same path and still return, so its flags are read
    # back. Not for local builds: through Zarr that took 93 ms for a 280-unit augment.
    if reread_flags and (missing := _todo(path, group.attrs["units"])):
        raise PixgenError(f"{path}: {len(missing)} units are not written yet; rerun the command to finish them")
    fault("finish")
    group.attrs.update({**(summary(group) if summary else {}), "complete": True})


def _do_unit(path: str, work: Callable[[int], Writes], unit: int, arrays: dict[str, zarr.Array] | None = None) -> int:
    """One task: compute a unit and write it (on whichever thread or worker runs the task)."""
    write_unit(path, unit, work(unit), arrays)
    fault(f"unit{unit}")
    return unit


def build(
    path: str | Path,
    plan: Plan,
    work: Callable[[int], Writes],
    *,
    force: bool = False,
    workers: int = 1,
    client=None,
    summary: Callable[[zarr.Group], dict] | None = None,
    unit_name: str = "chunk",
) -> Path:
    """Build, resume or leave alone the asset at `path`; return it.

    `work(unit)` computes one unit's writes; it must depend on nothing but the unit (any order,
    any process, any worker). `workers > 1` runs the first unit here and the rest on that many
    forked processes (Dask's process scheduler); `client`, a dask.distributed Client, runs them on
    its cluster, whose workers must see `path` (pass an absolute one). `summary(group)` gives
    attributes set when complete."""
    path = Path(path)
    try:
        with lock(path):
            todo = prepare(path, plan, force)
            if not todo:
                log(f"{path} is complete with this config; nothing to do")
            elif len(todo) < plan.units:
                log(f"resuming {path}: {len(todo)} of {plan.units} units to do")
            if todo:
                _run_units(str(path), work, todo, workers, client, plan.stage, unit_name)
            fault("units-done")
            if not _read_attrs(path).get("complete"):
                _finish(path, summary, reread_flags=client is not None and bool(todo))
    except OSError as exc:
        if exc.errno is None:
            raise
        raise PixgenError(f"cannot write {exc.filename or path}: {exc.strerror}; choose a writable output path with free space") from None
    return path


def save_arrays(path: str | Path, stage: str, config: Any, arrays: dict[str, np.ndarray], *, dims: dict[str, tuple[str, ...]] | None = None,
                inputs: dict[str, str] | None = None, attrs: dict | None = None, force: bool = False) -> Path:
    """A small asset of in-memory arrays, written as one unit (one chunk per array)."""
    dims = dims or {}
    specs = {name: ArraySpec(a.shape, tuple(max(1, n) for n in a.shape), str(a.dtype), dims.get(name, tuple(f"{name}_{i}" for i in range(a.ndim)))) for name, a in arrays.items()}
    plan = Plan(stage, config, specs, units=1, inputs=dict(inputs or {}), attrs=dict(attrs or {}))
    return build(path, plan, lambda unit: {name: ((slice(None),) * a.ndim, a) for name, a in arrays.items()}, force=force)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_units(path: str, work, todo: list[int], workers: int, client, desc: str, unit_name: str) -> None:
    with bar(total=len(todo), desc=desc, unit=unit_name) as progress:
        if client is not None:
            from distributed import as_completed

            for future in as_completed(client.map(_do_unit, [path] * len(todo), [work] * len(todo), todo, pure=False)):
                future.result()
                progress.update()
            return
        # The first unit here even with workers: what a unit loads lazily (data, compiled kernels:
        # 0.25 s for PixMix's) is then loaded once and inherited by the forked workers.
        here, forked = (todo, []) if workers == 1 else (todo[:1], todo[1:])
        arrays = open_for_writing(path)
        for unit in here:
            _do_unit(path, work, unit, arrays)
            progress.update()
        if forked:
            _run_in_processes(path, work, forked, workers, progress.update)


def _run_in_processes(path: str, work, todo: list[int], workers: int, done: Callable[[], Any]) -> None:
    """Units as Dask tasks on `workers` forked processes. Not threads: Zarr passes every write of a
    process through its one event-loop thread, so 2 threads made shards only 1.32× as fast as 1
    (processes: 1.43×, same runs). Forked, a worker inherits what its parent loaded (MNIST, the
    mixing pictures, the compiled kernels); Zarr starts a fresh event loop in it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import dask.multiprocessing
    from dask.callbacks import Callback

    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(path, os.getpid()))  # fmt: skip
    # A plain task graph, not dask.delayed: on 279 no-op tasks, building and optimising delayed
    # calls cost the parent 107–154 ms more CPU, spent before the first worker forks; the graph
    # costs it 62–86 ms in all.
    graph = {("unit", unit): (_do_unit_in_worker, work, unit) for unit in todo}
    # Dask keeps one dispatch per worker in flight, so a worker idles while its result goes back
    # and the next task comes; a few units per dispatch amortise that, while at least 4 dispatches
    # per worker keep the last ones even. 4 units of augment's ≈ 10 ms: 2 workers made shards 11%
    # faster.
    per_dispatch = max(1, min(UNITS_PER_DISPATCH, len(todo) // (4 * workers)))
    # Python's collector in a forked worker walks the objects inherited from the parent, touching
    # (so copying) their pages; frozen before the fork (the pool forks at its first submit, inside
    # compute), they are skipped, as the `gc` docs advise: 7% faster with 2 workers.
    gc.freeze()
    try:
        with Callback(posttask=lambda *_: done()):
            dask.multiprocessing.get(graph, list(graph), pool=pool, chunksize=per_dispatch)
    except BrokenProcessPool:
        raise PixgenError(f"a worker process building {path} stopped (killed, out of memory, or failed to start); rerun the command to resume") from None
    finally:
        gc.unfreeze()
        pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C: units not started are dropped, running ones finish


_worker: dict[str, Any] = {}  # a worker process's asset path and its open arrays


def _start_worker(path: str, parent: int) -> None:
    # A fork keeps the parent's lock on the asset: a worker left running by a killed parent would
    # block the rerun, so it dies with the parent.
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent alone stops the build
    _worker.update(path=path, arrays=open_for_writing(path))


def _do_unit_in_worker(work: Callable[[int], Writes], unit: int) -> int:
    return _do_unit(_worker["path"], work, unit, _worker["arrays"])
