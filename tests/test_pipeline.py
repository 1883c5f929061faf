"""Pipelines: the smoke study end to end, caching (a second run does nothing; a config change reruns
exactly the stages downstream of it), resuming after a failed stage, and bad pipeline files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, done_units, pixgen
from pixgen import PixgenError, assets, pipeline

SMOKE = REPO / "pipelines" / "smoke.yaml"


def ran(proc) -> list[str]:
    """Names of the stages a `pixgen run` actually ran, from its progress lines."""
    return [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("[") and ": running " in line]


def mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file() and p.name != pipeline.STATE}


# Runs compared with a parallel one use one torch thread per process, as docs/pipelines.md says for
# --jobs: two stages of two threads each on 2 cores ran the cluster test 2× slower in CI. The
# serial reference runs so too, since torch's bytes depend on its thread count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("smoke")
    return root, pixgen("run", SMOKE, "--root", root, env=ONE_THREAD)


def test_smoke_pipeline_runs_every_stage_in_order(smoke):
    root, proc = smoke
    stages = [s.name for s in pipeline.load(SMOKE)]
    assert ran(proc) == stages
    state = json.loads((root / pipeline.STATE).read_text())["stages"]
    assert set(state) == set(stages)
    assert stages.index("shards") > max(stages.index("fractals"), stages.index("featvis"))
    for name in ("standard", "pixmix", "primal", "dual"):
        result = dict(assets.open_asset(root / f"eval-{name}.zarr", stage="evaluate").attrs)
        assert set(result["defenses"]) == {"none", "dent"}
        assert result["model"]["path"].endswith(name)
    assert "certify" in assets.open_asset(root / "eval-dual.zarr").attrs["defenses"]["none"]
    assert json.loads((root / "pixmix" / "meta.json").read_text())["shards"]
    summary = (root / "report" / "summary.md").read_text()
    assert all(f"| {name} (" in summary for name in ("standard", "pixmix", "primal", "dual", "ibp"))
    assert (root / "report" / "index.html").stat().st_size > 0


def test_second_run_is_a_no_op(smoke):
    root, _ = smoke
    before = mtimes(root)
    proc = pixgen("run", SMOKE, "--root", root)
    assert ran(proc) == []
    assert proc.stderr.count(": cached") == len(pipeline.load(SMOKE))
    assert mtimes(root) == before


def edited(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(SMOKE.read_text())
    edit(doc["stages"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_config_change_reruns_exactly_the_dependent_stages(smoke, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke[0], root)
    before = mtimes(root)
    path = edited(tmp_path, lambda s: s["shards"]["with"].update(seed=7))
    assert ran(pixgen("run", path, "--root", root)) == ["shards", "pixmix", "eval-pixmix", "report"]
    after = mtimes(root)
    changed = {name.split("/")[0] for name in after if after[name] != before.get(name)}
    assert changed == {"shards.zarr", "pixmix", "eval-pixmix.zarr", "report"}
    assert ran(pixgen("run", path, "--root", root)) == []


def test_failed_stage_stops_the_run_and_a_rerun_continues_from_it(tmp_path):
    doc = {
        "stages": {
            "fractals": {"run": "fractals", "with": {"count": 16, "points": 2000, "chunk": 8}},
            "shards": {"run": "augment", "from": {"mixing": "fractals"}, "with": {"train-size": 100, "chunk": 50, "ops": "rotate,bogus"}},
        }
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    root = tmp_path / "root"
    proc = pixgen("run", path, "--root", root, check=False)
    assert proc.returncode != 0
    assert "stage 'shards' (pixgen augment) failed" in proc.stderr.splitlines()[-1]
    assert list(json.loads((root / pipeline.STATE).read_text())["stages"]) == ["fractals"]
    doc["stages"]["shards"]["with"]["ops"] = "rotate"
    path.write_text(yaml.safe_dump(doc))
    proc = pixgen("run", path, "--root", root)
    assert ran(proc) == ["shards"]
    assert "fractals (fractals): cached" in proc.stderr


BAD = {
    "unknown stage command": ({"a": {"run": "bake"}}, "unknown stage command 'bake'"),
    "missing input": ({"a": {"run": "train", "from": {"shards": "nowhere"}}}, "reads --shards from 'nowhere', which is not a stage"),
    "cycle": (
        {"a": {"run": "featvis", "from": {"model": "b"}}, "b": {"run": "train", "from": {"shards": "a"}}},
        "the stages a, b depend on each other in a cycle",
    ),
    "unknown option": ({"a": {"run": "fractals", "with": {"colour": "red"}}}, "has no option --colour"),
    "reserved option": ({"a": {"run": "fractals", "with": {"out": "x.zarr"}}}, "has no option --out"),
    "bad stage shape": ({"a": ["fractals"]}, "must be a mapping with keys run, with"),
    "bad option value": ({"a": {"run": "fractals", "with": {"count": 0}}}, "stage 'a': Invalid value for '--count': 0 is not in the range x>=1"),
    "list for one value": ({"a": {"run": "fractals", "with": {"count": [1, 2]}}}, "--count takes one value, got [1, 2]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_files_are_refused_with_one_line(case, tmp_path):
    stages, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(PixgenError, match="^" + str(path).replace(".", r"\.")) as err:
        pipeline.load(path)
    assert message in str(err.value)


def test_cli_bad_pipeline_exits_non_zero_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [fractals\n")
    proc = pixgen("run", path, "--root", tmp_path / "root", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "is not valid YAML" in proc.stderr
    assert not (tmp_path / "root").exists()
    missing = pixgen("run", tmp_path / "none.yaml", check=False)
    assert missing.returncode == 1 and "cannot read pipeline" in missing.stderr


@pytest.mark.parametrize("name", ["smoke", "smoke-fashion", "mnist", "paper", "claim"])
def test_shipped_pipelines_are_valid(name):
    stages = pipeline.load(REPO / "pipelines" / f"{name}.yaml")
    assert stages[-1].command == "report"
    reported = {name for s in stages if s.command == "report" for name in s.inputs["eval"]}
    assert {s.name for s in stages if s.command == "evaluate"} <= reported  # no evaluation left out of every report
    assert len({s.key for s in stages}) == len(stages)


def test_a_killed_run_takes_its_stage_with_it_and_a_rerun_finishes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    doc = {"stages": {"fractals": {"run": "fractals", "with": {"count": 400, "chunk": 8, "points": 200000, "workers": 1}}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    root = tmp_path / "root"
    run = subprocess.Popen([sys.executable, "-m", "pixgen", "run", str(path), "--root", str(root)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    lock, deadline = root / ".fractals.zarr.lock", time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid ") and done_units(root / "fractals.zarr")):
        assert run.poll() is None and time.monotonic() < deadline, "the stage never got going"
        time.sleep(0.05)
    stage = int(lock.read_text().split()[1])
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 30
    stat = Path(f"/proc/{stage}/stat")
    # The stage dies with its pipeline: gone, or a zombie that nobody has reaped yet.
    while stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, f"stage process {stage} outlived the killed pipeline"
        time.sleep(0.05)
    proc = pixgen("run", path, "--root", root)
    assert ran(proc) == ["fractals"] and "resuming" in proc.stderr
    assert assets.open_asset(root / "fractals.zarr").attrs["complete"] is True


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_fashion_mnist(tmp_path):
    """The dataset flows from --dataset to the models, the shards, the corrupted set and the
    evaluations, whose natural OOD set is then MNIST."""
    root = tmp_path / "root"
    pixgen("run", REPO / "pipelines" / "smoke-fashion.yaml", "--root", root)
    for name in ("standard", "pixmix"):
        assert json.loads((root / name / "meta.json").read_text())["dataset"] == "fashion-mnist"
        result = dict(assets.open_asset(root / f"eval-{name}.zarr", stage="evaluate").attrs)
        assert result["model"]["dataset"] == result["data"]["dataset"] == "fashion-mnist"
        assert set(result["defenses"]["none"]["ood"]) == {"mnist", "uniform", "gaussian", "bernoulli", "blobs", "inverted", "blended"}
        assert "fashion-mnist-test" in assets.open_asset(root / f"eval-{name}.zarr").attrs["inputs"]
    assert assets.open_asset(root / "shards.zarr").attrs["config"]["dataset"] == "fashion-mnist"
    assert "fashion-mnist-test" in assets.open_asset(root / "fashion-mnist-c.zarr").attrs["inputs"]
    assert "fashion-mnist-test" in assets.open_asset(root / "cert-standard-ibp.zarr", stage="certify").attrs["inputs"]
    assert "| standard (standard) | none |" in (root / "report" / "summary.md").read_text()


MATRIX = {
    "stages": {
        "fractals": {"run": "fractals", "with": {"count": 16, "chunk": 8, "points": 5000}},
        "net": {"run": "train", "matrix": {"seed": [0, 1]}, "with": {"epochs": 1, "train-size": 200, "val-size": 100}},
        "eval": {"run": "evaluate", "from": {"model": "net"}, "with": {"suite": "clean", "attack": ["fgsm=0,0.1"], "test-size": 100, "attack-size": 20}},
        "first": {"run": "evaluate", "from": {"model": "net.seed-0"}, "with": {"suite": "clean", "attack": "none", "test-size": 50}},
        "report": {"run": "report", "from": {"eval": ["eval", "first"], "fractals": "fractals"}},
    }
}


def test_a_matrix_stage_expands_into_members_and_its_readers_follow(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(MATRIX))
    stages = {s.name: s for s in pipeline.load(path)}
    assert list(stages) == ["fractals", "net.seed-0", "net.seed-1", "eval.seed-0", "eval.seed-1", "first", "report"]
    assert stages["net.seed-1"].options["seed"] == 1 and stages["eval.seed-1"].inputs == {"model": ["net.seed-1"]}
    assert stages["first"].inputs == {"model": ["net.seed-0"]}  # one member, named
    assert stages["report"].inputs["eval"] == ["eval.seed-0", "eval.seed-1", "first"]  # the whole family
    assert len({s.key for s in stages.values()}) == len(stages)
    doc = yaml.safe_load(path.read_text())
    doc["stages"]["net"]["matrix"]["seed"] = [0, 2]
    path.write_text(yaml.safe_dump(doc))
    changed = {s.name: s.key for s in pipeline.load(path)}
    assert changed["net.seed-0"] == stages["net.seed-0"].key and changed["eval.seed-0"] == stages["eval.seed-0"].key
    assert "net.seed-2" in changed and changed["report"] != stages["report"].key


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["net"].update(matrix={"seed": 3}), "matrix --seed must be a non-empty list of single values"),
        (lambda s: s["net"].update(matrix={"colour": ["red"]}), "has no option --colour a pipeline may set"),
        (lambda s: s["first"].update({"from": {"model": ["net.seed-0", "net.seed-1"]}}), "--model takes one stage's output"),
        (lambda s: s["first"].update({"from": {"model": "net.seed-9"}}), "reads --model from 'net.seed-9', which is not a stage"),
    ],
)
def test_bad_matrices_are_refused_with_one_line(tmp_path, edit, message):
    doc = yaml.safe_load(yaml.safe_dump(MATRIX))
    edit(doc["stages"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PixgenError, match=re.escape(message)):
        pipeline.load(path)


def contents(root: Path) -> dict:
    """Every array of every asset and every model's weights, by file (the report's pictures aside,
    and the certify assets' per-digit wall-clock `seconds`)."""
    import torch
    import zarr

    out = {}
    for group in root.glob("*.zarr"):
        g = zarr.open_group(str(group), mode="r")
        out |= {f"{group.name}/{k}": g[k][:].tobytes() for k in g.array_keys() if k != "seconds"}
    for weights in root.glob("*/state_dict.pt"):
        out |= {f"{weights.parent.name}/{k}": v.numpy().tobytes() for k, v in torch.load(weights, weights_only=True).items()}
    return out


@pytest.mark.slow
def test_jobs_2_gives_what_a_serial_run_gives(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(MATRIX))
    serial = pixgen("run", path, "--root", tmp_path / "serial", env=ONE_THREAD)
    parallel = pixgen("run", path, "--root", tmp_path / "parallel", "--jobs", "2", env=ONE_THREAD)
    assert sorted(ran(serial)) == sorted(ran(parallel)) and len(ran(parallel)) == 7
    assert contents(tmp_path / "serial") == contents(tmp_path / "parallel") != {}
    assert ran(pixgen("run", path, "--root", tmp_path / "parallel", "--jobs", "2")) == []


@pytest.mark.slow
def test_the_smoke_pipeline_on_a_cluster_gives_what_a_serial_run_gives(smoke, tmp_path, cluster_address):
    """--scheduler on a local cluster of 2 worker processes, --jobs 2: two stages at a time, each a
    process on a worker; the same outputs, keys and resumes as the serial run."""
    root = tmp_path / "cluster"
    extra = ["--scheduler", cluster_address, "--jobs", "2"]
    parallel = pixgen("run", SMOKE, "--root", root, *extra, env=ONE_THREAD)
    assert sorted(ran(parallel)) == sorted(ran(smoke[1])) and len(ran(parallel)) > 20
    ours, serial = contents(root), contents(smoke[0])
    assert sorted(ours) == sorted(serial) and serial
    assert [k for k in serial if ours[k] != serial[k]] == []  # names only: a diff of the bytes takes minutes
    assert ran(pixgen("run", SMOKE, "--root", root, *extra)) == []
