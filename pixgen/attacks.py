"""L∞ attacks from torchattacks, each built as `build(name, model, eps)` and called `atk(images,
labels)`, so an evaluation loops over (defence × attack × ε) with one call shape.

- fgsm: one signed-gradient step of size ε.
- pgd: 40 steps of ε/4 from a uniform random start in the ε-ball, clamped to [0, 1] (BACKGROUND's
  MNIST setting; a step of ε/4 crosses the ball in 8 steps, leaving 32 to refine).
- autoattack: the official "standard" set, APGD-CE, APGD-T (9 target classes), FAB-T (9 target
  classes) and Square (5,000 queries), each run on the points the previous ones left correct.
  torchattacks' own AutoAttack runs APGD/FAB with its 10-step defaults; here they get the
  official 100 steps.

Attacks on a DENT model need no special case: Dent is an nn.Module. Which gradients the attack
sees is the model's choice (`Dent(differentiable=...)`; see pixgen.dent).

Randomness (PGD's start, APGD/FAB/Square's draws) comes from torch's global generator; callers
seed it per call through `seeded`, so every adversarial batch is reproducible.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torchattacks
from torch import nn

from . import PixgenError

ATTACKS = ("fgsm", "pgd", "autoattack")
PGD_STEPS = 40
AUTOATTACK_STEPS = 100


def build(name: str, model: nn.Module, eps: float, seed: int = 0, n_classes: int = 10):
    if eps < 0:
        raise PixgenError(f"attack budget ε must be ≥ 0, got {eps}")
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name == "pgd":
        return torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=PGD_STEPS, random_start=True)
    if name == "autoattack":
        return autoattack(model, eps, seed, n_classes)
    raise PixgenError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")


def autoattack(model: nn.Module, eps: float, seed: int = 0, n_classes: int = 10):
    parts = [
        torchattacks.APGD(model, eps=eps, steps=AUTOATTACK_STEPS, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(model, eps=eps, steps=AUTOATTACK_STEPS, n_restarts=1, n_classes=n_classes, seed=seed),
        torchattacks.FAB(model, eps=eps, steps=AUTOATTACK_STEPS, n_restarts=1, multi_targeted=True, n_classes=n_classes, seed=seed),
        torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, seed=seed),
    ]
    return torchattacks.MultiAttack(parts)


@contextlib.contextmanager
def seeded(*keys: int):
    """Run a block with torch's global generator seeded from `keys`, restoring it afterwards."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
