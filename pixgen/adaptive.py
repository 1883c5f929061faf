"""Attacks on DENT that use its internals (pixgen.dent), as reviewers of test-time defences expect
(Croce et al. 2022; Chen et al. 2022). Each is `attack(dent, x, y, eps, seed, **params)` and
returns adversarial images in the L∞ ball of radius eps around x, inside [0, 1]:

- `transfer`: PGD on the static network (DENT's starting point), the images then shown to DENT;
- `fixed_point` (Chen et al.'s FPA): adapt DENT to the current adversarial batch, freeze those
  per-digit parameters, attack the frozen network by PGD from the clean digits, adapt again to
  the new batch, for some rounds; round 0 attacks the static network, so it starts as `transfer`;
- `eot_batches`: expectation over the batch: DENT's prediction of a digit depends on the digits
  it is batched with, so each step places the adversarial digits in fresh random batches of
  clean digits (a few adversarial digits per batch), and averages the gradients, through the
  adaptation, over those placements;
- `adaptive_apgd`: APGD (Croce & Hein 2020: a step size that halves where progress stalls, and
  momentum) through the unrolled adaptation (Dent.adapt(differentiable=True)) with restarts, on
  cross-entropy and on Croce & Hein's DLR loss.

`x` is the batch DENT sees (callers split a set into batches of `dent.config.batch_size`); DENT's
gradients do not cross between digits (see pixgen.dent.shot), so a batch's loss is a sum of
per-digit attacks. Every attack keeps, per digit, the best point it met as judged by the
defended network: the lowest margin (true logit minus the largest other; below 0 is an error),
for `eot_batches` the fewest correct placements, then the lowest mean margin. Points chosen from
different iterates form a batch no iterate was judged in; callers evaluate DENT on the returned
batch, as on any other. Randomness (starts, placements) comes from a generator seeded by `seed`.

Unlike pixgen.attacks' PGD, no attack here drops a digit once it is broken: DENT adapts every
digit to its batch (the diversity term's mean prediction), so a smaller batch changes the others'
adaptation, margins and gradients; a broken digit's best point keeps improving, which changes the
batch the caller judges; and the PGD on the static network (transfer, fixed point) must run every
digit to the end, since breaking the static network is not breaking DENT. What is cut instead is
work no result depends on: EOT keeps only its adversarial digits in the graph (Dent.adapt's
`tracked`) and predicts only them.
"""

from __future__ import annotations

import torch

from . import PixgenError
from .attacks import LOSSES, cross_entropy, loss_and_gradient
from .dent import Dent


def transfer(dent: Dent, x, y, eps: float, seed: int, steps: int = 20, alpha: float | None = None) -> torch.Tensor:
    """PGD on the static network; per digit, that point or the clean digit, whichever DENT's
    margin is lower on (each judged in its own batch)."""
    generator = torch.Generator().manual_seed(seed)
    adv = pgd(dent.model, x, y, eps, steps, alpha, generator, cross_entropy)
    best = Best(x, dent_margin(dent, x, y))
    best.update(adv, dent_margin(dent, adv, y))
    return best.x


def fixed_point(dent: Dent, x, y, eps: float, seed: int, rounds: int = 4, steps: int = 20, alpha: float | None = None) -> torch.Tensor:
    """Chen et al.'s fixed-point attack: PGD on DENT frozen at its adaptation to the previous
    adversarial batch (round 0: the static network), then adapt to the new batch; `rounds` times."""
    generator = torch.Generator().manual_seed(seed)
    best = Best(x, dent_margin(dent, x, y))
    params = dent.start.expand(len(x), -1)
    for _ in range(rounds):
        adv = pgd(lambda z, frozen=params: dent.predict(z, frozen), x, y, eps, steps, alpha, generator, cross_entropy)
        with torch.no_grad():
            params = dent.adapt(adv)
            best.update(adv, margin(dent.predict(adv, params), y))
    return best.x


# AutoAttack's APGD steps. At 20 steps, APGD through DENT left PixMix-BN 33.6% at ε 0.1 (256 digits)
# where AutoAttack by transfer left 30.1%; at 100 it left 30.5% against 31.2% (128 digits).
APGD_STEPS = 100


def adaptive_apgd(dent: Dent, x, y, eps: float, seed: int, steps: int = APGD_STEPS, restarts: int = 1, losses=("ce", "dlr"), alpha: float | None = None, from_transfer: bool = True, transfer_steps: int = 20) -> torch.Tensor:
    """APGD of `steps` through DENT's unrolled adaptation, per loss `restarts` random starts and,
    with from_transfer, one start at `transfer`'s point (PGD of `transfer_steps` steps of `alpha`;
    the same for the same seed): entropy minimisation reinforces whatever class DENT leans to,
    which leaves local optima that gradients through the adaptation alone can miss (see README,
    "Attacks on DENT")."""
    generator = torch.Generator().manual_seed(seed)
    starts = [pgd(dent.model, x, y, eps, transfer_steps, alpha, generator, cross_entropy)] if from_transfer else []
    best = Best(x, dent_margin(dent, x, y))
    through = lambda z: dent.predict(z, dent.adapt(z, differentiable=True))  # noqa: E731
    for loss in losses:
        for start in starts + [None] * restarts:
            adv = apgd(through, x, y, eps, steps, generator, LOSSES[loss], best, start)
            best.update(adv, dent_margin(dent, adv, y))
    return best.x


def eot_batches(dent: Dent, x, y, eps: float, seed: int, pool=None, draws: int = 4, steps: int = 20, per_batch: int | None = None, alpha: float | None = None) -> torch.Tensor:
    """PGD through the adaptation, the gradient averaged over `draws` random placements per step:
    the adversarial digits `per_batch` at a time (default an eighth of DENT's batch) among clean
    digits drawn from `pool` (default x) to fill DENT's batch size. Each iterate is judged in the
    placements its gradient came from, the last in fresh ones."""
    generator = torch.Generator().manual_seed(seed)
    pool = x if pool is None else pool
    per_batch = per_batch or max(1, dent.config.batch_size // 8)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    best = BestInBatches(x, *_judge_in_random_batches(dent, x, y, pool, draws, per_batch, generator))
    adv = start_in_ball(x, eps, generator)
    for _ in range(steps):
        adv.requires_grad_()
        grad = torch.zeros_like(x)
        wrong, margins = torch.zeros(len(x), device=x.device), torch.zeros(len(x), device=x.device)
        for group, logits in placements(dent, adv, pool, draws, per_batch, generator, differentiable=True):
            with torch.enable_grad():
                grad += torch.autograd.grad(cross_entropy(logits, y[group]).sum(), adv)[0]
            with torch.no_grad():
                wrong[group] += (logits.argmax(1) != y[group]).float()
                margins[group] += margin(logits, y[group])
        adv = adv.detach()
        best.update(adv, wrong / draws, margins / draws)
        adv = project(adv + alpha * grad.sign(), x, eps)
    best.update(adv, *_judge_in_random_batches(dent, adv, y, pool, draws, per_batch, generator))
    return best.x


def accuracy_in_random_batches(dent: Dent, x, y, pool, seed: int, draws: int = 4, per_batch: int | None = None) -> torch.Tensor:
    """Per digit, the fraction of `draws` random placements among clean `pool` digits (as in
    `eot_batches`) in which DENT classifies it correctly."""
    generator = torch.Generator().manual_seed(seed)
    per_batch = per_batch or max(1, dent.config.batch_size // 8)
    wrong, _ = _judge_in_random_batches(dent, x, y, pool, draws, per_batch, generator)
    return 1 - wrong


# ---------------------------------------------------------------- shared steps


def pgd(model, x, y, eps, steps, alpha, generator, loss, best=None, start=None) -> torch.Tensor:
    """L∞ PGD from `start` (default a random point of the ball), signed gradient steps of alpha
    (default 2.5 ε / steps, so the ball can be crossed with room to spare); with `best`, every
    iterate is offered to it (judged by the logits `model` gave it, which must then be the
    defended network's)."""
    alpha = 2.5 * eps / steps if alpha is None else alpha
    adv = start_in_ball(x, eps, generator) if start is None else start
    for _ in range(steps):
        with torch.enable_grad():  # attacks run under evaluation's no_grad too
            adv.requires_grad_()
            logits = model(adv)
            grad = torch.autograd.grad(loss(logits, y).sum(), adv)[0]
        adv = adv.detach()
        if best is not None:
            best.update(adv, margin(logits.detach(), y))
        adv = project(adv + alpha * grad.sign(), x, eps)
    return adv


def apgd_checkpoints(steps: int) -> set[int]:
    """APGD's checkpoints: after 22% of the steps, then at gaps shrinking by 3% of the steps to
    no less than 6% (Croce & Hein 2020, in the rounding of their code)."""
    points, at, gap = set(), max(int(0.22 * steps), 1), max(int(0.22 * steps), 1)
    while at < steps:
        points.add(at)
        gap = max(gap - max(int(0.03 * steps), 1), max(int(0.06 * steps), 1))
        at += gap
    return points


def apgd(model, x, y, eps, steps, generator, loss, best=None, start=None) -> torch.Tensor:
    """Croce & Hein 2020's APGD, L∞, per digit: signed steps of η (first 2ε) with momentum 0.75;
    at each checkpoint η halves, and the digit goes back to its highest-loss point, where fewer
    than 75% of the steps since the last checkpoint raised the loss, or where η did not halve at
    the last checkpoint and the highest loss has not changed since. Starts from `start` (default
    a random point of the ball); with `best`, every iterate is offered to it, judged by the logits
    `model` gave it (which must be the defended network's). Returns the highest-loss point of the
    steps + 1 it evaluates."""

    def value_and_gradient(z):
        logits, values, grad = loss_and_gradient(model, z, y, loss)
        if best is not None:
            best.update(z.detach(), margin(logits, y))
        return values, grad

    shape = (len(x),) + (1,) * (x.dim() - 1)
    eta = torch.full(shape, 2.0 * eps, device=x.device)
    previous = (start_in_ball(x, eps, generator) if start is None else start).detach().clone()
    value, grad = value_and_gradient(previous)
    top_x, top_value, top_grad = previous.clone(), value.clone(), grad.clone()
    current = project(previous + eta * grad.sign(), x, eps)
    value_at, raised, cut_last = value.clone(), torch.zeros(len(x), device=x.device), torch.ones(len(x), dtype=torch.bool, device=x.device)
    top_at_checkpoint, last_checkpoint, checkpoints = top_value.clone(), 0, apgd_checkpoints(steps)
    for k in range(1, steps + 1):
        value, grad = value_and_gradient(current)
        raised += (value > value_at).float()
        higher = value > top_value
        top_x[higher], top_value[higher], top_grad[higher] = current[higher], value[higher], grad[higher]
        value_at = value
        if k == steps:
            return top_x
        if k in checkpoints:
            cut = (raised < 0.75 * (k - last_checkpoint)) | (~cut_last & (top_value == top_at_checkpoint))
            eta[cut] /= 2
            current[cut], grad[cut], value_at[cut] = top_x[cut], top_grad[cut], top_value[cut]
            previous[cut] = current[cut]  # no momentum out of a point the digit jumped back to
            cut_last, top_at_checkpoint, last_checkpoint = cut, top_value.clone(), k
            raised.zero_()
        step = project(current + eta * grad.sign(), x, eps)
        previous, current = current, project(current + 0.75 * (step - current) + 0.25 * (current - previous), x, eps)


def start_in_ball(x, eps, generator) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x.device)
    return project(x + eps * (2 * noise - 1), x, eps)


def project(adv, x, eps) -> torch.Tensor:
    return torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)


def placements(dent: Dent, adv, pool, draws, per_batch, generator, differentiable: bool):
    """(indices of adversarial digits, DENT's logits for them) for each random batch: per draw,
    the digits shuffled into groups of `per_batch`, each group filled up to DENT's batch size
    with distinct random pool digits."""
    smallest = min(per_batch, len(adv) % per_batch or per_batch)
    if dent.config.batch_size - smallest > len(pool):
        raise PixgenError(f"a pool of {len(pool)} clean digits cannot fill DENT's batches of {dent.config.batch_size}; pass a larger pool")
    for _ in range(draws):
        for group in torch.randperm(len(adv), generator=generator).split(per_batch):
            fill = torch.randperm(len(pool), generator=generator)[: dent.config.batch_size - len(group)]
            group, clean = group.to(adv.device), pool[fill.to(pool.device)]
            with torch.set_grad_enabled(differentiable):
                batch = torch.cat([adv[group], clean])
                params = dent.adapt(batch, differentiable, tracked=len(group))[: len(group)]
                logits = dent.predict(batch[: len(group)], params)
            yield group, logits


def _judge_in_random_batches(dent, x, y, pool, draws, per_batch, generator):
    """Per digit: the fraction of placements in which DENT errs, and the mean margin."""
    wrong, margins = torch.zeros(len(x), device=x.device), torch.zeros(len(x), device=x.device)
    for group, logits in placements(dent, x, pool, draws, per_batch, generator, differentiable=False):
        wrong[group] += (logits.argmax(1) != y[group]).float()
        margins[group] += margin(logits, y[group])
    return wrong / draws, margins / draws


class Best:
    """Per digit, the point with the lowest margin offered so far."""

    def __init__(self, x, margins):
        self.x, self.margin = x.detach().clone(), margins.detach().clone()

    def update(self, x, margins):
        better = margins < self.margin
        self.x[better], self.margin[better] = x[better].detach(), margins[better]


class BestInBatches:
    """Per digit, the point wrong in the most random batches offered so far, then the lowest mean margin."""

    def __init__(self, x, wrong, margins):
        self.x, self.wrong, self.margin = x.detach().clone(), wrong.clone(), margins.clone()

    def update(self, x, wrong, margins):
        better = (wrong > self.wrong) | ((wrong == self.wrong) & (margins < self.margin))
        self.x[better], self.wrong[better], self.margin[better] = x[better].detach(), wrong[better], margins[better]


# ---------------------------------------------------------------- losses and margins


def margin(logits, y) -> torch.Tensor:
    """True logit minus the largest other, per digit (< 0: misclassified)."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return (true - other).detach()


def dent_margin(dent: Dent, x, y) -> torch.Tensor:
    with torch.no_grad():
        return margin(dent.predict(x, dent.adapt(x)), y)
