"""The asset store: one Zarr v3 group per asset, written in resumable units of work.

An asset's identity is its stage, its config (canonical JSON and hash) and the identities of the
assets it was made from. Work is split into units (usually one chunk of the main array); a unit's
arrays are written whole and only then is the unit flagged done in `_done`, so a killed run leaves
at worst a unit that is redone. `complete` is set last, after every unit is flagged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import PixgenError, __version__
from .config import canonical_json, config_hash

DONE = "_done"


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str


def asset_id(attrs: dict) -> str:
    """Content identity of an asset: what made it, not where it lies."""
    return config_hash({k: attrs.get(k) for k in ("stage", "config_hash", "inputs")})


def _read_attrs(path: Path) -> dict:
    meta = path / "zarr.json"
    if not meta.is_file():
        raise PixgenError(f"{path} is not a pixgen asset (no zarr.json); remove it or choose another path")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise PixgenError(f"{path} is damaged: its zarr.json cannot be read ({exc}); remove it and rerun") from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    if doc.get("node_type") != "group" or "pixgen_version" not in attrs:
        raise PixgenError(f"{path} is a Zarr store but not a pixgen asset; remove it or choose another path")
    return attrs


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def prepare(
    path: str | Path,
    *,
    stage: str,
    config: Any,
    arrays: dict[str, ArraySpec],
    units: int,
    inputs: dict[str, str] | None = None,
    attrs: dict | None = None,
    force: bool = False,
) -> list[int]:
    """Create the asset, or reopen it to resume; return the units still to do ([] if complete).

    An existing asset made with the same stage, config and inputs is resumed. One made otherwise
    is replaced only with `force`; anything else at `path` is never deleted.
    """
    path = Path(path)
    inputs = dict(inputs or {})
    identity = {"stage": stage, "config_hash": config_hash(config), "inputs": inputs}
    if path.exists() and not _is_empty_dir(path):
        old = _read_attrs(path)
        if all(old.get(k) == v for k, v in identity.items()):
            if old.get("complete"):
                return []
            return _todo(path, units)
        if not force:
            raise PixgenError(
                f"{path} holds a {old.get('stage')} asset made with another config or inputs "
                f"(hash {old.get('config_hash')}, now {identity['config_hash']}); "
                "pass --force to replace it or choose another output path"
            )
        shutil.rmtree(path)
    try:
        group = zarr.open_group(str(path), mode="w")
        for name, spec in arrays.items():
            group.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=0)
        # One chunk per unit so that concurrent workers never rewrite each other's flags; zarr's
        # LocalStore writes every chunk by rename, so a kill never leaves a torn chunk or flag.
        group.create_array(DONE, shape=(units,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update(
            {
                "pixgen_version": __version__,
                "stage": stage,
                "config": json.loads(canonical_json(config)),
                "config_hash": identity["config_hash"],
                "inputs": inputs,
                "units": units,
                "complete": False,
                **(attrs or {}),
            }
        )
    except OSError as exc:
        raise PixgenError(f"cannot write {path}: {exc.strerror or exc}; choose a writable output path") from None
    return list(range(units))


def _todo(path: Path, units: int) -> list[int]:
    try:
        flags = zarr.open_array(str(path / DONE), mode="r")[:]
    except (OSError, ValueError) as exc:  # zarr's not-found and bad-metadata errors derive from these
        raise PixgenError(f"{path} is damaged: its {DONE} array cannot be read ({type(exc).__name__}); remove it and rerun") from None
    return [unit for unit in range(units) if not flags[unit]]


def write_unit(path: str | Path, unit: int, writes: dict[str, tuple[Any, np.ndarray]]) -> None:
    """Write one unit's regions ({array: (selection, data)}), then flag the unit done."""
    group = zarr.open_group(str(path), mode="r+")
    for name, (selection, data) in writes.items():
        group[name][selection] = data
    group[DONE][unit] = 1


def finish(path: str | Path, attrs: dict | None = None) -> None:
    """Mark the asset complete; refuses while any unit is not flagged done."""
    group = zarr.open_group(str(path), mode="r+")
    missing = _todo(Path(path), group.attrs["units"])
    if missing:
        raise PixgenError(f"{path}: {len(missing)} units are not written yet; rerun the command to finish them")
    group.attrs.update({**(attrs or {}), "complete": True})


def open_asset(path: str | Path, stage: str | None = None) -> zarr.Group:
    """Open a complete pixgen asset for reading (of the given stage, if named)."""
    path = Path(path)
    if not path.exists():
        raise PixgenError(f"{path} does not exist; build it first or check the path")
    attrs = _read_attrs(path)
    if stage is not None and attrs.get("stage") != stage:
        raise PixgenError(f"{path} is a {attrs.get('stage')} asset, but a {stage} asset is needed here")
    if not attrs.get("complete"):
        raise PixgenError(f"{path} is incomplete; rerun the command that made it to finish it")
    return zarr.open_group(str(path), mode="r")


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
    for name in sorted(k for k in group.array_keys() if k != DONE):
        arr = group[name]
        lines.append(f"array:    {name} {tuple(arr.shape)} {arr.dtype} chunks {tuple(arr.chunks)}")
    extra = {k: v for k, v in attrs.items() if k not in {"pixgen_version", "stage", "config", "config_hash", "inputs", "units", "complete"}}
    for key, value in sorted(extra.items()):
        lines.append(f"{key}: {canonical_json(value)}")
    return "\n".join(lines)
