"""Every command, given bad input, exits non-zero with one line (no traceback) that says what is
wrong, and changes nothing on disk. In process through click's runner, so the table stays fast;
the exit codes and single lines are what a shell user sees (tests/test_crash.py and the stage
tests check real processes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pixgen import assets, models
from pixgen.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder of inputs: a mixing set, a damaged copy of it, a model, a damaged model, a file."""
    root = tmp_path_factory.mktemp("world")
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    assets.save_arrays(root / "mixing.zarr", "fractals", {"n": 16}, {"images": images}, dims={"images": ("sample", "y", "x")})
    shutil.copytree(root / "mixing.zarr", root / "damaged.zarr")
    chunk = next(p for p in (root / "damaged.zarr" / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not a chunk")
    shutil.copytree(root / "mixing.zarr", root / "bad-meta.zarr")
    (root / "bad-meta.zarr" / "images" / "zarr.json").write_text("{")
    models.save(root / "model", models.build("wk-small"), {"arch": "wk-small", "method": "standard", "config_hash": "0", "complete": True})
    shutil.copytree(root / "model", root / "broken-model")
    (root / "broken-model" / models.WEIGHTS).write_bytes(b"\0" * 10)
    (root / "file").write_text("not a folder")
    return root


CASES = {
    "fractals: count 0": (["fractals", "--count", "0", "--out", "{tmp}/f.zarr"], "0 is not in the range x>=1"),
    "fractals: out under a file": (["fractals", "--count", "8", "--chunk", "8", "--points", "2000", "--out", "{world}/file/f.zarr"], "cannot"),
    "augment: missing mixing set": (["augment", "--mixing", "{tmp}/none.zarr", "--out", "{tmp}/s.zarr"], "does not exist"),
    "augment: damaged mixing chunk": (["augment", "--mixing", "{world}/damaged.zarr", "--train-size", "100", "--chunk", "100", "--workers", "1", "--out", "{tmp}/s.zarr"], "is damaged: its array 'images' cannot be read"),
    "augment: train size beyond the data": (["augment", "--mixing", "{world}/mixing.zarr", "--train-size", "1000000", "--out", "{tmp}/s.zarr"], "the split has 55000"),
    "augment: too many workers": (["augment", "--mixing", "{world}/mixing.zarr", "--workers", "999", "--out", "{tmp}/s.zarr"], "--workers"),
    "augment: unknown dataset": (["augment", "--mixing", "{world}/mixing.zarr", "--dataset", "cifar", "--out", "{tmp}/s.zarr"], "'cifar' is not one of"),
    "train: eps above 1": (["train", "--method", "pgd", "--eps", "2", "--out", "{tmp}/m"], "2.0 is not in the range 0<=x<=1"),
    "train: normalize with one number": (["train", "--normalize", "0.5", "--out", "{tmp}/m"], "--normalize takes MEAN,STD: two finite numbers with STD > 0"),
    "train: normalize with std 0": (["train", "--normalize", "0.5,0", "--out", "{tmp}/m"], "--normalize takes MEAN,STD: two finite numbers with STD > 0"),
    "train: normalize with a negative std": (["train", "--normalize", "0.5,-0.5", "--out", "{tmp}/m"], "got 0.5,-0.5"),
    "train: normalize with nan": (["train", "--normalize", "nan,0.5", "--out", "{tmp}/m"], "two finite numbers"),
    "train: normalize not numbers": (["train", "--normalize", "mean,std", "--out", "{tmp}/m"], "expected MEAN,STD, two numbers"),
    "train: train size beyond the data": (["train", "--train-size", "1000000", "--out", "{tmp}/m"], "the split has 55000"),
    "train: val size beyond the validation digits": (["train", "--val-size", "6000", "--out", "{tmp}/m"], "the split has 5000"),
    "train: out is a file": (["train", "--train-size", "100", "--val-size", "100", "--out", "{world}/file"], "is a file"),
    "corrupt: count beyond the data": (["corrupt", "--count", "1000000", "--out", "{tmp}/c.zarr"], "exceeds the 10000 mnist test images"),
    "featvis: damaged weights": (["featvis", "--model", "{world}/broken-model", "--out", "{tmp}/v.zarr"], "is damaged: its state_dict.pt cannot be loaded"),
    "certify: count beyond the data": (["certify", "--model", "{world}/model", "--eps", "0.1", "--count", "1000000", "--out", "{tmp}/c.zarr"], "the split has 10000"),
    "certify: damaged weights": (["certify", "--model", "{world}/broken-model", "--eps", "0.1", "--out", "{tmp}/c.zarr"], "is damaged"),
    "evaluate: empty ε grid": (["evaluate", "--model", "{world}/model", "--attack", "fgsm=,", "--out", "{tmp}/e.zarr"], "no ε given"),
    "evaluate: decreasing ε grid": (["evaluate", "--model", "{world}/model", "--attack", "fgsm=0.5:0:0.1", "--out", "{tmp}/e.zarr"], "START <= STOP"),
    "evaluate: pixel ε above 1": (["evaluate", "--model", "{world}/model", "--attack", "fgsm=0.5,1.5", "--out", "{tmp}/e.zarr"], "fgsm's ε must be increasing budgets in [0, 1] (pixel units), got 0.5, 1.5"),
    "evaluate: input ε beyond the pixels": (["evaluate", "--model", "{world}/model", "--eps-units", "input", "--attack", "fgsm=1.5", "--out", "{tmp}/e.zarr"], "is 1.5 in pixels (× the network's std 1), beyond the pixel range's 1"),
    "evaluate: unknown ε units": (["evaluate", "--model", "{world}/model", "--eps-units", "std", "--out", "{tmp}/e.zarr"], "Invalid value for '--eps-units'"),
    "certify: input ε beyond the pixels": (["certify", "--model", "{world}/model", "--eps", "1.5", "--eps-units", "input", "--out", "{tmp}/c.zarr"], "beyond the pixel range's 1"),
    "evaluate: damaged weights": (["evaluate", "--model", "{world}/broken-model", "--out", "{tmp}/e.zarr"], "is damaged"),
    "evaluate: model is a file": (["evaluate", "--model", "{world}/file", "--out", "{tmp}/e.zarr"], "is a file, not a model folder"),
    "report: no evaluation": (["report", "--out", "{tmp}/r"], "no evaluation given"),
    "report: damaged mixing set": (["report", "--eval", "{world}/mixing.zarr", "--out", "{tmp}/r"], "is a fractals asset, but a evaluate asset is needed"),
    "info: missing": (["info", "{tmp}/none.zarr"], "does not exist"),
    "info: damaged array metadata": (["info", "{world}/bad-meta.zarr"], "is damaged"),
    "grid: damaged array metadata": (["grid", "{world}/bad-meta.zarr", "--out", "{tmp}/g.png"], "is damaged"),
    "grid: damaged chunk": (["grid", "{world}/damaged.zarr", "--out", "{tmp}/g.png"], "is damaged: its array 'images' cannot be read"),
    "grid: no such array": (["grid", "{world}/mixing.zarr", "--array", "labels", "--out", "{tmp}/g.png"], "has no array 'labels'"),
    "run: missing pipeline": (["run", "{tmp}/none.yaml"], "cannot read pipeline"),
    "run: no scheduler at the address": (["run", str(Path(__file__).parents[1] / "pipelines" / "smoke.yaml"), "--root", "{tmp}/run", "--scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"),
}


def snapshot(*folders: Path) -> dict:
    return {p: p.stat().st_mtime_ns for folder in folders for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, world, tmp_path):
    args, message = CASES[case]
    before = snapshot(world, tmp_path)
    result = CliRunner().invoke(cli, [a.format(world=world, tmp=tmp_path) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert snapshot(world, tmp_path) == before
