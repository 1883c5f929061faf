"""Attacks on DENT's internals: inside the ε-ball and [0, 1], deterministic under a seed, and on a
trained wk-small the attacks through the adaptation are at least as strong as the transfer attack."""

from __future__ import annotations

import pytest
import torch

from pixgen import adaptive, data
from pixgen.dent import Dent, DentConfig
from test_dent import trained

SMALL = {
    "transfer": dict(steps=3),
    "fixed_point": dict(rounds=2, steps=3),
    "adaptive_apgd": dict(steps=3, losses=("ce", "dlr")),
    "eot_batches": dict(draws=2, steps=2, per_batch=4),
}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return trained("wk-small", tmp_path_factory)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 200, seed=0)
    return torch.from_numpy(images[index]).float().div(255).unsqueeze(1), torch.from_numpy(labels[index]).long()


def accuracy(dent, x, y) -> float:
    with torch.no_grad():
        return float((dent(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("name", SMALL)
def test_in_the_ball_and_deterministic(net, digits, name):
    dent = Dent(net, DentConfig(steps=2, batch_size=24))
    x, y, pool = digits[0][:12], digits[1][:12], digits[0][100:]
    attack = getattr(adaptive, name)
    params = {**SMALL[name], **({"pool": pool} if name == "eot_batches" else {})}
    with torch.no_grad():  # as an evaluation calls them
        first, again, other = (attack(dent, x, y, 0.1, seed, **params) for seed in (0, 0, 1))
    assert (first - x).abs().max() <= 0.1 + 1e-6 and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("eps", [0.08, 0.1, 0.2])
def test_through_the_adaptation_at_least_as_strong_as_transfer(net, digits, eps):
    dent = Dent(net)
    x, y = digits[0][:64], digits[1][:64]
    transfer = accuracy(dent, adaptive.transfer(dent, x, y, eps, 0, steps=10), y)
    through = accuracy(dent, adaptive.adaptive_apgd(dent, x, y, eps, 0, steps=10), y)
    fixed = accuracy(dent, adaptive.fixed_point(dent, x, y, eps, 0, rounds=2, steps=10), y)
    assert through <= transfer < accuracy(dent, x, y), (through, transfer)
    assert fixed <= transfer + 1 / 64, (fixed, transfer)  # round 0 is a transfer attack


def test_eot_over_batches_lowers_accuracy_in_random_batches(net, digits):
    dent = Dent(net, DentConfig(batch_size=32))
    x, y, pool = digits[0][:16], digits[1][:16], digits[0][100:]
    adv = adaptive.eot_batches(dent, x, y, 0.1, 0, pool=pool, draws=2, steps=5, per_batch=8)
    clean = adaptive.accuracy_in_random_batches(dent, x, y, pool, seed=1, draws=2, per_batch=8)
    attacked = adaptive.accuracy_in_random_batches(dent, adv, y, pool, seed=1, draws=2, per_batch=8)
    assert attacked.mean() < clean.mean(), (attacked.mean(), clean.mean())


def test_apgd_checkpoints_are_croce_and_heins():
    # Their code at 100 steps: 22, then gaps 19, 16, 13, 10, 7, 6, 6.
    assert sorted(adaptive.apgd_checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_reaches_a_higher_loss_than_pgd_of_as_many_steps(net, digits, loss):
    """On this small network both attacks leave the same digits correct; the loss they reach is
    what tells them apart (APGD's step-size halving and momentum)."""
    x, y = digits[0][:64], digits[1][:64]
    reached = {}
    runs = {"pgd": lambda g: adaptive.pgd(net, x, y, 0.1, 20, None, g, adaptive.LOSSES[loss]),
            "apgd": lambda g: adaptive.apgd(net, x, y, 0.1, 20, g, adaptive.LOSSES[loss])}  # fmt: skip
    for name, run in runs.items():
        adv = run(torch.Generator().manual_seed(0))
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
        with torch.no_grad():
            reached[name] = float(adaptive.LOSSES[loss](net(adv), y).mean())
    assert reached["apgd"] > reached["pgd"], reached
