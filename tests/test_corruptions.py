"""MNIST-C corruptions on real test digits, the `corrupt` asset and the `pixgen corrupt` command."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image
from skimage import color, transform

from conftest import pixgen
from pixgen import PixgenError, data
from pixgen.cli import cli
from pixgen.corruptions import NAMES, CorruptConfig, corrupt, preview, run

RANDOM = [name for name in NAMES if name not in ("scale", "brightness", "stripe", "canny_edges")]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = data.load("mnist", "test")
    return images[:48]


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).reshape(len(a), -1).any(axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_changes_every_image_and_keeps_shape_and_range(digits, name):
    out = corrupt(digits, name, seed=0)
    assert out.dtype == np.uint8 and out.shape == digits.shape
    assert changed(out, digits).all()
    # Not saturated or blanked: the digit (or its edges) is still there.
    assert 0 < out.mean() < 200 and out.max() > 100


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(digits, name):
    first = corrupt(digits, name, seed=3)
    assert np.array_equal(first, corrupt(digits, name, seed=3))
    if name in RANDOM:
        assert not np.array_equal(first, corrupt(digits, name, seed=4))


def test_exact_ops(digits):
    x = digits.astype(int)
    stripe = corrupt(digits, "stripe").astype(int)
    assert np.array_equal(stripe[:, :, 7:21], x[:, :, 7:21])
    assert np.array_equal(stripe[:, :, :7], 255 - x[:, :, :7]) and np.array_equal(stripe[:, :, 21:], 255 - x[:, :, 21:])
    assert set(np.unique(corrupt(digits, "canny_edges"))) == {0, 255}
    for name in ("dotted_line", "zigzag"):
        assert (corrupt(digits, name).astype(int) >= x).all(), name


def test_brightness_is_the_generators_hsv_round_trip(digits):
    hsv = color.rgb2hsv(color.gray2rgb(digits[:8] / 255.0))
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.5, 0, 1)
    reference = np.rint(np.clip(color.rgb2gray(color.hsv2rgb(hsv)), 0, 1) * 255)
    assert np.abs(corrupt(digits[:8], "brightness").astype(int) - reference).max() <= 1


def test_geometric_ops_match_skimage(digits):
    x = digits[:8] / 255.0
    centre = 13.5 * (1 - 1 / 0.7)
    scaled = [transform.warp(img, transform.AffineTransform(scale=1 / 0.7, translation=(centre, centre))) for img in x]
    assert np.abs(corrupt(digits[:8], "scale").astype(int) - np.rint(np.stack(scaled) * 255)).max() <= 1
    rotated = corrupt(digits[:8], "rotate").astype(int)
    for img, out in zip(x, rotated):
        candidates = [np.rint(transform.rotate(img, sign * np.rad2deg(0.4)) * 255) for sign in (-1, 1)]
        assert min(np.abs(out - c).max() for c in candidates) <= 1


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved dy rows down and dx columns right, zero-filled."""
    padded = np.pad(img, 3)
    return padded[3 - dy : 3 - dy + 28, 3 - dx : 3 - dx + 28]


def test_translate_is_a_3px_shift(digits):
    for img, out in zip(digits, corrupt(digits, "translate")):
        assert any(np.array_equal(out, shifted(img, dy, dx)) for dy in (-3, 3) for dx in (-3, 3))


def test_motion_blur_keeps_the_ink(digits):
    ink = digits.sum(axis=(1, 2), dtype=np.int64)
    blurred = corrupt(digits, "motion_blur").sum(axis=(1, 2), dtype=np.int64)
    change = np.abs(blurred - ink) / ink
    # The blur moves ink and keeps it, up to rounding and digits that touch the border.
    assert np.median(change) < 0.005 and change.max() < 0.05


def test_asset_layout_resume_and_determinism(tmp_path, digits):
    config = CorruptConfig(seed=1, count=20)
    path = run(config, tmp_path / "c.zarr")
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["corruptions"] == list(NAMES) and group.attrs["complete"]
    images, labels, indices = group["images"][:], group["labels"][:], group["indices"][:]
    assert images.shape == (15, 20, 28, 28) and images.dtype == np.uint8
    assert group["images"].chunks == (1, 20, 28, 28)
    clean, test_labels = data.load("mnist", "test")
    assert np.array_equal(labels, test_labels[indices]) and len(set(labels)) == 10
    assert np.array_equal(images[NAMES.index("fog")], corrupt(clean[indices], "fog", seed=1))

    # A killed run: two units undone; the rerun redoes them to the same bytes.
    group = zarr.open_group(str(path), mode="r+")
    group["_done"][3:5] = 0
    group["images"][3:5] = 0
    group.attrs["complete"] = False
    run(config, path)
    assert np.array_equal(zarr.open_group(str(path), mode="r")["images"][:], images)

    subset = run(CorruptConfig(seed=1, count=20, corruptions=("fog", "shear")), tmp_path / "s.zarr")
    sub = zarr.open_group(str(subset), mode="r")["images"][:]
    assert np.array_equal(sub, images[[NAMES.index("fog"), NAMES.index("shear")]])

    png = preview(path, tmp_path / "p.png")
    assert Image.open(png).size[1] > Image.open(png).size[0]  # 16 rows of 12 digits


def test_config_refuses_bad_values():
    with pytest.raises(PixgenError, match="unknown corruption"):
        CorruptConfig(corruptions=("fog", "snow"))
    with pytest.raises(PixgenError, match="positive"):
        CorruptConfig(count=0)


def invoke(*args):
    """The CLI in-process: torch is already imported here, so a run costs no new interpreter."""
    return CliRunner().invoke(cli, ["corrupt", *map(str, args)])


def test_cli_writes_asset_and_preview(tmp_path):
    result = invoke("--out", tmp_path / "m.zarr", "--count", 10, "--preview", tmp_path / "m.png")
    assert result.exit_code == 0 and "wrote" in result.stdout and (tmp_path / "m.png").is_file()
    again = invoke("--out", tmp_path / "m.zarr", "--count", 11)
    assert again.exit_code == 1 and "--force" in again.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_count_zero_is_one_line(tmp_path):
    proc = pixgen("corrupt", "--out", tmp_path / "x.zarr", "--count", 0, check=False)
    assert proc.returncode != 0 and "0 is not in the range x>=1" in one_line(proc.stderr)
    assert not (tmp_path / "x.zarr").exists()


def test_cli_count_above_the_test_split_is_one_line(tmp_path):
    result = invoke("--out", tmp_path / "x.zarr", "--count", 10001)
    assert result.exit_code == 1 and "exceeds" in one_line(result.stderr)


def test_cli_refuses_a_foreign_path_and_leaves_it(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not an asset")
    result = invoke("--out", foreign, "--count", 5, "--force")
    assert result.exit_code == 1 and "not a pixgen asset" in one_line(result.stderr)
    assert (foreign / "notes.txt").read_text() == "not an asset"
