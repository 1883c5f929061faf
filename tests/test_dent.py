"""DENT: the two named defences; starts at the trained network, adapts exactly as the published
algorithm (checked against an independent rewrite with the adamod package), lowers entropy, is
episodic and deterministic, on a BN and a BN-free net; the differentiable mode gives the same
outputs and no gradient between digits; predictions depend on the batch."""

from __future__ import annotations

import adamod
import pytest
import torch
from torch import nn

from pixgen import data, models
from pixgen.dent import DEFENSES, VARIANTS, Dent, DentConfig, ImageConv, adam_step, adamod_step, blur, entropy, predict_in_batches, shot, warp
from pixgen.methods import TrainConfig
from pixgen.train import run

ARCHS = ("wk-small", "wk-small-bn")


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict:
    return {arch: trained(arch, tmp_path_factory) for arch in ARCHS}


_TRAINED: dict[str, torch.nn.Module] = {}  # per session, shared with test_evaluate and test_adaptive


def trained(arch: str, tmp_path_factory) -> torch.nn.Module:
    """A small trained network: 315 Adam steps (5 epochs of batches of 32) on 2,000 digits."""
    if arch not in _TRAINED:
        config = TrainConfig(arch=arch, epochs=5, batch_size=32, train_size=2000, val_size=200)
        _TRAINED[arch] = models.load(run(config, tmp_path_factory.mktemp(arch)))[0].requires_grad_(False)
    return _TRAINED[arch]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 200, seed=0)
    return torch.from_numpy(images[index]).float().div(255).unsqueeze(1), torch.from_numpy(labels[index])


def test_named_defences_and_variants():
    assert DentConfig() == DEFENSES["dent"] and DentConfig().batch_size == 128
    assert not DEFENSES["dent"].adapt_input and DEFENSES["dent-input"].adapt_input
    expected = {"wk-small": VARIANTS[1], "wk-small-bn": "bn", "madry-cnn": VARIANTS[1]}
    assert {arch: Dent(models.build(arch)).variant for arch in expected} == expected


@pytest.mark.parametrize("defence", DEFENSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_starts_as_the_trained_network(nets, digits, arch, defence):
    dent = Dent(nets[arch], DEFENSES[defence])
    x = digits[0]
    torch.testing.assert_close(dent.predict(x, dent.start.expand(len(x), -1)), nets[arch](x), atol=1e-4, rtol=0)


def reference_dent(net: nn.Sequential, x: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """DENT as published, written independently of pixgen.dent: per-sample BN scale and shift as
    parameters (BN-free: a scale and shift after each conv, from the identity), the adamod
    package's AdaMod, the reference's shot loss with its plain batch mean."""
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net)
    sites = [m for m in net if isinstance(m, nn.BatchNorm2d if has_bn else nn.Conv2d)]
    weights = [nn.Parameter(m.weight.detach().expand(len(x), -1).clone() if has_bn else torch.ones(len(x), m.out_channels)) for m in sites]
    biases = [nn.Parameter(m.bias.detach().expand(len(x), -1).clone() if has_bn else torch.zeros(len(x), m.out_channels)) for m in sites]
    optimizer = adamod.AdaMod(weights + biases, lr=6e-3, betas=(0.99, 0.999), beta3=0.6)

    def forward():
        h = x
        for layer in net:
            if isinstance(layer, nn.BatchNorm2d):
                k = sites.index(layer)
                scale = weights[k] * (layer.running_var + layer.eps).rsqrt()
                h = h * scale[:, :, None, None] + (biases[k] - layer.running_mean * scale)[:, :, None, None]
            else:
                h = layer(h)
                if layer in sites and not has_bn:
                    k = sites.index(layer)
                    h = h * weights[k][:, :, None, None] + biases[k][:, :, None, None]
        return h

    for _ in range(steps):
        p = forward().softmax(1)
        mean = p.mean(0)
        loss = -(p * torch.log(p + 1e-5)).sum(1).mean() + (mean * torch.log(mean + 1e-5)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return forward()


@pytest.mark.parametrize("arch", ARCHS)
def test_adapts_as_published(nets, digits, arch):
    x = digits[0][:64]
    with torch.no_grad():
        ours = Dent(nets[arch])(x)
    reference = reference_dent(nets[arch], x)
    assert not torch.allclose(reference, nets[arch](x), atol=1e-3)  # it did adapt
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_shot_gradient_per_digit_is_the_reference():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    p = logits.softmax(1)
    mean = p.mean(0)
    reference = -(p * torch.log(p + 1e-5)).sum(1).mean() + (mean * torch.log(mean + 1e-5)).sum()
    torch.testing.assert_close(torch.autograd.grad(shot(logits), logits)[0], torch.autograd.grad(reference, logits)[0], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("defence", DEFENSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_lowers_the_batch_entropy(nets, digits, arch, defence):
    x = digits[0][:100]
    with torch.no_grad():
        before = float(entropy(nets[arch](x)))
        after = float(entropy(Dent(nets[arch], DentConfig(loss="entropy", adapt_input=DEFENSES[defence].adapt_input))(x)))
    assert after < before


@pytest.mark.parametrize("arch", ARCHS)
def test_episodic_and_deterministic(nets, digits, arch):
    x = digits[0]
    dent = Dent(nets[arch], DEFENSES["dent-input"])
    with torch.no_grad():
        first = dent(x[:100])
        dent(x[100:])  # another batch in between must leave no trace
        again = dent(x[:100])
        fresh = Dent(nets[arch], DEFENSES["dent-input"])(x[:100])
    assert torch.equal(first, again) and torch.equal(first, fresh)


@pytest.mark.parametrize("defence", DEFENSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_differentiable_mode_same_outputs_and_no_gradient_between_digits(nets, digits, arch, defence):
    x = digits[0][:32].clone().requires_grad_()
    y = digits[1][:32]
    standard = Dent(nets[arch], DEFENSES[defence])
    adaptive = Dent(nets[arch], DEFENSES[defence], differentiable=True)
    out = adaptive(x)
    with torch.no_grad():
        assert torch.equal(out.detach(), standard(x))
    for i in (0, 17):
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(out[i : i + 1], y[i : i + 1]), x, retain_graph=True)
        assert torch.isfinite(grad).all() and grad[i].abs().sum() > 0
        assert torch.count_nonzero(torch.cat([grad[:i], grad[i + 1 :]])) == 0
        (through_prediction,) = torch.autograd.grad(nn.functional.cross_entropy(standard(x)[i : i + 1], y[i : i + 1]), x)
        assert not torch.allclose(grad[i], through_prediction[i])


@pytest.mark.parametrize("defence", DEFENSES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tracking_a_few_digits_gives_the_same_bytes_and_gradients(nets, digits, arch, defence):
    """EOT's path (the adversarial digits in the graph, their clean batch-mates not) against the
    whole batch in the graph, as before: the same logits and the same input gradients, to the byte."""
    dent = Dent(nets[arch], DEFENSES[defence])
    x, y = digits[0][:40].clone().requires_grad_(), digits[1][:8]
    whole = dent.predict(x, dent.adapt(x, differentiable=True))[:8]
    tracked = dent.predict(x[:8], dent.adapt(x, differentiable=True, tracked=8)[:8])
    assert torch.equal(whole, tracked)
    (expected,) = torch.autograd.grad(nn.functional.cross_entropy(whole, y), x)
    (got,) = torch.autograd.grad(nn.functional.cross_entropy(tracked, y), x)
    assert torch.equal(got, expected) and got[:8].abs().sum() > 0 and torch.count_nonzero(got[8:]) == 0


def test_predictions_depend_on_the_batch_and_are_made_in_its_size(nets, digits):
    dent = Dent(nets["wk-small-bn"])
    x = digits[0]
    with torch.no_grad():
        batched = predict_in_batches(dent, x)
        torch.testing.assert_close(batched, torch.cat([dent(x[:128]), dent(x[128:])]), atol=0, rtol=0)
        assert not torch.equal(batched, dent(x))


def test_input_transform_is_an_affine_warp_and_a_three_tap_blur():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=gen)
    theta = torch.eye(2, 3) + 0.05 * torch.randn(4, 2, 3, generator=gen)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    torch.testing.assert_close(warp(x, theta), nn.functional.grid_sample(x, grid, align_corners=False), atol=1e-5, rtol=0)
    a = torch.tensor([0.0, 0.1, 0.2, 0.25])
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i, taps in enumerate(torch.stack([a, 1 - 2 * a, a], 1)):
        reference = nn.functional.conv2d(padded[i : i + 1], torch.outer(taps, taps)[None, None])
        torch.testing.assert_close(blur(x, a)[i : i + 1], reference, atol=1e-6, rtol=0)


def test_blur_stays_in_its_range(nets, digits):
    """Entropy minimisation would sharpen most digits (a negative blur); the projection stops it at 0."""
    a = Dent(nets["wk-small"], DEFENSES["dent-input"]).adapt(digits[0][:128])[:, 6]
    assert a.min() == 0 and 0 < a.max() <= 0.25


def test_wrapped_network_is_untouched_and_modes_ignored(nets, digits):
    net = nets["wk-small-bn"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dent = Dent(net).train()  # torchattacks flips modes; DENT must keep stored BN statistics
    with torch.no_grad():
        out_train = dent(digits[0][:50])
        out_eval = dent.eval()(digits[0][:50])
    assert torch.equal(out_train, out_eval)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _quadratic_runs(steps: int = 6):
    """Parameters and their gradients on a fixed quadratic, where a dead coordinate (zero gradient) is kept."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(5, 3, generator=gen)
    start = torch.randn(5, 3, generator=gen)
    mask = torch.ones(5, 3)
    mask[0, 0] = 0
    return start, lambda p: ((p - target) ** 2 * mask).sum(), steps


@pytest.mark.parametrize("name", ["adamod", "adam"])
def test_optimizer_steps_match_the_packages(name):
    start, loss_fn, steps = _quadratic_runs()
    reference = torch.nn.Parameter(start.clone())
    if name == "adamod":
        optimizer = adamod.AdaMod([reference], lr=6e-3, betas=(0.99, 0.999), beta3=0.6)
    else:
        optimizer = torch.optim.Adam([reference], lr=6e-3, betas=(0.99, 0.999))
    ours, state = start.clone().requires_grad_(), None
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss_fn(reference).backward()
        optimizer.step()
        (grad,) = torch.autograd.grad(loss_fn(ours), ours)
        with torch.no_grad():
            if name == "adamod":
                new, state = adamod_step(ours, grad, state, step, 6e-3, (0.99, 0.999), 0.6)
            else:
                new, state = adam_step(ours, grad, state, step, 6e-3, (0.99, 0.999))
        ours = new.requires_grad_()
    torch.testing.assert_close(ours.detach(), reference.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["wk-small", "madry-cnn"])
def test_image_convolution_has_the_convolutions_values_and_gradients(digits, arch):
    """The first convolution's own input gradient (and its derivative, which attacks through the
    adaptation take) equals autograd's through the Conv2d, to rounding; its values are the same bytes."""
    conv = models.build(arch)[0].requires_grad_(False)
    ours = ImageConv(conv)
    x = digits[0][:16].clone().requires_grad_()
    weights = torch.randn(16, conv.out_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    grads = []
    for layer in (conv, ours):
        out = layer(x)
        (grad,) = torch.autograd.grad((weights * out).tanh().sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        grads.append((out, grad, second))
    assert torch.equal(grads[0][0], grads[1][0])
    for reference, got in zip(grads[0][1:], grads[1][1:]):
        scale = reference.abs().max()
        assert scale > 0 and (got - reference).abs().max() <= 1e-5 * scale, float((got - reference).abs().max() / scale)
    assert isinstance(Dent(models.build(arch)).model[0], ImageConv) and not isinstance(Dent(models.build(arch)).model[3], ImageConv)
