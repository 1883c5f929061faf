"""Certificates: the four bounds are ordered as duality says (dual ≤ dual-opt ≤ lp, dual-opt
reaching lp), sound against PGD with restarts, empty for untrained and standard networks at
ε 0.3; IBP training certifies digits; the certify asset resumes; bad inputs are one line.

The network is wk-small IBP-trained for 2 epochs on 2,000 digits (a few seconds), so that at
ε 0.1 some digits are certified and some ReLUs are still ambiguous."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from conftest import pixgen
from pixgen import attacks, bounds, certify, methods, models, train
from pixgen.cli import cli

EPS = 0.1


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("certify")


@pytest.fixture(scope="module")
def ibp_model(tmp) -> Path:
    config = methods.TrainConfig(method="ibp", epochs=2, batch_size=50, lr=5e-3, eps=EPS, ramp_epochs=1, train_size=2000, val_size=200, certify_size=200)
    return train.run(config, tmp / "ibp")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = train.to_tensors(*train.load_split("test", 20, None), torch.device("cpu"))
    return x.double(), y


def _double(folder: Path) -> torch.nn.Sequential:
    return models.load(folder)[0].double().requires_grad_(False)


def _bounds(model, x, y, eps, method, steps=None) -> np.ndarray:
    config = certify.resolve(certify.CertifyConfig(eps=eps, method=method, steps=steps))
    return certify.bound_chunk(model, x, y, config)[0]


def test_ibp_training_certifies_digits(ibp_model):
    meta = json.loads((ibp_model / "meta.json").read_text())
    block = meta["certify"]
    assert (block["eps"], block["count"], meta["eps"]) == (EPS, 200, EPS)
    assert 0.3 < block["certified_accuracy"] <= block["clean_accuracy"]  # untrained: 0 at any ε > 0
    assert meta["config"]["ramp_epochs"] == 1 and meta["config"]["projections"] is None


def test_ibp_loss_mixes_clean_and_bound_losses_along_the_ramp():
    config = methods.TrainConfig(method="ibp", epochs=4, eps=0.2, ramp_epochs=2)
    torch.manual_seed(0)
    model, x, y = models.build("wk-small"), torch.rand(6, 1, 28, 28), torch.arange(6)
    model.requires_grad_(False)
    clean = F.cross_entropy(model(x), y)
    start, _ = methods.ibp_loss(model, x, y, methods.Step(config, 0, 0, 100))
    assert float(start) == pytest.approx(float(clean), rel=1e-5)  # ε 0, κ 1
    end, worst = methods.ibp_loss(model, x, y, methods.Step(config, 3, 99, 100))
    expected = methods.KAPPA * clean + (1 - methods.KAPPA) * F.cross_entropy(-bounds.interval_margins(model, x, y, methods.TRAIN_EPS_FACTOR * 0.2), y)
    assert float(end) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(worst.gather(1, y[:, None]), torch.zeros(6, 1))


def test_own_dual_objective_reproduces_convex_adversarial(ibp_model, digits):
    model, (x, y) = _double(ibp_model), digits
    x, y = x[:6], y[:6]
    with torch.no_grad():
        margins, relus = bounds.dual_pass(model, x, y, EPS)
        slopes = [(u / (u - l)).clamp(0, 1)[:, None].expand(-1, 10, *l.shape[1:]) for l, u in relus]
        shapes = bounds.input_shapes(model, x)
        own = bounds.backsubstitute(model, shapes, bounds.margin_specs(y, x.dtype), (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1), relus, slopes)
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in relus) > 0  # the relaxation matters
    assert torch.allclose(own, margins, atol=1e-4)
    assert torch.allclose(margins, -bounds.dual_logits(model, x, y, EPS), atol=1e-8)


def test_weak_and_strong_duality(ibp_model, digits):
    model, (x, y) = _double(ibp_model), digits
    x, y = x[:3], y[:3]
    dual, opt, lp = (_bounds(model, x, y, EPS, m) for m in ("dual", "dual-opt", "lp"))
    wrong = np.isfinite(dual)
    assert (dual[wrong] <= opt[wrong] + 1e-9).all()
    assert (opt[wrong] <= lp[wrong] + 1e-6).all()  # weak duality: every dual point is below the LP
    assert (lp[wrong] - dual[wrong]).max() > 1e-3  # fixed slopes leave a visible gap ...
    assert (lp[wrong] - opt[wrong]).max() < 1e-3  # ... which the optimised slopes close (strong duality)


def test_certificates_are_sound_against_pgd_with_restarts(ibp_model, digits):
    model, (x, y) = _double(ibp_model), digits
    found = {m: _bounds(model, x, y, EPS, m, steps=20) for m in ("ibp", "dual", "dual-opt")}
    assert (found["ibp"] <= found["dual"] + 1e-9).sum() > 0.5 * found["ibp"].size  # IBP is the loosest, mostly
    proved = torch.from_numpy(found["dual-opt"].min(1) > 0)
    assert 0 < int(proved.sum()) < len(y)
    net = models.load(ibp_model)[0]
    points = [x.float()]
    for restart in range(5):
        points.append(attacks.build("pgd", net, EPS, seed=restart)(x.float(), y))
    for point in points:
        assert (point - x.float()).abs().max() <= EPS + 1e-6
        with torch.no_grad():
            logits = net(point).double()
        margins = (logits.gather(1, y[:, None]) - logits).numpy()
        for method, bound in found.items():
            wrong = np.isfinite(bound)
            assert (bound[wrong] <= margins[wrong] + 1e-4).all(), method  # a bound is below every reachable margin
        assert not ((logits.argmax(1) != y) & proved).any()


def test_ibp_bounds_max_pooling_soundly(digits):
    torch.manual_seed(0)
    net = models.build("madry-cnn").eval()
    x, y = digits[0][:4].float(), digits[1][:4]
    bound = bounds.interval_margins(net, x, y, 0.01).detach()
    adversarial = attacks.build("pgd", net, 0.01)(x, y)
    with torch.no_grad():
        for point in (x, adversarial):
            logits = net(point)
            assert (bound <= logits.gather(1, y[:, None]) - logits + 1e-5).all()


@pytest.mark.parametrize("kind", ["untrained", "standard"])
def test_uncertified_networks_certify_nothing_at_0_3(tmp, digits, kind):
    if kind == "standard":
        folder = train.run(methods.TrainConfig(method="standard", epochs=1, batch_size=50, lr=5e-3, train_size=2000, val_size=100), tmp / "standard")
        model = _double(folder)
        assert json.loads((folder / "meta.json").read_text())["val_accuracy"] > 0.8
    else:
        torch.manual_seed(0)
        model = models.build("wk-small").double().requires_grad_(False)
    x, y = digits[0][:4], digits[1][:4]
    for method in ("ibp", "dual"):
        assert not (_bounds(model, x, y, 0.3, method).min(1) > 0).any(), method


def test_certify_command_writes_a_resumable_asset(ibp_model, tmp):
    out = tmp / "cert.zarr"
    args = ["certify", "--model", ibp_model, "--eps", EPS, "--method", "dual-opt", "--steps", "10", "--count", "6", "--chunk", "4", "--out", out]
    assert pixgen(*args).stdout.strip() == f"output: {out}"
    group = zarr.open_group(str(out), mode="r")
    bounds, certified, labels = group["bounds"][:], group["certified"][:], group["labels"][:]
    assert bounds.shape == (6, 10) and np.isposinf(bounds[np.arange(6), labels]).all()
    assert np.array_equal(certified, bounds.min(1) > 0) and (group["seconds"][:] > 0).all()
    info = pixgen("info", out).stdout
    assert f"certified_accuracy: {certified.mean()}" in info and '"method":"dual-opt"' in info
    # Undo the second unit, as a kill before its flag would, and rerun: only that unit is redone.
    group = zarr.open_group(str(out), mode="r+")
    group["_done"][1] = 0
    group["bounds"][4:] = 0
    group.attrs["complete"] = False
    CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert np.allclose(zarr.open_group(str(out), mode="r")["bounds"][:], bounds)
    again = CliRunner().invoke(cli, [*map(str, args[:4]), "0.2", *map(str, args[5:])])
    assert again.exit_code == 1 and "another config" in again.output


def test_certify_keeps_freed_memory(ibp_model, tmp, monkeypatch):
    """The library's dual pass reallocates freed tensors; certify keeps them in the heap
    (`heap.keep_freed_memory`, whose effect on page faults tests/test_train.py measures)."""
    calls = []
    monkeypatch.setattr(certify.heap, "keep_freed_memory", lambda: calls.append(1))
    certify.run(certify.CertifyConfig(eps=EPS, method="ibp", count=2), ibp_model, tmp / "kept.zarr")
    assert calls == [1]


@pytest.fixture(scope="module")
def odd_models(tmp) -> dict[str, Path]:
    folders = {}
    for arch in ("madry-cnn", "wk-small-bn"):
        folders[arch] = tmp / arch
        models.save(folders[arch], models.build(arch), {"arch": arch, "method": "standard", "config_hash": "0", "complete": True})
    return folders


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{ibp}", "--eps", "-0.1"], "-0.1 is not in the range x>=0"),
        (["--model", "{ibp}", "--eps", "1.5"], "--eps must be at least 0 and at most 1 (pixel units), got 1.5"),
        (["--model", "{madry-cnn}", "--eps", "0.1", "--method", "lp"], "method lp cannot bound the MaxPool2d layer"),
        (["--model", "{wk-small-bn}", "--eps", "0.1", "--method", "ibp"], "method ibp cannot bound the BatchNorm2d layer"),
        (["--model", "{ibp}", "--eps", "0.1", "--steps", "5"], "--steps applies to method dual-opt"),
        (["--model", "{tmp}/missing", "--eps", "0.1"], "does not exist"),
    ],
)
def test_bad_certify_inputs_are_one_clear_line(tmp, ibp_model, odd_models, extra, message):
    names = {"ibp": ibp_model, "tmp": tmp, **odd_models}
    result = pixgen("certify", *[a.format(**names) for a in extra], "--out", tmp / "bad.zarr", check=False)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp / "bad.zarr").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "wk-small-bn"], "method ibp cannot bound the BatchNorm2d layer"),
        (["--projections", "5"], "--projections do not apply to method ibp"),
    ],
)
def test_bad_ibp_training_inputs_are_one_clear_line(tmp, extra, message):
    result = CliRunner().invoke(cli, ["train", "--method", "ibp", "--out", str(tmp / "bad"), "--train-size", "100", "--val-size", "100", *extra])
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp / "bad").exists()


def test_lp_bound_is_the_dual_objective():
    """min x0 + 2 x1 s.t. x0 + x1 ≥ 1, x0 − x1 = 0.2, 0 ≤ x ≤ 5: x = (0.6, 0.4), value 1.4; its dual
    (y_ub ≤ 0 for −x0 − x1 ≤ −1, y_eq free) gives the same 1.4 from b·y alone."""
    from scipy.optimize import linprog

    b_ub, b_eq, box = np.array([-1.0]), np.array([0.2]), np.array([[0.0, 5.0], [0.0, 5.0]])
    result = linprog([1.0, 2.0], A_ub=[[-1.0, -1.0]], b_ub=b_ub, A_eq=[[1.0, -1.0]], b_eq=b_eq, bounds=box, method="highs")
    assert abs(result.fun - 1.4) < 1e-9
    assert abs(bounds.lp_dual_objective(result, b_ub, b_eq, box) - 1.4) < 1e-9
    # min −x0 − x1 s.t. x0 + 2 x1 ≤ 4, x0 − x1 = −1, 0 ≤ x0 ≤ 0.5: the bound on x0 binds (x = (0.5,
    # 1.5), value −2, the row does not), so its dual carries part of the objective.
    b_ub, b_eq, box = np.array([4.0]), np.array([-1.0]), np.array([[0.0, 0.5], [0.0, 5.0]])
    result = linprog([-1.0, -1.0], A_ub=[[1.0, 2.0]], b_ub=b_ub, A_eq=[[1.0, -1.0]], b_eq=b_eq, bounds=box, method="highs")
    assert abs(result.fun + 2.0) < 1e-9 and result.upper.marginals[0] != 0
    assert abs(bounds.lp_dual_objective(result, b_ub, b_eq, box) + 2.0) < 1e-9
