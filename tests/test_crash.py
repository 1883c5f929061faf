"""Nothing lost: every stage, killed (SIGKILL, through PIXGEN_FAULT) at each point of its build --
in setup before anything is written, with its layout half-made, after its first unit, after its
last unit but before `complete`, and in the middle of a training save -- resumes on the same
command to the bytes of an uninterrupted run, and never leaves anything that looks complete.

Sizes are tiny: the point is the kill points, not the work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray
import zarr

from conftest import pixgen

# Each stage's command, sized to a few units. Arrays that hold wall-clock times are left out of
# the byte comparison (certify's `seconds`), and so are the attributes derived from them.
STAGES = {
    "fractals": ["fractals", "--count", "24", "--chunk", "8", "--points", "5000", "--workers", "1"],
    "augment": ["augment", "--mixing", "{fractals}", "--epochs", "2", "--train-size", "200", "--chunk", "100", "--workers", "1"],
    "corrupt": ["corrupt", "--count", "20"],
    "featvis": ["featvis", "--model", "{model}", "--count", "4", "--steps", "4", "--min-ratio", "0"],
    "certify": ["certify", "--model", "{model}", "--method", "ibp", "--eps", "0.05", "--count", "20", "--chunk", "10"],
    "evaluate": ["evaluate", "--model", "{model}", "--suite", "clean,ood", "--attack", "fgsm=0,0.1", "--test-size", "50", "--attack-size", "20"],
}
TIMINGS = {"seconds", "seconds_per_digit"}  # and an evaluation's `seconds` attribute
POINTS = ["setup", "layout", "unit0", "units-done"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crash-inputs")
    fractals = root / "fractals.zarr"
    pixgen(*STAGES["fractals"], "--out", fractals)
    model = root / "model"
    pixgen("train", "--epochs", "1", "--train-size", "300", "--val-size", "100", "--out", model)
    return {"fractals": str(fractals), "model": str(model)}


def command(stage: str, inputs: dict, out: Path) -> list[str]:
    return [arg.format(**inputs) for arg in STAGES[stage]] + ["--out", str(out)]


def contents(path: Path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    arrays = {name: group[name][:].tobytes() for name in group.array_keys() if name not in TIMINGS}
    attrs = {k: v for k, v in group.attrs.items() if k not in TIMINGS}
    return {"arrays": arrays, "attrs": attrs}


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted build of every stage."""
    root = tmp_path_factory.mktemp("crash-references")
    out = {}
    for stage in STAGES:
        out[stage] = root / f"{stage}.zarr"
        pixgen(*command(stage, inputs, out[stage]))
    return out


@pytest.fixture(scope="module")
def references(built) -> dict[str, dict]:
    return {stage: contents(path) for stage, path in built.items()}


def test_every_asset_opens_in_xarray_as_a_labelled_dataset(built):
    for stage, path in built.items():
        ds = xarray.open_zarr(path, consolidated=False)
        assert ds.attrs["stage"] == stage and ds.attrs["complete"] is True
        assert "sample" in ds[next(name for name in ("images", "bounds", "none_probs") if name in ds)].dims
    shards = xarray.open_zarr(built["augment"], consolidated=False)
    assert shards["images"].dims == ("epoch", "sample", "y", "x") and shards.sizes["epoch"] == 2


# Setup, layout and units-done are points of the build loop every stage shares (pixgen.assets):
# all four on the stage with the most arrays (evaluate) and the one built by Dask (augment); after
# the first unit, where a stage's own resume is tested, on every stage.
KILLS = [(stage, point) for stage in STAGES for point in (POINTS if stage in ("evaluate", "augment") else ["unit0"])]


@pytest.mark.slow
@pytest.mark.parametrize("stage, point", KILLS)
def test_a_killed_stage_resumes_to_the_same_bytes(stage, point, inputs, references, tmp_path):
    path = tmp_path / f"{stage}.zarr"
    killed = pixgen(*command(stage, inputs, path), env={"PIXGEN_FAULT": point}, check=False)
    assert killed.returncode == -9, killed.stderr
    if path.exists():  # what the kill left is never mistaken for a complete asset
        assert json.loads((path / "zarr.json").read_text())["attributes"]["complete"] is False
        assert "incomplete" in pixgen("info", path, check=False).stdout + pixgen("grid", path, "--out", tmp_path / "g.png", check=False).stderr
    pixgen(*command(stage, inputs, path))
    assert contents(path) == references[stage]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock, staging or old copy left


@pytest.mark.slow
def test_a_killed_worker_process_stops_the_build_in_one_line_and_it_resumes(inputs, references, tmp_path):
    """With 2 workers the first unit runs in the parent and the rest in forked processes: unit 2
    (of 4) dies in a worker, so the parent, not killed, must say so and exit non-zero."""
    path = tmp_path / "augment.zarr"
    two = command("augment", inputs, path)
    two[two.index("--workers") + 1] = "2"
    killed = pixgen(*two, env={"PIXGEN_FAULT": "unit2"}, check=False)
    assert killed.returncode == 1 and "a worker process building" in killed.stderr.strip().splitlines()[-1]
    assert json.loads((path / "zarr.json").read_text())["attributes"]["complete"] is False
    pixgen(*two)
    assert contents(path) == references["augment"]


TRAIN = ["train", "--method", "pgd", "--epochs", "2", "--batch-size", "50", "--train-size", "200", "--val-size", "50", "--attack-steps", "2"]


def weights(folder: Path) -> dict:
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    meta = json.loads((folder / "meta.json").read_text())
    history = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in meta["history"]]
    return {"weights": {k: v.numpy().tobytes() for k, v in state.items()}, "history": history, "complete": meta["complete"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("crash-train") / "model"
    pixgen(*TRAIN, "--out", out)
    return weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["layout", "weights", "checkpoint"])
def test_a_killed_training_resumes_to_the_same_weights(point, trained, tmp_path):
    out = tmp_path / "model"
    killed = pixgen(*TRAIN, "--out", out, env={"PIXGEN_FAULT": point}, check=False)
    assert killed.returncode == -9, killed.stderr
    if out.exists():
        assert json.loads((out / "meta.json").read_text())["complete"] is False
    pixgen(*TRAIN, "--out", out)
    assert weights(out) == trained
    assert not (out / "checkpoint.pt").exists() and not list(tmp_path.glob(".model.partial"))


def test_a_second_build_of_the_same_asset_is_refused_in_one_line(inputs, tmp_path):
    import fcntl

    path = tmp_path / "fractals.zarr"
    with open(tmp_path / ".fractals.zarr.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 12345")
        lock.flush()
        proc = pixgen(*command("fractals", inputs, path), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is being built by pid 12345" in proc.stderr
    assert not path.exists()
    assert np.asarray(zarr.open_group(inputs["fractals"], mode="r")["images"][:]).shape == (24, 28, 28)
