"""The fractal stage: IFS sampling, rendering, the degeneracy rule, determinism, resume and the CLI."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pixgen import fractals
from pixgen.fractals import FractalConfig

from conftest import done_units, pixgen

SMALL = dict(count=40, chunk=16, points=20_000)
CLI_SMALL = ["--count", "40", "--chunk", "16", "--points", "20000"]


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("images", "systems", "nmaps")}


def assert_same_bytes(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    for name in left:
        assert left[name].tobytes() == right[name].tobytes(), f"{name} differs between {a} and {b}"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fractals") / "fractals.zarr"
    pixgen("fractals", "--out", out, *CLI_SMALL, "--workers", "2")
    return out


# --- sampling ---------------------------------------------------------------------------------


def test_systems_follow_the_sigma_factor_rule():
    maps, nmaps = fractals.sample_systems(np.random.default_rng(3), 500)
    assert set(np.unique(nmaps)) == {2, 3, 4}
    singular = np.linalg.svd(maps[..., :2], compute_uv=False)  # (500, 4, 2), descending
    assert singular.max() <= 1 + 1e-12
    alpha = (singular[..., 0] + 2 * singular[..., 1]).sum(axis=1)
    assert np.all(alpha >= (5 + nmaps) / 2 - 1e-9) and np.all(alpha <= (6 + nmaps) / 2 + 1e-9)
    unused = np.arange(4)[None, :] >= nmaps[:, None]
    assert np.all(maps[unused] == 0)
    used_shift = maps[~unused][:, :, 2]
    assert np.all(np.abs(used_shift) <= 1) and used_shift.std() > 0.4  # U(-1, 1) has std 0.577


# --- the degeneracy rule, on systems whose attractors are known -----------------------------------


def system(*maps: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((1, 4, 2, 3))
    out[0, : len(maps)] = maps
    return out, np.array([len(maps)])


def render_known(maps, nmaps) -> np.ndarray:
    return fractals.render(maps, nmaps, FractalConfig(points=50_000))


def test_sierpinski_triangle_is_usable():
    image = render_known(*system([[0.5, 0, 0], [0, 0.5, 0]], [[0.5, 0, 0.5], [0, 0.5, 0]], [[0.5, 0, 0.25], [0, 0.5, 0.5]]))
    assert fractals.usable(image).all()
    lit = (image[0] >= fractals.LIT_LEVEL).mean()
    assert 0.2 < lit < 0.5  # a triangle with holes: about a third of the square


def test_filled_square_is_rejected_as_a_blob():
    quarters = [[[0.5, 0, x], [0, 0.5, y]] for x in (0, 0.5) for y in (0, 0.5)]
    assert not fractals.usable(render_known(*system(*quarters))).any()


def test_segment_is_rejected_as_a_line():
    # Both maps squash onto the diagonal: the attractor is a segment.
    image = render_known(*system([[0.25, 0.25, 0], [0.25, 0.25, 0]], [[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
    assert (image[0] >= fractals.LIT_LEVEL).sum() > 10  # it is drawn, not empty
    assert not fractals.usable(image).any()


# --- the stage ----------------------------------------------------------------------------------


def test_same_seed_same_bytes_for_1_and_2_workers(tmp_path):
    config = FractalConfig(**SMALL)
    fractals.run(config, tmp_path / "one.zarr", workers=1)
    fractals.run(config, tmp_path / "two.zarr", workers=2)
    assert_same_bytes(tmp_path / "one.zarr", tmp_path / "two.zarr")
    fractals.run(FractalConfig(**{**SMALL, "seed": 1}), tmp_path / "other.zarr", workers=2)
    assert not np.array_equal(arrays(tmp_path / "one.zarr")["images"], arrays(tmp_path / "other.zarr")["images"])


def test_images_are_neither_blank_nor_saturated(built):
    images = arrays(built)["images"]
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert np.all(images.max(axis=(1, 2)) == 255)  # full scale
    lit = (images >= fractals.LIT_LEVEL).mean(axis=(1, 2))
    assert np.all(lit >= fractals.MIN_COVERAGE) and np.all(lit <= fractals.MAX_COVERAGE)
    assert np.all((images == 255).mean(axis=(1, 2)) < 0.2)
    assert len({image.tobytes() for image in images}) == len(images)


def test_stored_system_rerenders_to_stored_image(built):
    stored = arrays(built)
    for i in (0, 17, 39):
        assert np.array_equal(fractals.rerender(built, i), stored["images"][i])
    # and from the bare code, rendered alone (not in the chunk it was made with)
    config = FractalConfig(**SMALL)
    assert np.array_equal(fractals.render(stored["systems"][5], stored["nmaps"][5:6], config)[0], stored["images"][5])


def test_info_describes_the_asset(built):
    text = pixgen("info", built).stdout
    assert "stage:    fractals" in text
    assert "complete: True (3/3 units done)" in text
    assert '"count":40' in text and '"points":20000' in text
    assert "images (40, 28, 28) uint8 chunks (16, 28, 28)" in text
    assert "systems (40, 4, 2, 3) float64" in text and "nmaps (40,) uint8" in text


def test_rerun_of_complete_asset_is_a_no_op(built):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}
    proc = pixgen("fractals", "--out", built, *CLI_SMALL)
    assert "nothing to do" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before


def test_config_change_needs_force(built, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(built, out)
    changed = ["--count", "40", "--chunk", "16", "--points", "10000"]
    lines = error_lines(pixgen("fractals", "--out", out, *changed, check=False))
    assert len(lines) == 1 and "--force" in lines[0]
    assert_same_bytes(built, out)  # refused means untouched
    pixgen("fractals", "--out", out, *changed, "--force")
    assert '"points":10000' in pixgen("info", out).stdout


def test_resume_after_sigkill_gives_the_same_bytes(tmp_path):
    options = ["--count", "1600", "--chunk", "100", "--points", "50000"]
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "pixgen", "fractals", "--out", str(out), *options, "--workers", "1"])
    deadline = time.monotonic() + 60
    while not done_units(out):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a unit was done"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = zarr.open_array(str(out / "_done"), mode="r")[:]
    assert 0 < done.sum() < len(done), "the kill should land mid-run; make the run longer"
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    kept = {p: p.stat().st_mtime_ns for unit in np.flatnonzero(done) for p in (out / "images" / "c" / str(unit)).rglob("*")}

    assert "output:" in pixgen("fractals", "--out", out, *options, "--workers", "2").stdout
    fractals.run(FractalConfig(count=1600, chunk=100, points=50_000), tmp_path / "whole.zarr", workers=2)
    assert_same_bytes(out, tmp_path / "whole.zarr")
    assert kept and {p: p.stat().st_mtime_ns for p in kept} == kept  # done units were not redone


def damaged(tmp_path: Path) -> Path:
    out = tmp_path / "damaged.zarr"
    out.mkdir()
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    return out


def foreign(tmp_path: Path) -> Path:
    out = tmp_path / "foreign.zarr"
    zarr.open_group(str(out), mode="w").create_array("x", shape=(3,), dtype="uint8")
    return out


def file_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("")
    return tmp_path / "a_file" / "fractals.zarr"


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--count", "0"], "--count"),
        (["--size", "4"], "--size"),
        (["--points", "10"], "--points"),
        (["--out", file_in_the_way], "cannot write"),
        (["--out", damaged], "damaged"),
        (["--out", foreign], "not a pixgen asset"),
        (["--out", foreign, "--force"], "not a pixgen asset"),
    ],
)
def test_bad_input_gives_one_error_line(tmp_path, args, expect):
    args = [arg(tmp_path) if callable(arg) else arg for arg in args]
    out = [] if "--out" in args else ["--out", tmp_path / "never.zarr"]
    lines = error_lines(pixgen("fractals", *out, "--count", "16", *args, check=False))
    assert len(lines) == 1 and expect in lines[0], lines
    if "foreign" in str(args):
        assert (tmp_path / "foreign.zarr" / "x").is_dir()  # --force never deletes what is not ours
