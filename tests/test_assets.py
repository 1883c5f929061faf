"""The asset store on its own: build, resume, complete, refuse, lock, recover, and report damage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import zarr

from pixgen import PixgenError, assets


@dataclass(frozen=True)
class Toy:
    count: int = 6
    seed: int = 0


def plan(config=Toy()):
    return assets.Plan("toy", config, {"values": assets.ArraySpec((6,), (2,), "int32", ("sample",))}, units=3)


def work(config=Toy()):
    def unit_writes(unit):
        rows = slice(2 * unit, 2 * unit + 2)
        return {"values": (rows, np.arange(6, dtype=np.int32)[rows] + 10 + config.seed)}

    return unit_writes


def build(path, config=Toy(), force=False):
    return assets.build(path, plan(config), work(config), force=force)


def test_build_resume_and_complete(tmp_path):
    path = tmp_path / "toy.zarr"
    with assets.lock(path):
        assert assets.prepare(path, plan()) == [0, 1, 2]
    assets.write_unit(path, 1, work()(1))
    with pytest.raises(PixgenError, match="incomplete"):
        assets.open_asset(path)
    with assets.lock(path):
        assert assets.prepare(path, plan()) == [0, 2]  # reopened, not recreated: unit 1 stays done
    build(path)
    group = assets.open_asset(path, stage="toy")
    assert group["values"][:].tolist() == [10, 11, 12, 13, 14, 15]
    assert group.attrs["complete"] is True and group.attrs["config"] == {"count": 6, "seed": 0}
    assert group["values"].metadata.dimension_names == ("sample",)


def test_all_units_done_but_not_complete_is_finished_by_a_rerun(tmp_path):
    """The state a kill between the last unit and `complete` leaves: a rerun finishes it."""
    path = tmp_path / "toy.zarr"
    build(path)
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    build(path)
    assert assets.open_asset(path).attrs["complete"] is True


def test_other_config_is_refused_unless_forced(tmp_path):
    path = tmp_path / "toy.zarr"
    build(path)
    with pytest.raises(PixgenError, match="--force"):
        build(path, Toy(seed=1))
    assert assets.open_asset(path).attrs["config"]["seed"] == 0
    build(path, Toy(seed=1), force=True)
    assert assets.open_asset(path)["values"][:].tolist() == [11, 12, 13, 14, 15, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.zarr"]


def test_wrong_stage_is_refused(tmp_path):
    build(tmp_path / "toy.zarr")
    with pytest.raises(PixgenError, match="toy asset, but a fractals asset"):
        assets.open_asset(tmp_path / "toy.zarr", stage="fractals")


def test_foreign_things_are_never_deleted(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(PixgenError, match="not a pixgen asset"):
        build(folder, force=True)
    store = tmp_path / "foreign.zarr"
    zarr.open_group(str(store), mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(PixgenError, match="not a pixgen asset"):
        build(store, force=True)
    assert (folder / "keep.txt").read_text() == "mine" and (store / "x" / "zarr.json").is_file()


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    build(tmp_path / "empty.zarr")
    assert assets.open_asset(tmp_path / "empty.zarr")["values"][0] == 10


def test_damage_gives_one_line(tmp_path):
    path = tmp_path / "toy.zarr"
    with assets.lock(path):
        assets.prepare(path, plan())
    (path / assets.DONE / "zarr.json").unlink()
    with pytest.raises(PixgenError, match="damaged: its _done array") as info:
        build(path)
    assert "\n" not in str(info.value)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(PixgenError, match="damaged: its zarr.json"):
        assets.describe(path)


def test_damaged_chunk_gives_one_line(tmp_path):
    path = tmp_path / "toy.zarr"
    build(path)
    chunk = next(p for p in (path / "values").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    with pytest.raises(PixgenError, match=r"damaged: its array 'values' cannot be read") as info:
        assets.read(assets.open_asset(path), "values")
    assert "\n" not in str(info.value)


def test_describe(tmp_path):
    path = tmp_path / "toy.zarr"
    with assets.lock(path):
        assets.prepare(path, plan())
    assets.write_unit(path, 0, work()(0))
    text = assets.describe(path)
    assert "stage:    toy" in text and "complete: False (1/3 units done)" in text
    assert 'config:   {"count":6,"seed":0}' in text
    assert "array:    values (6,) int32 chunks (2,) (sample)" in text and "_done" not in text


def test_a_second_builder_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "toy.zarr"
    with assets.lock(path):
        # Another process, since flock locks are per open file and a thread would share ours.
        code = f"from pixgen import assets; from pathlib import Path\nwith assets.lock(Path({str(path)!r})): pass"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and f"is being built by pid {os.getpid()}" in result.stderr
    with assets.lock(path):  # released when the holder is done
        pass


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_assets import Toy, build
    build({path!r}, Toy(seed=int(sys.argv[1])), force=True)
    """
)


@pytest.mark.parametrize("point", ["setup", "layout", "unit0", "unit1", "units-done", "finish"])
def test_killed_build_resumes_to_the_same_bytes(tmp_path, point):
    reference = tmp_path / "reference.zarr"
    build(reference)
    path = tmp_path / "toy.zarr"
    script = SCRIPT.format(tests=os.path.dirname(__file__), path=str(path))
    killed = subprocess.run([sys.executable, "-c", script, "0"], env={**os.environ, "PIXGEN_FAULT": point})
    assert killed.returncode == -9
    if path.exists():  # whatever was left is never mistaken for a complete asset
        with pytest.raises(PixgenError, match="incomplete"):
            assets.open_asset(path)
    build(path)
    assert assets.open_asset(path)["values"][:].tolist() == assets.open_asset(reference)["values"][:].tolist()
    assert not any(p.name.endswith((".partial", ".old")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("point", ["layout", "replace", "unit0"])
def test_killed_force_replacement_keeps_or_replaces_never_loses(tmp_path, point):
    path = tmp_path / "toy.zarr"
    build(path)  # seed 0
    script = SCRIPT.format(tests=os.path.dirname(__file__), path=str(path))
    killed = subprocess.run([sys.executable, "-c", script, "1"], env={**os.environ, "PIXGEN_FAULT": point})
    assert killed.returncode == -9
    if point == "unit0":  # the new layout was in place: the rerun resumes the replacement
        build(path, Toy(seed=1))
        assert assets.open_asset(path)["values"][:].tolist() == [11, 12, 13, 14, 15, 16]
    else:  # the old asset is still there, whole, whatever the kill left beside it
        build(path)
        assert assets.open_asset(path)["values"][:].tolist() == [10, 11, 12, 13, 14, 15]
    assert not any(p.name.endswith((".partial", ".old")) for p in tmp_path.iterdir())
