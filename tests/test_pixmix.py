"""Batched PixMix against per-image references: each op against PIL, whole samples against a
per-image implementation of the algorithm, and the draws against their probabilities."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pixgen import PixgenError, data, pixmix

K = 4


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Real digits, plus low-contrast and shifted-range copies so autocontrast and equalize have
    work to do (raw MNIST already spans 0..255)."""
    images = data.load("mnist", "train")[0][:300]
    dim = (images // 3 + 40).astype(np.uint8)
    bright = (255 - images // 4).astype(np.uint8)
    return np.concatenate([images, dim, bright])


@pytest.fixture(scope="module")
def mixing() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (50, 28, 28)).astype(np.uint8)


def _pil(image: np.ndarray, op: str, param: float) -> np.ndarray:
    return np.asarray(pixmix.pil_augment(Image.fromarray(image), op, param))


@pytest.mark.parametrize("op", pixmix.OPS)
def test_each_op_matches_pil(digits, op):
    rng = np.random.default_rng(pixmix.OPS.index(op))
    draws = pixmix.draw(rng, len(digits), 1, ops=(op,))
    param = draws.param[:, 0]
    # Also the extremes of severity 10, beyond the defaults, to exercise the edges.
    param[:20] = pixmix.draw(rng, 20, 1, ops=(op,), severity=10).param[:, 0]
    ours = pixmix.augment(digits, np.full(len(digits), pixmix.OPS.index(op)), param)
    reference = np.stack([_pil(img, op, p) for img, p in zip(digits, param)])
    diff = np.abs(ours.astype(int) - reference)
    # Same transform: at most one gray level off (float rounding before PIL's truncation), rarely.
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3
    if op not in ("autocontrast", "equalize"):
        assert (ours != digits).any(axis=(1, 2)).mean() > 0.5, "the op should change most digits"


def _reference_pixmix(x: np.ndarray, mixing: np.ndarray, d: pixmix.Draws, i: int) -> np.ndarray:
    """One sample, one step at a time as the published code does (PIL ops, float32 mixing)."""

    def augment(slot):
        return _pil(x, pixmix.OPS[d.op[i, slot]], d.param[i, slot]).astype(np.float32) / 255

    mixed = augment(0) if d.augmented[i, 0] else x.astype(np.float32) / 255
    for j in range(d.rounds[i]):
        other = augment(j + 1) if d.augmented[i, j + 1] else mixing[d.mixing_index[i]].astype(np.float32) / 255
        a, b = d.a[i, j], d.b[i, j]
        if d.mix[i, j] == pixmix.ADD:
            mixed = (a * (mixed * 2 - 1) + b * (other * 2 - 1) + 1) / 2
        else:
            with np.errstate(over="ignore"):
                mixed = (mixed * 2) ** a * np.clip(other * 2, 1e-37, None) ** b / 2
        mixed = np.clip(mixed, 0, 1)
    return (mixed * 255 + 0.5).astype(np.uint8)


def test_batched_pixmix_matches_per_image_reference(digits, mixing):
    x = digits[:400]
    draws = pixmix.draw(np.random.default_rng(1), len(x), len(mixing), k=K)
    ours = pixmix.apply(x, mixing, draws)
    reference = np.stack([_reference_pixmix(x[i], mixing, draws, i) for i in range(len(x))])
    diff = np.abs(ours.astype(int) - reference)
    assert diff.max() <= 1, "float32 fastmath mixing may round differently, never by more than a level"
    assert (diff > 0).mean() < 1e-2
    assert (ours != x).any(axis=(1, 2)).mean() > 0.7


def test_parallel_and_serial_kernels_give_the_same_bytes(digits, mixing):
    draws = pixmix.draw(np.random.default_rng(2), len(digits), len(mixing))
    assert np.array_equal(pixmix.apply(digits, mixing, draws, parallel=True), pixmix.apply(digits, mixing, draws, parallel=False))


def test_no_rounds_no_augment_returns_the_digit(digits, mixing):
    draws = pixmix.draw(np.random.default_rng(3), len(digits), len(mixing))
    plain = dataclasses.replace(draws, rounds=np.zeros_like(draws.rounds), augmented=np.zeros_like(draws.augmented))
    assert np.array_equal(pixmix.apply(digits, mixing, plain), digits)


def test_draws_match_their_probabilities():
    n, ops = 40_000, pixmix.OPS
    d = pixmix.draw(np.random.default_rng(4), n, 17, k=K, beta=3.0, severity=3.0)
    tol = 4 / np.sqrt(n)  # about four standard errors of a frequency
    assert np.allclose(np.bincount(d.rounds, minlength=K + 1) / n, 1 / (K + 1), atol=tol)
    assert abs(d.augmented.mean() - 0.5) < tol
    assert np.allclose(np.bincount(d.op.ravel(), minlength=len(ops)) / d.op.size, 1 / len(ops), atol=tol)
    assert abs((d.mix == pixmix.MULTIPLY).mean() - 0.5) < tol
    assert np.allclose(np.bincount(d.mixing_index, minlength=17) / n, 1 / 17, atol=4 / np.sqrt(n / 17))
    # Weights: blend (a ~ Beta(3,1), mean 3/4; b ~ Beta(1,3), mean 1/4) or extrapolate
    # (a = 1 + Beta(1,3), b = -Beta(1,3)), each half the time.
    blend = d.b > 0
    assert abs(blend.mean() - 0.5) < tol
    assert abs(d.a[blend].mean() - 0.75) < 0.01 and abs(d.b[blend].mean() - 0.25) < 0.01
    assert abs(d.a[~blend].mean() - 1.25) < 0.01 and abs(d.b[~blend].mean() + 0.25) < 0.01
    assert (d.a[blend] <= 1).all() and (d.a[~blend] >= 1).all()


def test_op_parameters_stay_mnist_safe():
    d = pixmix.draw(np.random.default_rng(5), 20_000, 1, k=K, severity=3.0)
    by_op = {op: d.param[d.op == i] for i, op in enumerate(pixmix.OPS)}
    assert np.abs(by_op["rotate"]).max() == 8 and (by_op["rotate"] == np.round(by_op["rotate"])).all()
    turned = by_op["rotate"][by_op["rotate"] != 0]
    assert (turned < 0).mean() == pytest.approx(0.5, abs=0.03)
    assert 0.08 < np.abs(by_op["shear_x"]).max() <= 0.09
    assert set(np.unique(np.abs(by_op["translate_y"]))) == {0, 1, 2}
    assert set(np.unique(by_op["posterize"])) == {3, 4}
    assert 180 <= by_op["solarize"].min() and by_op["solarize"].max() <= 254


def test_same_seed_same_bytes_and_configurable_ops(digits, mixing):
    def run(seed, ops=pixmix.OPS):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, 0]))
        return pixmix.apply(digits, mixing, pixmix.draw(rng, len(digits), len(mixing), ops=ops))

    assert np.array_equal(run(9), run(9))
    assert not np.array_equal(run(9), run(10))
    only = pixmix.draw(np.random.default_rng(0), 1000, 1, ops=("rotate", "equalize"))
    assert set(np.unique(only.op)) == {pixmix.OPS.index("rotate"), pixmix.OPS.index("equalize")}
    with pytest.raises(PixgenError, match="unknown"):
        pixmix.draw(np.random.default_rng(0), 10, 1, ops=("flip",))
