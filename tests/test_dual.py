"""pixgen.dual against convex-adversarial 0.4.4, the library it replaces: the exact bound and its
gradient agree to float32 rounding, the projected estimate has the library's distribution, and
layers it cannot bound are one clear line. Inputs are MNIST digits."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from convex_adversarial.dual_network import RobustBounds
from torch import nn

from pixgen import PixgenError, data, dual, models


def _digits(split: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.load("mnist", split)
    x = torch.from_numpy(images[start : start + count].astype("float32") / 255)[:, None]
    return x, torch.from_numpy(labels[start : start + count].copy())


def _library(model, x, y, eps, projections=0):
    kwargs = {"proj": projections, "norm_type": "l1_median"} if projections else {"norm_type": "l1"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ReLU projection has no origin crossing")
        return RobustBounds(model, eps, bounded_input=True, **kwargs)(x, y)


def _close(ours, theirs):
    """1e-5 relative, and 1e-5 of the largest bound absolute: entries near 0 carry the rounding of
    their larger terms."""
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def _seeded(build, seed):
    torch.manual_seed(seed)
    return build()


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 60), nn.ReLU(), nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 10))


def _odd_convs():
    """Conv on conv (no ReLU between), odd strides and paddings, a 1-channel transpose (geometries
    whose transpose restores the size: the library has no output_padding)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=1, padding=1), nn.Conv2d(8, 8, 4, stride=2, padding=0), nn.ReLU(),
        nn.Conv2d(8, 12, 5, stride=3, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 5 * 5, 30), nn.ReLU(), nn.Linear(30, 10),
    )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_exact_bound_equals_the_library_on_random_wk_small(seed, eps):
    x, y = _digits("test", 6 * seed, 6)
    model = _seeded(lambda: models.build("wk-small"), seed)
    with torch.no_grad():
        _close(dual.bounds(model, x, y, eps), _library(model, x, y, eps))


@pytest.mark.parametrize("build", [_mlp, _odd_convs])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_exact_bound_equals_the_library_on_other_nets(build, eps):
    x, y = _digits("test", 100, 6)
    model = _seeded(build, 3)
    with torch.no_grad():
        ours = dual.bounds(model, x, y, eps)
        _close(ours, _library(model, x, y, eps))
    assert torch.all(ours[torch.arange(6), y] == 0)


def test_exact_bound_in_float64_equals_the_library():
    """pixgen's certificate runs in float64; the bound follows the model's dtype."""
    x, y = _digits("test", 50, 4)
    model = _seeded(lambda: models.build("wk-small"), 11).double()
    with torch.no_grad():
        ours = dual.bounds(model, x.double(), y, 0.1)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, _library(model, x.double(), y, 0.1), rtol=1e-10, atol=1e-10 * float(ours.abs().max()))


@pytest.mark.parametrize("build", [lambda: models.build("wk-small"), _odd_convs])
def test_exact_bound_does_not_depend_on_its_chunks(build, monkeypatch):
    """The exact passes run in chunks of at most CHUNK_FLOATS: chunks of one digit (the windows)
    and one unit (the rows on whole maps) give the bound of a single chunk."""
    x, y = _digits("test", 200, 6)
    model = _seeded(build, 5)
    with torch.no_grad():
        whole = dual.bounds(model, x, y, 0.1)
        monkeypatch.setattr(dual, "CHUNK_FLOATS", 1)
        _close(dual.bounds(model, x, y, 0.1), whole)


def test_dilated_grouped_convs_bound_as_their_dense_equivalents():
    """The library's dual convs ignore dilation and groups, so the reference here is the same net
    with each such kernel spelled out densely: zeros between the taps, zeros off the group blocks."""
    sparse = _seeded(lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 14 * 14, 20), nn.ReLU(), nn.Linear(20, 10),
    ), 10)  # fmt: skip
    dense = _seeded(lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 5, stride=1, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 14 * 14, 20), nn.ReLU(), nn.Linear(20, 10),
    ), 10)  # fmt: skip
    dense.load_state_dict(sparse.state_dict() | {"2.weight": torch.zeros(6, 4, 5, 5)})
    with torch.no_grad():
        for group in range(2):
            dense[2].weight[3 * group : 3 * group + 3, 2 * group : 2 * group + 2, ::2, ::2] = sparse[2].weight[3 * group : 3 * group + 3]
    x, y = _digits("test", 700, 6)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
        for eps in (0.05, 0.2):
            _close(dual.bounds(sparse, x, y, eps), dual.bounds(dense, x, y, eps))


@pytest.fixture(scope="module")
def trained() -> nn.Sequential:
    """wk-small after one epoch of plain Adam on 3,000 digits: few unstable ReLUs and margins of
    both signs, unlike a random net."""
    x, y = _digits("train", 0, 3000)
    model = _seeded(lambda: models.build("wk-small"), 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for s in range(0, 3000, 50):
        loss = F.cross_entropy(model(x[s : s + 50]), y[s : s + 50])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_exact_bound_equals_the_library_on_a_trained_net(trained):
    x, y = _digits("test", 0, 20)
    with torch.no_grad():
        assert (trained(x).argmax(1) == y).float().mean() > 0.8
        ours = dual.bounds(trained, x, y, 0.02)
        _close(ours, _library(trained, x, y, 0.02))
        others = ours.scatter(1, y[:, None], -torch.inf)
        assert (others.max(1).values < 0).any(), "some digit certified, so the test covers negative bounds"


def test_exact_gradients_equal_the_library():
    x, y = _digits("test", 200, 4)
    model = _seeded(lambda: models.build("wk-small"), 4)
    grads = []
    for bound in (dual.bounds, _library):
        model.zero_grad()
        F.cross_entropy(bound(model, x, y, 0.1), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


DRAWS = 160


def _draws(bound, model, x, y, eps, projections=10, draws=DRAWS):
    torch.manual_seed(5)
    with torch.no_grad():
        return torch.stack([bound(model, x, y, eps, projections) for _ in range(draws)])


def test_projected_estimate_has_the_library_distribution():
    x, y = _digits("test", 300, 4)
    model = _seeded(lambda: models.build("wk-small"), 6)
    ours, theirs = _draws(dual.bounds, model, x, y, 0.1), _draws(_library, model, x, y, 0.1)
    others = torch.ones_like(ours[0], dtype=torch.bool).scatter(1, y[:, None], False)
    ours, theirs = ours[:, others], theirs[:, others]  # (draws, 36 margins)
    # Means: z-scores of the difference; 36 margins under one law stay below 4.5 with
    # probability > 0.999 (a wrong median rank or scale moves them by tens).
    z = (ours.mean(0) - theirs.mean(0)) / ((ours.var(0) + theirs.var(0)) / DRAWS).sqrt()
    assert z.abs().max() < 4.5, z
    # Spread: one input projection drives all 36 margins of a draw, so per-margin statistics err
    # together; over seeds the median ratio of standard deviations ranged 0.93–1.16 at 160 draws,
    # and quartiles per margin agreed within 10% (a 10% rank shift of the median, or a lost
    # term, moves them further).
    ratio = (ours.std(0) / theirs.std(0)).median()
    assert 0.75 < ratio < 1.33, ratio
    for q in (0.25, 0.5, 0.75):
        torch.testing.assert_close(ours.quantile(q, 0), theirs.quantile(q, 0), rtol=0.15, atol=0)


def test_projected_estimate_with_few_unstable_relus_matches_the_library(trained):
    """Where a batch has at most k unstable units in a layer, the library bounds that layer
    exactly (one row per unit) instead of projecting it: here the first ReLU layer (~26 unstable
    units at ε 0.005 on these two digits, k = 50), while the second (~70) is projected."""
    x, y = _digits("test", 0, 2)
    ours, theirs = _draws(dual.bounds, trained, x, y, 0.005, 50, 150), _draws(_library, trained, x, y, 0.005, 50, 150)
    # The laws are narrow with a long upper tail, and one projection drives all 20 margins of a
    # draw, so their errors move together; standard deviations scatter by ±30% at this size.
    # Quartiles are stable to ~10% of the 10–90% spread (300-draw runs agree to 0.1 of it), and a
    # lost or doubled term moves them by about the whole spread.
    spread = theirs.quantile(0.9, 0) - theirs.quantile(0.1, 0)
    for q in (0.25, 0.5, 0.75):
        assert torch.all((ours.quantile(q, 0) - theirs.quantile(q, 0)).abs() <= 0.3 * spread + 1e-6), q


def test_projected_estimate_centres_on_the_exact_bound():
    """Digits squeezed into [0.2, 0.8], so that at ε 0.1 the pixel box clips nothing: the library's
    projected margins use the unclipped ε-ball at the input, and then that is the exact box."""
    x, y = _digits("test", 400, 4)
    x = 0.2 + 0.6 * x
    model = _seeded(lambda: models.build("wk-small"), 7)
    draws = _draws(dual.bounds, model, x, y, 0.1)
    with torch.no_grad():
        exact = dual.bounds(model, x, y, 0.1)
    others = torch.ones_like(exact, dtype=torch.bool).scatter(1, y[:, None], False)
    # The median of k |Cauchy| is a biased ℓ1 estimate at k = 10 and feeds nonlinear ReLU slopes;
    # the mean bound stays within 10% of the exact one.
    torch.testing.assert_close(draws.mean(0)[others], exact[others], rtol=0.1, atol=0)


def test_projected_estimate_draws_from_the_generator_or_the_global_rng():
    x, y = _digits("test", 500, 3)
    model = _seeded(lambda: models.build("wk-small"), 8)
    with torch.no_grad():
        a = dual.bounds(model, x, y, 0.1, 10, torch.Generator().manual_seed(1))
        b = dual.bounds(model, x, y, 0.1, 10, torch.Generator().manual_seed(1))
        torch.manual_seed(1)
        c = dual.bounds(model, x, y, 0.1, 10)
        torch.manual_seed(1)
        d = dual.bounds(model, x, y, 0.1, 10)
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, dual.bounds(model, x, y, 0.1, 10))


def test_projected_estimate_is_differentiable():
    x, y = _digits("test", 600, 8)
    model = _seeded(lambda: models.build("wk-small"), 9)
    F.cross_entropy(dual.bounds(model, x, y, 0.1, 10), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2), nn.BatchNorm2d(16)])
def test_unsupported_layer_is_one_clear_line(layer):
    model = nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), layer, nn.ReLU(), nn.Flatten(), nn.Linear(100, 10))
    x, y = _digits("test", 0, 2)
    with pytest.raises(PixgenError, match=f"cannot bound a {type(layer).__name__} layer") as error:
        dual.bounds(model, x, y, 0.1)
    assert "\n" not in str(error.value)


def test_projected_bound_and_gradients_do_not_depend_on_the_thread_count():
    """The Numba kernels split the batch over torch's threads."""
    x, y = _digits("test", 700, 12)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = _seeded(lambda: models.build("wk-small"), 12)
            bound = dual.bounds(model, x, y, 0.1, 10, torch.Generator().manual_seed(3))
            F.cross_entropy(bound, y).backward()
            results.append((bound.detach(), [p.grad for p in model.parameters()]))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for one, two in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5 * float(one.abs().max()))


def test_cpu_kernels_equal_the_torch_expressions_used_elsewhere():
    """Values and gradients of the Numba-backed steps against the plain torch they replace (and
    that other devices run), in float64 on MNIST-sized blocks."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    rows, d, low, weight = randn(3, 10, 5, 4, 6), randn(3, 5, 4, 6), randn(3, 5, 4, 6), randn(7, 120)
    cases = [
        (dual._scale, lambda r, s: r * s[:, None], (rows, d)),
        (dual._relu_term_sum, lambda r, s: (F.relu(r) * s[:, None]).flatten(2).sum(2), (rows, low)),
        (dual._abs_median, lambda r: r.abs().median(1).values, (rows,)),
        (lambda r, w: dual._estimate(r, True, w), lambda r, w: F.linear(r, w).abs().median(1).values, (rows.flatten(2), weight)),
    ]
    for ours, reference, inputs in cases:
        a, b = ours(*inputs), reference(*inputs)
        torch.testing.assert_close(a, b)
        grad = torch.randn(a.shape, dtype=a.dtype, generator=generator)
        torch.testing.assert_close(torch.autograd.grad(a, inputs, grad), torch.autograd.grad(b, inputs, grad))
