"""The attack registry on real MNIST digits and a quickly trained wk-small: determinism and streams
keyed by name, the ε-ball, PGD's restarts, best iterate and DLR loss, the FGSM sweep, per-digit
outcomes over ε, AutoAttack against PGD, and the sanity checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixgen import PixgenError, attacks, data, models

EPS = 0.1  # wk-small keeps about a quarter of its digits under PGD-40 here: both outcomes occur


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    images, labels = data.load("mnist", "train")
    index = data.balanced_subset(labels, 3000, seed=0)
    x, y = torch.from_numpy(images[index]).float().div(255).unsqueeze(1), torch.from_numpy(labels[index]).long()
    with attacks.seeded(0):
        model = models.build("wk-small")
        optimizer = torch.optim.Adam(model.parameters(), 2e-3)
        for _ in range(400):
            batch = torch.randint(0, len(y), (64,))
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 100, seed=0)
    return torch.from_numpy(images[index]).float().div(255).unsqueeze(1), torch.from_numpy(labels[index]).long()


def correct(model, images, labels) -> np.ndarray:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).numpy()


def test_registry_round_trip(net, digits, monkeypatch):
    x, y = digits[0][:8], digits[1][:8]
    assert set(attacks.ATTACKS) == {"fgsm", "pgd", "autoattack", "square"}
    with pytest.raises(PixgenError, match="fgsm, pgd, autoattack, square"):
        attacks.build("cw", net, EPS)
    with pytest.raises(PixgenError, match="ε must be ≥ 0"):
        attacks.build("pgd", net, -0.1)
    with pytest.raises(PixgenError, match="unknown PGD loss"):
        attacks.build("pgd", net, EPS, loss="hinge")
    with pytest.raises(PixgenError, match="restarts >= 1"):
        attacks.build("pgd", net, EPS, restarts=0)
    with pytest.raises(TypeError):
        attacks.build("fgsm", net, EPS, steps=3)
    received = {}

    def noise(model, eps, stream, scale=1.0):
        received.update(model=model, eps=eps, stream=stream)
        return lambda images, labels: (images + scale * eps).clamp(0, 1)

    monkeypatch.setitem(attacks.ATTACKS, "noise", noise)
    adversarial = attacks.build("noise", net, EPS, seed=3, batch=2, scale=-1.0)(x, y)
    assert received == {"model": net, "eps": EPS, "stream": attacks.stream_seed(3, "noise", EPS, 2)}
    assert torch.equal(adversarial, (x - EPS).clamp(0, 1))
    for name in ("fgsm", "pgd", "noise"):  # ε = 0: the ball is the image itself
        assert torch.equal(attacks.build(name, net, 0.0)(x, y), x)


@pytest.mark.parametrize("name, params", [("fgsm", {}), ("pgd", {}), ("pgd", {"loss": "dlr", "restarts": 2}), ("autoattack", {}), ("square", {})])
def test_outputs_stay_in_the_ball_and_the_unit_box(net, digits, name, params):
    x, y = digits[0][:20], digits[1][:20]
    before = x.clone()
    adversarial = attacks.build(name, net, EPS, **params)(x, y)
    assert torch.equal(x, before)  # the caller's images are not modified
    assert adversarial.shape == x.shape and adversarial.dtype == torch.float32
    assert 0 <= adversarial.min() and adversarial.max() <= 1
    assert (adversarial - x).abs().max() <= EPS + 1e-6
    assert not correct(net, adversarial, y).all()  # it attacked


def test_same_seed_gives_the_same_bytes_and_leaves_the_callers_generator(net, digits):
    x, y = digits[0][:30], digits[1][:30]
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    runs = [attacks.build("pgd", net, EPS, seed=7, batch=1, restarts=3, steps=5)(x, y) for _ in range(2)]
    assert torch.equal(torch.rand(4), expected)
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()
    for other in ({"seed": 8, "batch": 1}, {"seed": 7, "batch": 2}):
        assert not torch.equal(attacks.build("pgd", net, EPS, restarts=3, steps=5, **other)(x, y), runs[0])


def test_streams_are_keyed_by_name_not_position(net, digits, monkeypatch):
    x, y = digits[0][:30], digits[1][:30]
    reference = attacks.build("pgd", net, EPS, seed=0, steps=5)(x, y)
    monkeypatch.setattr(attacks, "ATTACKS", dict(reversed(list(attacks.ATTACKS.items()))))
    assert torch.equal(attacks.build("pgd", net, EPS, seed=0, steps=5)(x, y), reference)
    attacks.ATTACKS["pgd-copy"] = attacks.pgd  # the same attack under another name: another stream
    assert attacks.stream_seed(0, "pgd-copy", EPS) != attacks.stream_seed(0, "pgd", EPS)
    assert not torch.equal(attacks.build("pgd-copy", net, EPS, seed=0, steps=5)(x, y), reference)
    assert len({attacks.stream_seed(0, "pgd", e) for e in (0.1, 0.2, 0.3)}) == 3
    # fixed across processes and machines (a CRC of the name, not Python's salted hash)
    assert (attacks.stream_seed(0, "pgd", 0.1), attacks.stream_seed(0, "autoattack", 0.3, 2)) == (2778906393, 3127823345)


def test_pgd_restarts_only_add_broken_digits(net, digits):
    x, y = digits
    # five steps from a random start leave room for another start to find more
    one = correct(net, attacks.build("pgd", net, EPS, steps=5)(x, y), y)
    five = correct(net, attacks.build("pgd", net, EPS, steps=5, restarts=5)(x, y), y)
    assert not (five & ~one).any()
    assert (one & ~five).any()
    sizes = []
    counting = torch.nn.Sequential(net)
    counting.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    attacks.build("pgd", counting, EPS, steps=5, restarts=2, compact=False)(x, y)
    # the clean check, six passes of the first start on the clean-correct digits, six of the second
    # on those the first left correct (its stream is the one-restart run's)
    assert sizes == [len(y)] + [int(correct(net, x, y).sum())] * 6 + [int(one.sum())] * 6


class Recorder(torch.nn.Module):
    """The network, recording each forward pass; pass number `flip` misclassifies the digits with
    an even index, as a later iterate may undo what an earlier one broke."""

    def __init__(self, net, labels, flip):
        super().__init__()
        self.net, self.labels, self.flip, self.seen = net, labels, flip, []

    def forward(self, x):
        logits = self.net(x)
        if len(self.seen) == self.flip:
            logits = logits - 100 * torch.arange(len(x)).remainder(2).eq(0)[:, None] * F.one_hot(self.labels, 10)
        self.seen.append((x.detach().clone(), logits.detach()))
        return logits


def test_pgd_keeps_the_first_breaking_or_else_the_highest_loss_iterate(net, digits):
    x, y = digits
    keep = correct(net, x, y)
    x, y = x[keep], y[keep]  # all clean-correct: every pass sees the whole batch
    recorder = Recorder(net, y, flip=5)
    adversarial = attacks.build("pgd", recorder, 0.05, steps=10, compact=False)(x, y)  # every pass whole
    points, logits = zip(*recorder.seen[1:])  # after the clean check: the start and ten steps
    assert len(points) == 11
    wrong = torch.stack([z.argmax(1) != y for z in logits])
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
    chosen = torch.where(wrong.any(0), wrong.int().argmax(0), losses.argmax(0))  # argmax: the first
    expected = torch.stack(points)[chosen, torch.arange(len(y))]
    assert torch.equal(adversarial, expected)
    assert (chosen[::2] == 4).any() and (chosen[1::2] == 10).any()  # flipped; last of 10 steps
    assert wrong.any(0).sum() > wrong[-1].sum()  # broken only by an earlier iterate


@pytest.mark.parametrize("eps, loss", [(0.05, "ce"), (EPS, "ce"), (0.3, "dlr")])
def test_pgd_dropping_broken_digits_changes_no_byte(net, digits, eps, loss):
    x, y = digits
    counting = torch.nn.Sequential(net)
    counting.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    sizes = []
    reference = attacks.build("pgd", counting, eps, seed=2, restarts=3, steps=20, loss=loss, compact=False)(x, y)
    whole, sizes = sizes, []
    dropped = attacks.build("pgd", counting, eps, seed=2, restarts=3, steps=20, loss=loss)(x, y)
    assert dropped.numpy().tobytes() == reference.numpy().tobytes()
    assert sum(sizes) < sum(whole) and sizes[1] == whole[1]  # the first restart starts whole, then digits leave


def test_pgd_keeps_a_batch_adaptive_networks_batch_whole_within_a_restart(net, digits):
    from pixgen.dent import Dent, DentConfig

    x, y = digits[0][:24], digits[1][:24]
    dent = Dent(net, DentConfig(steps=1, batch_size=24))
    sizes = []
    dent.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    attacks.build("pgd", dent, 0.2, steps=4)(x, y)
    assert attacks.batch_adaptive(dent) and not attacks.batch_adaptive(net)
    assert len(set(sizes[1:])) == 1 and len(sizes) == 6  # the clean check, then five passes of one batch


def test_dlr_loss(net, digits):
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    labels = torch.tensor([0, 1])
    # digit 0: −(3 − 1) / (3 − 0); digit 1: −(2 − 5) / (5 − 1)
    torch.testing.assert_close(attacks.dlr(logits, labels), torch.tensor([-2 / 3, 3 / 4]))
    torch.testing.assert_close(attacks.dlr(10 * logits, labels), attacks.dlr(logits, labels))  # scale-free
    with pytest.raises(PixgenError, match="3 classes"):
        attacks.dlr(logits[:, :2], labels)
    x, y = digits
    dlr = correct(net, attacks.build("pgd", net, EPS, loss="dlr")(x, y), y).mean()
    assert dlr < correct(net, attacks.build("fgsm", net, EPS)(x, y), y).mean()


def test_pgd_with_two_losses_runs_the_first_losses_restarts_then_the_seconds_on_the_survivors(net, digits):
    x, y = digits
    sizes = []
    counting = torch.nn.Sequential(net)
    counting.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    ce = correct(net, attacks.build("pgd", net, EPS, steps=5, restarts=2)(x, y), y)
    both = correct(net, attacks.build("pgd", counting, EPS, steps=5, restarts=2, loss=("ce", "dlr"), compact=False)(x, y), y)
    assert not (both & ~ce).any()  # the CE restarts are the CE-only run's, then DLR can only add
    # the clean check, two CE restarts of six passes, then DLR's first restart on CE's survivors
    assert len(sizes) == 1 + 4 * 6 and sizes[13] == int(ce.sum())
    dlr = correct(net, attacks.build("pgd", net, EPS, steps=5, restarts=2, loss="dlr")(x, y), y)
    assert (both == ce & dlr).mean() > 0.9  # about the per-digit AND of the two (DLR here starts elsewhere)
    with pytest.raises(PixgenError, match="unknown PGD loss 'cw'"):
        attacks.build("pgd", net, EPS, loss=("ce", "cw"))


def test_fgsm_sweep_equals_fgsm_per_eps(net, digits):
    x, y = digits
    eps_list = [0.0, 0.05, EPS, 0.2]
    swept = attacks.fgsm_sweep(net, x, y, eps_list, batch_size=40)
    assert swept.shape == (4, 100) and swept.dtype == bool
    for e, eps in enumerate(eps_list):
        separate = np.concatenate([correct(net, attacks.build("fgsm", net, eps)(x[s], y[s]), y[s]) for s in (slice(0, 40), slice(40, 80), slice(80, 100))])
        np.testing.assert_array_equal(swept[e], separate)
    assert swept[0].mean() > swept[2].mean() > swept[3].mean()
    for eps, adversarial in zip(eps_list, attacks.fgsm_grid(net, x, y, eps_list)):
        assert adversarial.numpy().tobytes() == attacks.build("fgsm", net, eps)(x, y).numpy().tobytes()


def test_robust_correct_is_monotone_and_attacks_only_survivors(net, digits, monkeypatch):
    x, y = digits
    attacked = {}

    def counting(model, eps, stream, **params):
        attack = attacks.pgd(model, eps, stream, **params)

        def run(images, labels):
            attacked.setdefault(eps, []).append(images)
            return attack(images, labels)

        return run

    monkeypatch.setitem(attacks.ATTACKS, "pgd", counting)
    eps_list = [EPS, 0.0, 0.05, 0.2]
    outcome = attacks.robust_correct("pgd", net, x, y, eps_list, batch_size=30, steps=10)
    by_eps = dict(zip(eps_list, outcome))
    np.testing.assert_array_equal(by_eps[0.0], correct(net, x, y))
    for smaller, larger in ((0.0, 0.05), (0.05, EPS), (EPS, 0.2)):
        assert not (by_eps[larger] & ~by_eps[smaller]).any()
        assert len(torch.cat(attacked[larger])) == by_eps[smaller].sum()  # the broken were not attacked again
    assert 0.0 not in attacked and by_eps[0.05].sum() > by_eps[EPS].sum() > 0
    every = attacks.robust_correct("pgd", net, x, y, [0.05, EPS], batch_size=30, per_digit=False, steps=10)
    assert len(torch.cat(attacked[EPS][-4:])) == len(y)  # a batch-adaptive network: every digit, every ε
    assert not (every[1] & ~every[0]).any()


def test_robust_correct_of_fgsm_is_the_running_and_of_the_sweep(net, digits):
    x, y = digits
    eps_list = [0.05, EPS, 0.2, 0.3]
    expected = np.logical_and.accumulate(attacks.fgsm_sweep(net, x, y, [0.0, *eps_list]), axis=0)[1:]
    np.testing.assert_array_equal(attacks.robust_correct("fgsm", net, x, y, eps_list, batch_size=100), expected)


def test_autoattack_is_at_least_as_strong_as_pgd_and_deterministic(net, digits):
    x, y = digits[0][:40], digits[1][:40]
    pgd = correct(net, attacks.build("pgd", net, EPS)(x, y), y)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    runs = [attacks.build("autoattack", net, EPS, seed=1)(x, y) for _ in range(2)]
    assert torch.equal(torch.rand(4), expected)
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()
    auto = correct(net, runs[0], y)
    assert 0 < auto.sum() <= pgd.sum() < correct(net, x, y).sum()


def test_square_reads_only_predictions_and_is_deterministic(net, digits):
    """Square through a network with no gradient at all (its output detached from its input) breaks
    about the digits PGD breaks through the network itself."""
    x, y = digits[0][:40], digits[1][:40]

    class Opaque(torch.nn.Module):
        def forward(self, images):
            with torch.no_grad():
                return net(images)

    runs = [attacks.build("square", Opaque(), EPS, seed=4)(x, y) for _ in range(2)]
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()
    with pytest.raises(RuntimeError):  # a gradient attack cannot run on it
        attacks.build("pgd", Opaque(), EPS)(x, y)
    clean, pgd = correct(net, x, y), correct(net, attacks.build("pgd", net, EPS)(x, y), y)
    broken = clean & ~correct(net, runs[0], y)
    assert broken.sum() >= 0.5 * (clean & ~pgd).sum() > 0


def test_sanity_warnings_and_worst_case():
    good = {"fgsm": {0.0: [1, 1, 1, 1], 0.1: [1, 1, 0, 0], 0.5: [0, 0, 0, 0]}, "pgd": {0.1: [1, 0, 0, 0], 0.5: [0, 0, 0, 0]}}
    as_bool = lambda results: {a: {e: np.array(c, bool) for e, c in r.items()} for a, r in results.items()}  # noqa: E731
    assert attacks.sanity_warnings(as_bool(good)) == []
    rising = as_bool({"fgsm": {0.1: [1, 0, 0, 0], 0.2: [1, 1, 0, 0]}})
    (warning,) = attacks.sanity_warnings(rising)
    assert "fgsm" in warning and "rises" in warning and "0.2" in warning
    weaker = as_bool({"fgsm": {0.1: [1, 0, 0, 0]}, "autoattack": {0.1: [1, 1, 0, 0]}})
    (warning,) = attacks.sanity_warnings(weaker)
    assert "autoattack at ε 0.1 leaves 1 digit(s) correct that fgsm breaks" in warning
    half = as_bool({"pgd": {0.5: [1, 1, 0, 0]}, "autoattack": {0.5: [1, 0, 0, 0]}})
    (warning,) = attacks.sanity_warnings(half)
    assert "25.0% of digits survive every attack at ε 0.5" in warning  # the worst case, not each attack
    np.testing.assert_array_equal(attacks.worst_case({a: r[0.5] for a, r in half.items()}), [True, False, False, False])
    with pytest.raises(PixgenError):
        attacks.worst_case({})
