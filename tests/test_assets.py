"""The asset store on its own: create, resume, complete, refuse, and report damage in one line."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import zarr

from pixgen import PixgenError, assets


@dataclass(frozen=True)
class Toy:
    count: int = 6
    seed: int = 0


ARRAYS = {"values": assets.ArraySpec((6,), (2,), "int32")}


def make(path, config=Toy(), force=False):
    return assets.prepare(path, stage="toy", config=config, arrays=ARRAYS, units=3, force=force)


def write(path, unit):
    rows = slice(2 * unit, 2 * unit + 2)
    assets.write_unit(path, unit, {"values": (rows, np.arange(6, dtype=np.int32)[rows] + 10)})


def build(path):
    for unit in make(path):
        write(path, unit)
    assets.finish(path)


def test_units_resume_and_complete(tmp_path):
    path = tmp_path / "toy.zarr"
    assert make(path) == [0, 1, 2]
    write(path, 1)
    assert make(path) == [0, 2]  # reopened, not recreated: unit 1 stays done
    with pytest.raises(PixgenError, match="2 units are not written"):
        assets.finish(path)
    with pytest.raises(PixgenError, match="incomplete"):
        assets.open_asset(path)
    for unit in make(path):
        write(path, unit)
    assets.finish(path)
    group = assets.open_asset(path, stage="toy")
    assert group["values"][:].tolist() == [10, 11, 12, 13, 14, 15]
    assert group.attrs["complete"] is True and group.attrs["config"] == {"count": 6, "seed": 0}
    assert make(path) == []


def test_other_config_is_refused_unless_forced(tmp_path):
    path = tmp_path / "toy.zarr"
    build(path)
    with pytest.raises(PixgenError, match="--force"):
        make(path, Toy(seed=1))
    assert assets.open_asset(path).attrs["config"]["seed"] == 0
    assert make(path, Toy(seed=1), force=True) == [0, 1, 2]
    assert zarr.open_group(str(path), mode="r")["values"][:].tolist() == [0] * 6


def test_wrong_stage_is_refused(tmp_path):
    build(tmp_path / "toy.zarr")
    with pytest.raises(PixgenError, match="toy asset, but a fractals asset"):
        assets.open_asset(tmp_path / "toy.zarr", stage="fractals")


def test_foreign_things_are_never_deleted(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(PixgenError, match="not a pixgen asset"):
        make(folder, force=True)
    store = tmp_path / "foreign.zarr"
    zarr.open_group(str(store), mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(PixgenError, match="not a pixgen asset"):
        make(store, force=True)
    assert (folder / "keep.txt").read_text() == "mine" and (store / "x" / "zarr.json").is_file()


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    assert make(tmp_path / "empty.zarr") == [0, 1, 2]


def test_damage_gives_one_line(tmp_path):
    path = tmp_path / "toy.zarr"
    make(path)
    (path / assets.DONE / "zarr.json").unlink()
    with pytest.raises(PixgenError, match="damaged: its _done array") as info:
        make(path)
    assert "\n" not in str(info.value)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(PixgenError, match="damaged: its zarr.json"):
        assets.describe(path)


def test_describe(tmp_path):
    path = tmp_path / "toy.zarr"
    make(path)
    write(path, 0)
    text = assets.describe(path)
    assert "stage:    toy" in text and "complete: False (1/3 units done)" in text
    assert 'config:   {"count":6,"seed":0}' in text
    assert "array:    values (6,) int32 chunks (2,)" in text and "_done" not in text
