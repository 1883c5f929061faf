"""Input normalisation and ε units (issue 21): a network trained with --normalize carries its
(x − mean)/std layer through save and load and is the plain network fed normalised pixels; every
bound is the one of the same map; an ε stated in input units is run at ε × std in pixels, exactly
as the same pixel ε is, and the assets and the report say which units they hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from pixgen import PixgenError, attacks, bounds, certify, data, evaluate, methods, models
from pixgen.cli import cli
from test_report import table

MNIST = (0.1307, 0.3081)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("units")


@pytest.fixture(scope="module")
def half(tmp):
    """PixMix's normalisation (std 0.5, pixels to [−1, 1]), trained through the CLI."""
    out = tmp / "half"
    args = ["train", "--normalize", "0.5,0.5", "--train-size", "2000", "--val-size", "200", "--batch-size", "32", "--epochs", "1", "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def digits():
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 100, seed=0)
    return evaluate.to_tensor(images[index], "cpu"), torch.from_numpy(labels[index]).long()


def test_trained_normalisation_is_stored_and_restored(half, digits):
    meta = json.loads((half / models.META).read_text())
    assert meta["normalize"] == [0.5, 0.5] and meta["config"]["normalize"] == [0.5, 0.5]
    net, _ = models.load(half)
    assert isinstance(net[0], models.Normalize) and (float(net[0].mean), float(net[0].std)) == (0.5, 0.5)
    assert meta["val_accuracy"] > 0.8  # it learnt through the layer
    # Without the layer the same weights are another network: the stored pair matters.
    plain = models.build("wk-small")  # its layers sit one place earlier: no Normalize in front
    plain.load_state_dict({f"{int(index) - 1}.{name}": v for key, v in net.state_dict().items() for index, name in [key.split(".", 1)] if index != "0"})
    x = digits[0]
    with torch.no_grad():
        assert torch.equal(net(x), plain((x - 0.5) / 0.5))
        assert not torch.allclose(net(x), plain(x))


def test_save_load_keeps_the_logits_and_the_layer_is_the_plain_network_on_normalised_pixels(tmp, digits):
    torch.manual_seed(1)
    net = models.build("wk-small", normalize=MNIST)
    folder = tmp / "mnist-normalised"
    models.save(folder, net, {"arch": "wk-small", "method": "standard", "config_hash": "0", "normalize": list(MNIST), "complete": True})
    loaded, _ = models.load(folder)
    x = digits[0]
    plain = nn.Sequential(*net[1:])  # the un-normalised architecture with the same weights
    mean, std = torch.tensor(MNIST[0]), torch.tensor(MNIST[1])
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert torch.equal(net(x), plain((x - mean) / std))
    assert models.weights_hash(loaded) == models.weights_hash(net) != models.weights_hash(plain)


def test_normalize_pair_is_checked():
    assert methods.TrainConfig(normalize=[0, 1]).normalize == (0.0, 1.0)  # floats in a tuple: one hash per pair
    for bad in ((0.5,), (0.5, 0.0), (0.5, -1.0), (float("nan"), 0.5), (0.5, float("inf")), (0.1, 0.2, 0.3)):
        with pytest.raises(PixgenError, match="--normalize takes MEAN,STD"):
            methods.TrainConfig(normalize=bad)


def _folded(net: nn.Sequential) -> nn.Sequential:
    """`net` without its Normalize layer, folded into the next convolution: exact when that
    convolution has no padding."""
    norm, conv = net[0], net[1]
    fold = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding).double()
    with torch.no_grad():
        fold.weight.copy_(conv.weight / norm.std)
        fold.bias.copy_(conv.bias - norm.mean / norm.std * conv.weight.sum((1, 2, 3)))
    return nn.Sequential(fold, *net[2:])


def test_every_bound_of_a_normalised_network_is_that_of_the_folded_one(digits):
    """Normalisation (mean ≠ 0) before a convolution without padding, where folding it into the
    convolution is exact: IBP, both dual implementations, dual-opt and the LP give the folded
    network's bounds to float64 rounding."""
    torch.manual_seed(0)
    body = [nn.Conv2d(1, 2, 5), nn.ReLU(), nn.Conv2d(2, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 20), nn.ReLU(), nn.Linear(20, 10)]
    net = nn.Sequential(models.Normalize(*MNIST, channels=1), *body).double().requires_grad_(False)
    fold = _folded(net).requires_grad_(False)
    rng = torch.get_rng_state()
    assert isinstance(bounds.boundable(net)[0], nn.Conv2d) and torch.equal(torch.get_rng_state(), rng)  # training's RNG left alone
    x, y = digits[0][:6].double(), digits[1][:6]
    eps = 0.05
    with torch.no_grad():
        assert torch.allclose(net(x), fold(x), rtol=0, atol=1e-12)
        for bound in (lambda m: bounds.interval_margins(m, x, y, eps), lambda m: bounds.dual_logits(m, x, y, eps), lambda m: bounds.dual_pass(m, x, y, eps)[0]):
            a, b = bound(net), bound(fold)
            assert torch.allclose(a, b, rtol=0, atol=1e-12) and a.abs().max() > 0.1
        margins, relus = bounds.dual_pass(net, x, y, eps)
        _, fold_relus = bounds.dual_pass(fold, x, y, eps)
    assert torch.allclose(bounds.optimise_slopes(net, x, y, eps, relus, 5), bounds.optimise_slopes(fold, x, y, eps, fold_relus, 5), rtol=0, atol=1e-12)
    lo, hi = (x - eps).clamp(0, 1).flatten(1).numpy(), (x + eps).clamp(0, 1).flatten(1).numpy()
    lp = [bounds.lp_margins(bounds.affine_matrices(m, bounds.input_shapes(m, x)), lo[0], hi[0], [(l[0].flatten().numpy(), u[0].flatten().numpy()) for l, u in r], int(y[0])) for m, r in ((net, relus), (fold, fold_relus))]
    assert np.allclose(lp[0], lp[1], rtol=0, atol=1e-7) and (lp[0] >= margins[0].numpy() - 1e-7).all()  # and weak duality


def test_normalised_wk_small_certificates_are_sound(half, digits):
    """wk-small pads its first convolution, so no fold is exact there: the certificates of the
    trained normalised network must still be beaten by no PGD attack, and its std-only part folds
    exactly (mean 0) into the convolution's weights."""
    net, net64 = models.load(half)[0], models.load(half)[0].double().requires_grad_(False)
    x, y = digits[0][:40], digits[1][:40]
    eps = 0.02
    with torch.no_grad():
        proved = {name: certify.bound_chunk(net64, x.double(), y, certify.CertifyConfig(eps=eps, method=name))[0].min(1) > 0 for name in ("ibp", "dual")}
        broken = (net(attacks.build("pgd", net, eps, restarts=2)(x, y)).argmax(1) != y).numpy()
    assert proved["dual"].sum() >= 10 and not any((proved[name] & broken).any() for name in proved)
    net, x = net64, x.double()
    scaled = nn.Sequential(models.Normalize(0.0, 0.5, channels=1), *net[1:]).double()
    with torch.no_grad():
        assert torch.allclose(bounds.dual_logits(scaled, x, y, eps), bounds.dual_logits(_folded(scaled), x, y, eps), rtol=0, atol=1e-10)


def _evaluation(model, out, units, grid):
    config = evaluate.EvalConfig(suites=("clean",), attacks=(("fgsm", grid), ("pgd", grid[1:])), test_size=60, attack_size=30, batch_size=30, pgd_restarts=1, eps_units=units)
    return zarr.open_group(str(evaluate.run(config, model, out)), mode="r")


def test_input_units_attack_at_eps_times_std_exactly_as_pixel_units(half, tmp):
    stated = _evaluation(half, tmp / "input.zarr", "input", (0.0, 0.2, 0.4))
    pixel = _evaluation(half, tmp / "pixel.zarr", "pixel", (0.0, 0.1, 0.2))
    same_numbers = _evaluation(half, tmp / "pixel-same.zarr", "pixel", (0.0, 0.2, 0.4))
    assert (stated.attrs["eps_units"], stated.attrs["eps_to_pixel"]) == ("input", 0.5)
    assert (pixel.attrs["eps_units"], pixel.attrs["eps_to_pixel"]) == ("pixel", 1.0)
    assert stated.attrs["config"]["eps_units"] == "input" and stated.attrs["config_hash"] != pixel.attrs["config_hash"]
    assert stated.attrs["model"]["normalize"] == [0.5, 0.5]
    for attack in ("fgsm", "pgd"):
        entry = stated.attrs["defenses"]["none"][attack]
        assert entry["eps"] == list((0.0, 0.1, 0.2)[3 - len(entry["eps"]) :]) and entry["stated_eps"] == list((0.0, 0.2, 0.4)[3 - len(entry["eps"]) :])
        assert entry["worst"] == pixel.attrs["defenses"]["none"][attack]["worst"]
        for name in (f"none_{attack}_standard", f"examples_{attack}", f"examples_{attack}_predicted"):
            assert stated[name][:].tobytes() == pixel[name][:].tobytes(), name
    # The same numbers in pixel units are a twice larger budget, and break more digits.
    assert same_numbers["none_fgsm_standard"][2].sum() < stated["none_fgsm_standard"][2].sum()


def test_without_normalisation_input_units_are_pixels():
    assert models.eps_to_pixel(models.build("wk-small"), "input") == 1.0
    assert models.eps_to_pixel(models.build("wk-small", normalize=MNIST), "pixel") == 1.0
    assert models.eps_to_pixel(models.build("wk-small", normalize=MNIST), "input") == pytest.approx(0.3081)


def test_certify_in_input_units_certifies_the_pixel_ball(half, tmp):
    runs = {}
    for units, eps in (("input", 0.04), ("pixel", 0.02)):
        config = certify.CertifyConfig(eps=eps, method="dual", count=10, eps_units=units)
        runs[units] = zarr.open_group(str(certify.run(config, half, tmp / f"cert-{units}.zarr")), mode="r")
    assert runs["input"]["bounds"][:].tobytes() == runs["pixel"]["bounds"][:].tobytes()
    assert (runs["input"].attrs["pixel_eps"], runs["input"].attrs["eps_to_pixel"], runs["input"].attrs["eps_units"]) == (0.02, 0.5, "input")


def test_report_compares_in_pixel_units_and_says_so(half, tmp):
    """An input-unit evaluation sits in the same pixel-ε column as the pixel-unit one that ran the
    same budgets, the headers carry the units, and a note names the evaluation stated in input units."""
    from pixgen.report import ReportConfig, run

    page = run(ReportConfig(table_eps=(0.1, 0.2), adv_eps=(0.1,)), [tmp / "input.zarr", tmp / "pixel.zarr"], tmp / "report")
    summary = (page.parent / "summary.md").read_text()
    header, rows = table(summary)
    assert "FGSM ε=0.1 (pixel units) (%) ↑" in header and not any("ε=0.4" in h for h in header)
    column = header.index("FGSM ε=0.2 (pixel units) (%) ↑")
    assert len(rows) == 2 and rows[0][column] == rows[1][column] and rows[0][column] != "—"
    assert "given in input units (pixgen evaluate --eps-units input)" in summary and "(× std 0.5)" in summary


def test_eps_units_are_checked():
    assert evaluate.EvalConfig(attacks=(("fgsm", (0.5, 2.0)),), eps_units="input").eps("fgsm") == (0.5, 2.0)  # 2 input units: 1 pixel at std 0.5
    with pytest.raises(PixgenError, match=r"increasing budgets in \[0, 1\] \(pixel units\)"):
        evaluate.EvalConfig(attacks=(("fgsm", (0.5, 2.0)),))
    for bad in (lambda: evaluate.EvalConfig(eps_units="std"), lambda: certify.run(certify.CertifyConfig(eps=0.1, eps_units="std"), "none", "none")):
        with pytest.raises(PixgenError, match="unknown ε units 'std'; choose one of pixel, input"):
            bad()
