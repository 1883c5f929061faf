"""L∞ attacks by name. `ATTACKS` maps a name to a builder; `build(name, model, eps, seed=, batch=,
**params)` returns `atk(images, labels) -> adversarial images` (float in [0, 1], same shape, within ε
of the images in L∞), so an evaluation loops over (defence × attack × ε) with one call shape.
Adding an attack is one builder `f(model, eps, stream, **params) -> atk` and one entry in ATTACKS.

- fgsm: one step of size ε along the sign of the cross-entropy gradient, clamped to [0, 1].
  Deterministic. `fgsm_sweep` scores many ε from the one gradient they share.
- pgd: `steps` (40) signed-gradient steps of ε/4 (BACKGROUND's MNIST setting: 8 steps cross the
  ball, 32 refine) from a uniform random start in the ε-ball, projected onto the ball ∩ [0, 1];
  `loss` "ce" (cross-entropy) or "dlr" (Croce & Hein 2020's difference of logits ratio, invariant
  to the logits' scale, so a saturated softmax does not hide the gradient), or several losses in
  turn; `restarts` (1) random starts per loss. Each digit keeps its best point: the first iterate
  of any restart that the network misclassifies (the clean image counts, as it lies in every
  ball), else the highest-loss iterate seen under the last loss. Restarts after the first run
  only on the digits still correct, and within a restart a digit leaves the batch once broken
  (`compact`; never on a batch-adaptive network such as DENT, whose prediction of a digit depends
  on its batch-mates). A network that classifies each digit
  on its own gives every digit the same iterates either way, so the outcome is the same bytes.
- autoattack: the official AutoAttack, "standard" version (fra31/auto-attack as packaged on PyPI
  as `pyautoattack`): APGD-CE and APGD-T (9 target classes), FAB-T (9 targets), 100 iterations
  each, then Square with 5,000 queries, each run on the digits the previous ones left correct.
  It runs on the images' device, its progress output off; its warnings (zero gradients, a
  randomised or dynamic defence such as DENT) go to the "auto-attack" logger.

- square: AutoAttack's Square alone, 5,000 queries of the network's predictions (no gradient), as
  its standard version runs it; the score-based attack on a defence as a whole (DENT included).

At ε = 0 every attack is the identity (the ball is the image itself), so none is run.

Attacks use the network as given: pass it in eval mode. A batch-adaptive network (DENT) predicts a
digit from its whole batch; pgd's later restarts and AutoAttack's stages attack the subsets still
correct, so for such a network those batches differ from the caller's.

Randomness is keyed by what an attack is, never by where it sits in a list: `stream_seed(seed,
name, eps, batch)` mixes the run's seed, a stable hash of the attack's name, ε and the batch index
into one stream, and each restart forks torch's global generator from (stream, restart) through
`seeded`, which restores the caller's generator afterwards. The same arguments give the same bytes.

Per-digit outcomes: `robust_correct` returns, per ε, which digits stay correct, attacking at each ε
only the digits not already broken at a smaller one (sound for L∞: the smaller ball lies inside the
larger, so its adversarial point is one of the larger ball's). `worst_case` is the per-digit AND over
attacks, the number to report; `sanity_warnings` flags results a reviewer would reject.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError
from .dent import Dent

PGD_STEPS = 40
STRENGTH = ("fgsm", "pgd", "autoattack")  # weakest first: a stronger attack should break a superset
HALF = 0.5  # from ε = 0.5 every digit can reach the uniform grey image, so at most one class survives


# ---------------------------------------------------------------- random streams


def stream_seed(seed: int, name: str, eps: float, batch: int = 0) -> int:
    """The stream of attack `name` at ε on batch `batch` of a run seeded `seed`."""
    key = [seed, zlib.crc32(name.encode()), round(eps * 1e6), batch]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@contextlib.contextmanager
def seeded(*keys: int):
    """Run a block with torch's global generator seeded from `keys`, restoring it afterwards."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------- losses


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3) per digit, π sorting the logits in decreasing order."""
    if logits.shape[1] < 3:
        raise PixgenError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    ordered = logits.sort(1, descending=True).values
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], -torch.inf).max(1).values
    return (other - true) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


LOSSES = {"ce": cross_entropy, "dlr": dlr}


def loss_and_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss, gradient: bool = True):
    """(logits, per-digit loss, d(summed loss)/dx or None). The sum, not the mean, so a digit's
    gradient does not shrink with the batch size; callers may be inside torch.no_grad."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(gradient)
        logits = model(x)
        losses = loss(logits, labels)
        grad = torch.autograd.grad(losses.sum(), x)[0] if gradient else None
    return logits.detach(), losses.detach(), grad


# ---------------------------------------------------------------- attacks


def fgsm_direction(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return loss_and_gradient(model, images, labels, cross_entropy)[2].sign()


def signed_step(images: torch.Tensor, direction: torch.Tensor, eps: float) -> torch.Tensor:
    return (images.detach() + eps * direction).clamp(0, 1)


def fgsm(model: nn.Module, eps: float, stream: int):
    """FGSM draws nothing: `stream` is unused."""
    return lambda images, labels: signed_step(images, fgsm_direction(model, images, labels), eps)


def batch_adaptive(model: nn.Module) -> bool:
    """Whether the network's prediction of a digit depends on the other digits of its batch."""
    return any(isinstance(m, Dent) for m in model.modules())


def pgd(model: nn.Module, eps: float, stream: int, steps: int = PGD_STEPS, restarts: int = 1, loss: str | tuple[str, ...] = "ce", compact: bool = True):
    """loss: a name of LOSSES, or several, each run for `restarts` restarts in turn; compact=False
    keeps broken digits in the batch to the end of the restart (the reference path the tests and
    benchmarks compare the compacted one with)."""
    loss_names = (loss,) if isinstance(loss, str) else tuple(loss)
    unknown = [name for name in loss_names if name not in LOSSES]
    if unknown or not loss_names:
        raise PixgenError(f"unknown PGD loss {(unknown or ['(none)'])[0]!r}; choose from {', '.join(LOSSES)}")
    if steps < 1 or restarts < 1:
        raise PixgenError(f"PGD needs steps >= 1 and restarts >= 1, got {steps}, {restarts}")
    step_size = eps / 4
    compact = compact and not batch_adaptive(model)

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.detach()
        best = x.clone()
        with torch.no_grad():
            broken = model(x).argmax(1) != labels
        for restart in range(restarts * len(loss_names)):
            loss_fn = LOSSES[loss_names[restart // restarts]]
            if restart % restarts == 0:  # losses differ in scale: a digit's best is judged by one
                best_loss = torch.full((len(x),), -torch.inf, device=x.device)
            active = (~broken).nonzero()[:, 0]
            if len(active) == 0:
                break
            with seeded(stream, restart):
                # drawn for the whole batch on the CPU: a digit's start depends on neither which
                # digits are still active nor the device
                start = torch.rand(x.shape) * 2 - 1
            xa, ya = x[active], labels[active]
            low, high = (xa - eps).clamp(min=0), (xa + eps).clamp(max=1)
            point = torch.clamp(xa + eps * start[active.cpu()].to(x.device), low, high)
            for step in range(steps + 1):
                logits, losses, grad = loss_and_gradient(model, point, ya, loss_fn, gradient=step < steps)
                wrong = logits.argmax(1) != ya
                open_ = ~broken[active]  # a broken digit keeps the point that broke it
                better = open_ & (wrong | (losses > best_loss[active]))
                best[active[better]] = point[better]
                best_loss[active[better]] = losses[better]
                broken[active[wrong]] = True
                if grad is None:
                    break
                point = torch.clamp(point + step_size * grad.sign(), low, high)
                if compact:
                    still = ~broken[active]
                    if not still.any():
                        break
                    # Not down to one digit: a batch of one takes the matrix-vector kernels, whose
                    # rounding differs, and the digit would leave the path it took in the batch.
                    if 2 <= int(still.sum()) < len(active):
                        active, point, ya, low, high = active[still], point[still], ya[still], low[still], high[still]
        return best

    return attack


def autoattack(model: nn.Module, eps: float, stream: int, parts: tuple[str, ...] | None = None):
    """The standard version, or (`parts`) a custom run of those of its attacks."""
    from pyautoattack import AutoAttack

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if parts is None:
            runner = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=stream, device=images.device)
        else:
            runner = AutoAttack(model, attacks=list(parts), eps=eps, norm="Linf", version="custom", seed=stream, device=images.device)
        runner.verbose = False
        # its stages reseed torch's global generator from `seed`; the fork keeps that from the caller
        with seeded(stream):
            adversarial, _ = runner.run_standard_evaluation(images.detach(), labels, batch_size=len(images))
        return adversarial

    return attack


def square(model: nn.Module, eps: float, stream: int):
    """AutoAttack's Square (5,000 queries, as in its standard version) alone: it reads only the
    network's predictions, so it attacks a defence as a whole, gradients or none."""
    return autoattack(model, eps, stream, parts=("square",))


ATTACKS = {"fgsm": fgsm, "pgd": pgd, "autoattack": autoattack, "square": square}


def build(name: str, model: nn.Module, eps: float, seed: int = 0, batch: int = 0, **params):
    """`atk(images, labels)` for attack `name` at budget ε, its randomness from (seed, name, ε,
    batch); params go to the attack (pgd: steps, restarts, loss)."""
    if name not in ATTACKS:
        raise PixgenError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if not eps >= 0:
        raise PixgenError(f"attack budget ε must be ≥ 0, got {eps}")
    attack = ATTACKS[name](model, eps, stream_seed(seed, name, eps, batch), **params)  # checks params
    return attack if eps > 0 else (lambda images, labels: images)


# ---------------------------------------------------------------- per-digit outcomes


def _spans(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return (model(images).argmax(1) == labels).cpu().numpy()


def fgsm_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list) -> list[torch.Tensor]:
    """FGSM's adversarial batch at every ε of eps_list (the bytes `build("fgsm", …)` gives at each),
    from the one gradient at the images they share: an ε grid costs one gradient, not one per ε.
    Also for DENT, whose gradient at the clean batch does not depend on ε either."""
    direction = fgsm_direction(model, images, labels)
    return [images if eps == 0 else signed_step(images, direction, eps) for eps in eps_list]


def fgsm_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list, batch_size: int = 250) -> np.ndarray:
    """(E, N) bool: digit n correct under FGSM at eps_list[e]; each batch costs one gradient and
    E forward passes (`fgsm_grid`)."""
    correct = np.zeros((len(eps_list), len(y)), bool)
    for s in _spans(len(y), batch_size):
        for e, adversarial in enumerate(fgsm_grid(model, x[s], y[s], eps_list)):
            correct[e, s] = _correct(model, adversarial, y[s])
    return correct


def robust_correct(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list, seed: int = 0, batch_size: int = 250, per_digit: bool = True, **params) -> np.ndarray:
    """(E, N) bool: digit n still correct under attack `name` at eps_list[e] and at every smaller ε
    in the list (a point found in a smaller ball lies in the larger one). ε run from small to
    large; per_digit (the network classifies each digit on its own): only the digits correct so
    far are attacked, in batches of batch_size. A batch-adaptive network (per_digit=False, e.g.
    DENT) is attacked on the same full batches at every ε, as dropping digits would change what
    it predicts for the others."""
    n = len(y)
    keep = np.ones(n, bool)
    for s in _spans(n, batch_size):
        keep[s] = _correct(model, x[s], y[s])
    correct = np.zeros((len(eps_list), n), bool)
    for e in np.argsort(eps_list, kind="stable"):
        eps = eps_list[e]
        if eps > 0:
            index = np.flatnonzero(keep) if per_digit else np.arange(n)
            now = np.zeros(n, bool)
            for b, s in enumerate(_spans(len(index), batch_size)):
                digits = torch.as_tensor(index[s], device=x.device)
                images, labels = x[digits], y[digits]
                now[index[s]] = _correct(model, build(name, model, eps, seed=seed, batch=b, **params)(images, labels), labels)
            keep &= now
        correct[e] = keep
    return correct


# ---------------------------------------------------------------- checks


def worst_case(outcomes_by_attack: dict[str, np.ndarray]) -> np.ndarray:
    """Per digit (and ε), correct only if correct under every attack: no attack's per-digit
    outcome implies another's (not even AutoAttack's PGD's), so the reported robustness is this."""
    if not outcomes_by_attack:
        raise PixgenError("worst_case needs the outcomes of at least one attack")
    return np.logical_and.reduce([np.asarray(c, bool) for c in outcomes_by_attack.values()])


def sanity_warnings(results: dict[str, dict[float, np.ndarray]], order=STRENGTH, tolerance: float = 0.1) -> list[str]:
    """Human-readable warnings for results {attack: {ε: per-digit correct (N,) bool}} (all over
    the same digits): accuracy that rises with ε; a stronger attack (later in `order`) leaving
    correct digits that a weaker one breaks at the same ε; accuracy above `tolerance` at ε ≥ 0.5
    under the worst case of the attacks run there, where every digit can be moved to the uniform
    grey image, so no network, certified or not, keeps more than its most frequent class there."""
    warnings = []
    for name, by_eps in results.items():
        eps = sorted(by_eps)
        accuracy = [float(np.mean(by_eps[e])) for e in eps]
        for i in range(1, len(eps)):
            if accuracy[i] > accuracy[i - 1]:
                warnings.append(
                    f"{name}: accuracy rises with ε, from {accuracy[i - 1]:.1%} at ε {eps[i - 1]:g} to {accuracy[i]:.1%} at ε {eps[i]:g}; the attack is failing at the larger ε"
                )
    ranked = [name for name in order if name in results]
    for i, weaker in enumerate(ranked):
        for stronger in ranked[i + 1 :]:
            for eps in sorted(set(results[weaker]) & set(results[stronger])):
                missed = int((np.asarray(results[stronger][eps]) & ~np.asarray(results[weaker][eps])).sum())
                if missed:
                    warnings.append(f"{stronger} at ε {eps:g} leaves {missed} digit(s) correct that {weaker} breaks; report the per-digit worst case over attacks")
    for eps in sorted({e for by_eps in results.values() for e in by_eps if e >= HALF}):
        worst = worst_case({name: by_eps[eps] for name, by_eps in results.items() if eps in by_eps})
        if worst.mean() > tolerance:
            warnings.append(
                f"{worst.mean():.1%} of digits survive every attack at ε {eps:g}, where all can reach the same grey image; the attacks are failing (gradient masking?)"
            )
    return warnings
