"""Feature visualisation: images drive their channels, are deterministic, resume, refuse bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from conftest import pixgen
from pixgen import PixgenError, assets, data, featvis, methods, models, train

SMALL = dict(count=24, chunk=12, steps=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Trained well enough that most channels can be driven to 5x (2 epochs on 6,000 digits left
    # half the slots moving on, and the run twice as long).
    config = methods.TrainConfig(epochs=3, batch_size=64, train_size=12000, val_size=1000)
    return train.run(config, tmp_path_factory.mktemp("featvis") / "net")


@pytest.fixture(scope="module")
def small_asset(model_dir, tmp_path_factory):
    return featvis.run(featvis.FeatvisConfig(**SMALL), model_dir, tmp_path_factory.mktemp("fv") / "featvis.zarr")


@torch.no_grad()
def channel_activations(model, layer: int, images: np.ndarray) -> torch.Tensor:
    """(N, channels) mean activation of the ReLU at `layer` on uint8 images, by a plain forward pass."""
    x = torch.tensor(images).float().div(255).unsqueeze(1)
    return model[: layer + 1](x).mean((2, 3))


def test_every_image_drives_its_channel(model_dir, small_asset):
    model, _ = models.load(model_dir)
    digits = data.load("mnist", "validation")[0]
    group = assets.open_asset(small_asset, "featvis")
    images, layers, channels = group["images"][:], group["layer"][:].astype(int), group["channel"][:].astype(int)
    ratio = np.empty(len(images))
    for layer in np.unique(layers):
        val_mean = channel_activations(model, layer, digits).mean(0)
        rows = np.flatnonzero(layers == layer)
        own = channel_activations(model, layer, images[rows])[np.arange(len(rows)), channels[rows]]
        ratio[rows] = (own / val_mean[channels[rows]]).numpy()
    # The hair of slack is float32 rounding between featvis's forward pass and this one.
    assert (ratio >= featvis.FeatvisConfig.min_ratio * (1 - 1e-5)).all(), np.round(np.sort(ratio), 2)
    np.testing.assert_allclose(group["ratio"][:], ratio, rtol=1e-5)
    # Targets follow the cycle: most slots keep their own place, the others moved on to a later one.
    pairs = featvis.targets(model)
    moved = np.array([(pairs.index((l, c)) - i) % len(pairs) for i, (l, c) in enumerate(zip(layers, channels))])
    assert (moved == 0).mean() >= 2 / 3, moved


def test_a_threshold_no_channel_reaches_is_one_clear_error(model_dir, tmp_path):
    config = featvis.FeatvisConfig(count=1, steps=2, min_ratio=1e9)
    with pytest.raises(PixgenError, match="no target channel reaches"):
        featvis.run(config, model_dir, tmp_path / "fv.zarr")


def test_images_differ_and_are_not_noise(small_asset):
    images = assets.open_asset(small_asset)["images"][:].astype(float)
    flat = images.reshape(len(images), -1)
    flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-9)
    corr = flat @ flat.T / flat.shape[1]
    assert np.abs(corr[np.triu_indices(len(flat), 1)]).mean() < 0.3
    # Neighbouring pixels agree far more than in noise: structure, not speckle.
    neighbours = np.mean([np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1] for img in images])
    assert neighbours > 0.5


def test_deterministic_and_resumes_to_the_same_bytes(model_dir, small_asset, tmp_path):
    config = featvis.FeatvisConfig(**SMALL)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_asset, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["images"][12:] = 0  # as if the run had been killed before its second chunk
    group[assets.DONE][1] = 0
    group.attrs["complete"] = False
    featvis.run(config, model_dir, copy)
    again = featvis.run(config, model_dir, tmp_path / "again.zarr")
    want = assets.open_asset(small_asset)
    for path in (copy, again):
        got = assets.open_asset(path)
        for name in ("images", "layer", "channel", "objective", "ratio"):
            assert np.array_equal(got[name][:], want[name][:]), (path, name)


def test_cli_writes_and_second_run_is_a_no_op(model_dir, tmp_path):
    out = tmp_path / "fv.zarr"
    # Five steps cannot reach 5x; the threshold is tested above, and here would only cost redraws.
    args = ["featvis", "--model", model_dir, "--out", out, "--count", "4", "--steps", "5", "--seed", "1", "--min-ratio", "0"]
    pixgen(*args)
    assert assets.open_asset(out)["images"].shape == (4, 28, 28)
    assert "nothing to do" in pixgen(*args).stderr
    with pytest.raises(PixgenError, match="--force"):
        featvis.run(featvis.FeatvisConfig(count=4, steps=5, seed=2), model_dir, out)


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("missing", [], "does not exist"),
        ("other", [], "not a pixgen model"),
        ("net", ["--count", "0"], "Invalid value for '--count'"),
    ],
)
def test_bad_inputs_are_one_clear_line(model_dir, tmp_path, model, extra, message):
    folder = {"missing": tmp_path / "nope", "other": tmp_path, "net": model_dir}[model]
    (tmp_path / "meta.json").write_text('{"something": "else"}')
    proc = pixgen("featvis", "--model", folder, "--out", tmp_path / "fv.zarr", *extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert sum(line.startswith("Error:") for line in proc.stderr.splitlines()) == 1
