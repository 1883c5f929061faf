"""DENT: starts at the trained network, lowers entropy, is episodic and deterministic, on a BN and a
BN-free net; its optimiser steps equal the packages'; adaptive attacks see through it."""

from __future__ import annotations

import adamod
import pytest
import torch
import torchattacks

from pixgen import data, models
from pixgen.dent import Dent, DentConfig, adam_step, adamod_step, entropy
from pixgen.methods import TrainConfig
from pixgen.train import run

ARCHS = ("wk-small", "wk-small-bn")


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict:
    """Small trained networks, one per architecture (1 epoch on 2,000 digits)."""
    return {arch: trained(arch, tmp_path_factory) for arch in ARCHS}


_TRAINED: dict[str, torch.nn.Module] = {}  # per session, shared with test_evaluate


def trained(arch: str, tmp_path_factory) -> torch.nn.Module:
    if arch not in _TRAINED:
        folder = run(TrainConfig(arch=arch, epochs=1, train_size=2000, test_size=200), tmp_path_factory.mktemp(arch))
        _TRAINED[arch] = models.load(folder)[0].requires_grad_(False)
    return _TRAINED[arch]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 200, seed=0)
    return torch.from_numpy(images[index]).float().div(255).unsqueeze(1), torch.from_numpy(labels[index])


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_as_the_trained_network(nets, digits, arch):
    dent = Dent(nets[arch])
    x = digits[0]
    start = dent.predict(x, dent.initial_params(len(x), x))
    torch.testing.assert_close(start, nets[arch](x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lowers_the_batch_entropy(nets, digits, arch):
    x = digits[0][:100]
    with torch.no_grad():
        before = float(entropy(nets[arch](x)))
        for config in (DentConfig(loss="entropy"), DentConfig(loss="entropy", adapt_input=False), DentConfig(loss="entropy", adapt_model=False)):
            assert float(entropy(Dent(nets[arch], config)(x))) < before, config


@pytest.mark.parametrize("arch", ARCHS)
def test_episodic_and_deterministic(nets, digits, arch):
    x = digits[0]
    dent = Dent(nets[arch])
    with torch.no_grad():
        first = dent(x[:100])
        dent(x[100:])  # another batch in between must leave no trace
        again = dent(x[:100])
        fresh = Dent(nets[arch])(x[:100])
    assert torch.equal(first, again) and torch.equal(first, fresh)


def test_modes_agree_on_outputs_and_differ_in_gradients(nets, digits):
    x = digits[0][:50].clone().requires_grad_()
    grads = []
    outputs = []
    for differentiable in (False, True):
        out = Dent(nets["wk-small-bn"], differentiable=differentiable)(x)
        outputs.append(out.detach())
        grads.append(torch.autograd.grad(out.logsumexp(1).sum(), x)[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    assert torch.isfinite(grads[1]).all()
    assert not torch.allclose(grads[0], grads[1])


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
                (new,), state = adamod_step([ours], [grad], state, step, 6e-3, (0.99, 0.999), 0.6)
            else:
                (new,), state = adam_step([ours], [grad], state, step, 6e-3, (0.99, 0.999))
        ours = new.requires_grad_()
    torch.testing.assert_close(ours.detach(), reference.detach(), atol=1e-6, rtol=1e-5)


def test_adaptive_attack_at_least_as_strong_as_standard(nets, digits):
    """PGD (5 steps, fixed seed) on 48 digits through a 3-step adaptation vs only through the final
    prediction; a small slack for the two attacks' different random paths."""
    net = nets["wk-small-bn"]
    x, y = digits[0][:48], digits[1][:48]
    config = DentConfig(steps=3)
    accuracy = {}
    for differentiable in (False, True):
        attacked = Dent(net, config, differentiable=differentiable)
        torch.manual_seed(0)
        adv = torchattacks.PGD(attacked, eps=0.1, alpha=0.04, steps=5)(x, y)
        with torch.no_grad():
            accuracy[differentiable] = float((Dent(net, config)(adv).argmax(1) == y).float().mean())
    assert accuracy[True] <= accuracy[False] + 0.03, accuracy
