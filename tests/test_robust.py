"""PixMix, primal (pgd) and dual training: each learns by its own measure on a small slice, the
certificate is sound, a killed pgd run resumes bit for bit, and bad inputs are one clear line.

Sizes are tiny because the dual bound costs 50–350× a plain step: ε is small so that a few dozen
steps already move the certified fraction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import pixgen
from pixgen import assets, attacks, augment, bounds, methods, models, train
from pixgen.cli import cli
from test_train import _kill_after_first_epoch, _weights

SHARDS = augment.AugmentConfig(epochs=2, seed=0, chunk=500, train_size=1000)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robust")


def _asset(path: Path, stage: str, arrays: dict[str, np.ndarray], inputs: dict | None = None) -> Path:
    return assets.save_arrays(path, stage, {"made_by": "test"}, arrays, inputs=inputs)


@pytest.fixture(scope="module")
def shards(tmp) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    mixing = _asset(tmp / "mixing.zarr", "fractals", {"images": noise})
    return augment.run(SHARDS, [mixing], tmp / "shards.zarr", workers=1)


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def test_pixmix_learns_from_the_shards_and_records_them(tmp, shards, capsys):
    config = methods.TrainConfig(method="pixmix", epochs=3, batch_size=32, lr=5e-3, train_size=1000, val_size=500)
    meta = _meta(train.run(config, tmp / "pixmix", shards=shards))
    assert meta["val_accuracy"] > 0.6  # from 0.1 untrained, on digits it never saw clean
    assert meta["shards"] == assets.asset_id(dict(assets.open_asset(shards).attrs))
    assert len(meta["history"]) == 3 and "epoch 3: reusing shard epoch 0" in capsys.readouterr().err


def _pgd_accuracy(model, test, eps):
    x, y = methods.sample(test, 200)
    return methods.pgd_accuracy(model, x, y, eps)


def test_pgd_training_raises_pgd_accuracy(tmp):
    config = methods.TrainConfig(method="pgd", epochs=1, batch_size=32, lr=5e-3, eps=0.1, attack_steps=3, train_size=2000, val_size=200)
    meta = _meta(train.run(config, tmp / "pgd"))
    torch.manual_seed(config.seed)
    untrained = models.build("wk-small")
    test = train.to_tensors(*train.load_split("test", 200, None), torch.device("cpu"))
    before = _pgd_accuracy(untrained, test, 0.1)
    record = meta["history"][0]
    assert (meta["eps"], record["pgd40_count"]) == (0.1, 200)
    assert record["pgd40_accuracy"] > before + 0.2, (before, record)


def test_fgsm_rs_step_size_default_and_batchnorm_training_mode(tmp):
    config = methods.TrainConfig(method="pgd", epochs=1, attack="fgsm-rs")
    assert (config.step_size, config.eps, config.ramp_epochs) == (1.0, 0.3, 0.5)
    model = models.build("wk-small-bn").train()
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    step = methods.Step(config, epoch=0, index=10, total=10)
    loss, _ = methods.adversarial_loss(model, x, y, step)
    assert model.training and loss.requires_grad  # torchattacks left eval mode behind


def test_eps_ramps_linearly_then_holds():
    config = methods.TrainConfig(method="dual", epochs=4, eps=0.1, eps_start=0.02, ramp_epochs=2)
    eps = [methods.current_eps(methods.Step(config, 0, i, 400)) for i in (0, 50, 100, 200, 399)]
    assert eps == pytest.approx([0.02, 0.04, 0.06, 0.1, 0.1])


@pytest.fixture(scope="module")
def dual_model(tmp) -> tuple[Path, dict]:
    # ε 0.01 keeps the bound close to the logits, so 40 steps already certify digits.
    config = methods.TrainConfig(method="dual", epochs=1, batch_size=20, lr=5e-3, eps=0.01, eps_start=0.01, train_size=800, val_size=100, certify_size=100)
    return train.run(config, tmp / "dual"), config


def test_dual_training_certifies_digits(dual_model):
    folder, config = dual_model
    meta = _meta(folder)
    assert meta["certify"]["count"] == 100 and meta["eps"] == 0.01
    assert meta["certify"]["certified_accuracy"] > 0.2  # untrained: none certified at any ε > 0 (here 0.29-0.3)
    assert meta["certify"]["certified_accuracy"] <= meta["certify"]["clean_accuracy"]
    assert meta["history"][0]["loss"] < math.log(10)


def test_certificate_is_sound_against_pgd_with_restarts(dual_model):
    model, _ = models.load(dual_model[0])
    x, y = methods.sample(train.to_tensors(*train.load_split("test", 100, None), torch.device("cpu")), 30)
    eps = 0.03  # beyond the training ε, so some digits are certified and some are not
    proved = bounds.dual_certified(model, x, y, eps)
    assert 0 < int(proved.sum()) < len(y)
    for restart in range(5):
        adversarial = attacks.build("pgd", model, eps, seed=restart)(x, y)
        assert (adversarial - x).abs().max() <= eps + 1e-6
        fooled = model(adversarial).argmax(1) != y
        assert not (fooled & proved).any()


def test_pgd_resume_after_sigkill_gives_the_same_weights(tmp):
    killed, whole = tmp / "killed", tmp / "whole"
    # 3 epochs: the last two (≈ 0.3 s each) leave the poll time to kill the run before it ends
    args = ["train", "--method", "pgd", "--epochs", "3", "--eps", "0.1", "--attack-steps", "2", "--train-size", "400", "--val-size", "50", "--batch-size", "50"]
    _kill_after_first_epoch([*args, "--out", killed])
    assert not _meta(killed)["complete"], "the run ended before it was killed"
    assert "resuming" in pixgen(*args, "--out", killed).stderr
    pixgen(*args, "--out", whole)
    a, b = _weights(killed), _weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(_meta(killed)["history"]) == strip(_meta(whole)["history"])


@pytest.fixture(scope="module")
def foreign_shards(tmp) -> dict[str, Path]:
    images = np.zeros((1, 20, 28, 28), np.uint8)
    labels = np.zeros(20, np.int64)
    return {
        "other-data": _asset(tmp / "other.zarr", "augment", {"images": images, "labels": labels}, {"mnist-train": "0123456789abcdef"}),
        "shape": _asset(tmp / "shape.zarr", "augment", {"images": np.zeros((1, 20, 32, 32), np.uint8), "labels": labels}),
        "stage": _asset(tmp / "stage.zarr", "fractals", {"images": images[0]}),
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "pixmix"], "needs --shards"),
        (["--method", "pixmix", "--shards", "{other-data}"], "not built from this run's mnist training images"),
        (["--method", "pixmix", "--shards", "{shape}"], "(epochs, N, 28, 28) uint8"),
        (["--method", "pixmix", "--shards", "{stage}"], "a augment asset is needed"),
        (["--method", "pgd", "--eps", "1.5"], "1.5 is not in the range 0<=x<=1"),
        (["--method", "dual", "--eps", "0.1", "--eps-start", "0.2"], "0 <= eps-start <= eps"),
        (["--method", "dual", "--arch", "madry-cnn"], "cannot bound the MaxPool2d layer"),
        (["--method", "dual", "--arch", "wk-small-bn"], "cannot bound the BatchNorm2d layer"),
        (["--method", "standard", "--eps", "0.1"], "--eps do not apply to method standard"),
        (["--method", "pgd", "--projections", "5"], "--projections do not apply to method pgd"),
        (["--method", "pgd", "--attack", "fgsm-rs", "--attack-steps", "3"], "--attack-steps applies to --attack pgd"),
    ],
)
def test_bad_inputs_are_one_clear_line(tmp, foreign_shards, extra, message):
    extra = [arg.format(**foreign_shards) for arg in extra]
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp / "bad"), "--train-size", "100", "--val-size", "100", *extra])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp / "bad").exists()
