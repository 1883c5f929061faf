"""Training methods: the registry `METHODS` (name → loss, defaults, checks) and `TrainConfig`,
whose unset fields the method's defaults fill, so Python callers get exactly what the CLI gives.

A method's loss is called as `loss(model, images, labels, step) -> (loss, logits)`; the logits
are what the loss was computed on (adversarial examples, or worst-case bounds) and give the
training accuracy. Randomness (attack starts, random projections) comes from torch's global RNG,
which train.py checkpoints, so a resumed run draws what an uninterrupted one would.

- standard: cross-entropy. pixmix: the same, on a `pixgen augment` shards asset (the batch source
  differs, see train.py).
- pgd (the primal network): min_θ E max_{‖δ‖∞≤ε} L(f(x+δ), y) with the inner maximum solved by an
  attack: PGD from a random start, or one FGSM step from a random start (`fgsm-rs`, Wong, Rice &
  Kolter 2020). Attacks run in eval mode, updates in train mode.
- dual (the dual network): the cross-entropy of Wong & Kolter's upper bounds on z_j − z_y over the
  ε-ball ∩ [0, 1], estimated with `projections` Cauchy random projections (pixgen.bounds).
- ibp: κ·CE(clean logits) + (1 − κ)·CE(worst-case logits by interval bounds) (Gowal et al. 2018).

ε ramps linearly, step by step, from `eps_start` to `eps` over the first `ramp_epochs` epochs;
attack step sizes are multiples of the current ε, so they follow the ramp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError, attacks, bounds, data, models

ROBUST_SAMPLE = 500  # class-balanced validation digits attacked with PGD-40 after every pgd epoch
SAMPLE_SEED = 0  # the PGD sample, its random starts and the certify sample are the same in every run
# IBP: the clean loss's weight κ falls from 1 to KAPPA over the ε ramp (Gowal et al. 2018: 0.5;
# CROWN-IBP's 0 costs clean accuracy), and training ε overshoots the certified ε by
# TRAIN_EPS_FACTOR (Gowal et al.), because a network trained exactly at ε certifies less at ε.
KAPPA = 0.5
TRAIN_EPS_FACTOR = 1.1
PGD_ATTACKS = ("pgd", "fgsm-rs")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Fields left None take the method's default (`METHODS[method].defaults`);
    the method options (eps … certify_size) apply only to the methods that list them."""

    method: str = "standard"
    arch: str = "wk-small"
    dataset: str = "mnist"
    normalize: tuple[float, float] | None = None  # (mean, std): the network's first layer is (x − mean)/std
    epochs: int | None = None
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None  # peak of the one-cycle schedule
    warmup: float = 0.1  # fraction of all steps spent ramping the learning rate up
    train_size: int | None = None
    val_size: int | None = None  # of the validation digits (data.Dataset.validation)
    eps: float | None = None  # pixel units in [0, 1]
    eps_start: float | None = None
    ramp_epochs: float | None = None
    attack: str | None = None
    attack_steps: int | None = None
    step_size: float | None = None  # a multiple of the current ε
    projections: int | None = None  # 0: the exact bound
    certify_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise PixgenError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        method = METHODS[self.method]
        if self.normalize is not None:  # floats in a tuple, so equal pairs hash equally
            object.__setattr__(self, "normalize", normalize_pair(self.normalize))
        foreign = [f.name for f in fields(self) if f.name in METHOD_OPTIONS and f.name not in method.options and getattr(self, f.name) is not None]
        if foreign:
            names = ", ".join("--" + n.replace("_", "-") for n in foreign)
            raise PixgenError(f"{names} do not apply to method {self.method}; drop them or choose a method that uses them")
        for name, value in method.fill(self).items():
            object.__setattr__(self, name, value)
        check_common(self)
        if method.check:
            method.check(self)


@dataclass(frozen=True)
class Step:
    """Where training stands, for methods whose loss changes over training (e.g. an ε ramp)."""

    config: TrainConfig
    epoch: int
    index: int  # global step, from 0
    total: int  # steps in the whole run

    @property
    def progress(self) -> float:
        return self.index / self.total


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, Step], tuple[torch.Tensor, torch.Tensor]]
Metrics = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor], TrainConfig], dict]


def no_metrics(model, val, config) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    loss: Loss
    defaults: dict  # TrainConfig fields this method fills when they are left None
    options: tuple[str, ...] = ()  # the method options (METHOD_OPTIONS) it takes
    check: Callable[[TrainConfig], None] | None = None  # after the defaults are filled
    epoch_metrics: Metrics = no_metrics  # extra entries of each epoch's history record
    final_metrics: Metrics = no_metrics  # extra metadata of the finished model
    reads_shards: bool = False

    def fill(self, config: TrainConfig) -> dict:
        """The defaults for the fields `config` leaves None."""
        fills = {k: v for k, v in self.defaults.items() if getattr(config, k) is None}
        epochs = config.epochs if config.epochs is not None else fills.get("epochs")
        if "ramp_epochs" in fills:  # a short run still spends half its steps at the full ε
            fills["ramp_epochs"] = min(fills["ramp_epochs"], epochs / 2)
        if "eps_start" in fills:
            fills["eps_start"] = min(fills["eps_start"], config.eps if config.eps is not None else fills["eps"])
        if config.attack == "fgsm-rs":
            fills.pop("attack_steps", None)
        if "step_size" in self.options and config.step_size is None:
            attack = config.attack or fills["attack"]
            fills["step_size"] = 1.0 if attack == "fgsm-rs" else 2.5 / (config.attack_steps or fills["attack_steps"])
        return fills


# ---- losses ----------------------------------------------------------------------------------


def standard_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: Step):
    logits = model(images)
    return F.cross_entropy(logits, labels), logits


def current_eps(step: Step) -> float:
    """ε at this step: linear from eps_start to eps over the first ramp_epochs epochs."""
    c = step.config
    epochs_done = step.index * c.epochs / step.total
    if epochs_done >= c.ramp_epochs:
        return c.eps
    return c.eps_start + (c.eps - c.eps_start) * epochs_done / c.ramp_epochs


def training_attack(config: TrainConfig, model: nn.Module, eps: float):
    import torchattacks  # imported where used: it takes 0.4 s (scipy.stats), and every pixgen process imports this module

    alpha = config.step_size * eps
    if config.attack == "fgsm-rs":
        return torchattacks.FFGSM(model, eps=eps, alpha=alpha)  # uniform start in the ball, one step
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=config.attack_steps, random_start=True)


def adversarial_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: Step):
    adversarial = training_attack(step.config, model, current_eps(step))(images, labels)
    # torchattacks runs the attack in eval mode; the update itself must use batch statistics (BN).
    model.train()
    logits = model(adversarial)
    return F.cross_entropy(logits, labels), logits


def dual_loss(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, step: Step):
    worst = bounds.dual_logits(model, images, labels, current_eps(step), step.config.projections)
    return F.cross_entropy(worst, labels), worst


def ibp_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: Step):
    """Returns the worst-case logits, so the training accuracy is the IBP-certified fraction."""
    eps = TRAIN_EPS_FACTOR * current_eps(step)
    # The ε schedule of a ramp from 0 to 1 is the ramp's progress, so κ follows ε's own ramp.
    ramp = current_eps(replace(step, config=replace(step.config, eps=1.0, eps_start=0.0)))
    kappa = 1 - (1 - KAPPA) * ramp
    worst = -bounds.interval_margins(model, images, labels, eps)
    return kappa * F.cross_entropy(model(images), labels) + (1 - kappa) * F.cross_entropy(worst, labels), worst


# ---- checks ----------------------------------------------------------------------------------


def normalize_pair(value) -> tuple[float, float]:
    """(mean, std) of --normalize, checked: two finite numbers, std > 0."""
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) or not pair[1] > 0:
        raise PixgenError(f"--normalize takes MEAN,STD: two finite numbers with STD > 0 (e.g. 0.1307,0.3081 for MNIST, 0.5,0.5 for PixMix's [-1, 1]), got {','.join(map(str, pair))}")
    return float(pair[0]), float(pair[1])


def check_common(config: TrainConfig) -> None:
    data.spec(config.dataset)
    if config.arch not in models.ARCHS:
        raise PixgenError(f"unknown architecture {config.arch!r}; choose one of {', '.join(models.ARCHS)}")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise PixgenError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0 or not 0 <= config.warmup < 1:
        raise PixgenError(f"need lr > 0 and 0 <= warmup < 1, got lr {config.lr}, warmup {config.warmup}")
    for name in ("train_size", "val_size", "certify_size"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise PixgenError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.eps is None:
        return
    if not 0 <= config.eps <= 1 or not 0 <= config.eps_start <= config.eps:
        raise PixgenError(f"need 0 <= eps-start <= eps <= 1 (pixels are in [0, 1]); got eps {config.eps}, eps-start {config.eps_start}")
    if not 0 <= config.ramp_epochs <= config.epochs:
        raise PixgenError(f"--ramp-epochs must lie in [0, epochs = {config.epochs}], got {config.ramp_epochs}")


def check_pgd(config: TrainConfig) -> None:
    if config.attack not in PGD_ATTACKS:
        raise PixgenError(f"unknown attack {config.attack!r}; choose one of {', '.join(PGD_ATTACKS)}")
    if config.attack == "fgsm-rs" and config.attack_steps is not None:
        raise PixgenError("--attack-steps applies to --attack pgd; fgsm-rs takes one step")
    if config.attack == "pgd" and config.attack_steps < 1 or not config.step_size > 0:
        raise PixgenError(f"need attack-steps >= 1 and step-size > 0, got {config.attack_steps}, {config.step_size}")


def check_dual(config: TrainConfig) -> None:
    bounds.check_layers(models.build(config.arch, config.dataset, config.normalize), "dual")
    pixels = math.prod(data.spec(config.dataset).shape)
    if not 0 <= config.projections < pixels:
        raise PixgenError(f"need 0 <= projections < {pixels} (0: the exact bound), got {config.projections}")


def check_ibp(config: TrainConfig) -> None:
    bounds.check_layers(models.build(config.arch, config.dataset, config.normalize), "ibp")


# ---- metrics ---------------------------------------------------------------------------------


def sample(val: tuple[torch.Tensor, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = val
    index = torch.from_numpy(data.balanced_subset(labels.cpu().numpy(), min(size, len(labels)), SAMPLE_SEED)).to(labels.device)
    return images[index], labels[index]


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 250) -> float:
    """Accuracy under PGD-40 (step ε/4, random start); the starts come from a fixed seed, and the
    training RNG is left as it was."""
    model.eval()
    correct = 0
    for b, s in enumerate(range(0, len(labels), batch_size)):
        x, y = images[s : s + batch_size], labels[s : s + batch_size]
        adversarial = attacks.build("pgd", model, eps, seed=SAMPLE_SEED, batch=b)(x, y)
        with torch.no_grad():
            correct += int((model(adversarial).argmax(1) == y).sum())
    return correct / len(labels)


def pgd_epoch_metrics(model: nn.Module, val, config: TrainConfig) -> dict:
    x, y = sample(val, ROBUST_SAMPLE)
    return {"pgd40_accuracy": pgd_accuracy(model, x, y, config.eps), "pgd40_count": len(y)}


def certificate(proved: Callable) -> Metrics:
    """Final metadata of a certified-training method: its own bound's certificate at ε."""

    def metrics(model: nn.Module, val, config: TrainConfig) -> dict:
        x, y = sample(val, config.certify_size)
        certified = proved(model, x, y, config.eps)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        return {"certify": {"eps": config.eps, "count": len(y), "certified_accuracy": float(certified.float().mean()), "clean_accuracy": float(correct.float().mean())}}

    return metrics


# ---- the registry ----------------------------------------------------------------------------

PLAIN = {"epochs": 10, "batch_size": 128, "lr": 2e-3}
# Defaults chosen so that each method's full-MNIST training fits in ~45 minutes on 2 CPU cores at
# the costs measured here: pgd on madry-cnn, PGD-5 + PGD-40 checks ≈ 4.8 min per epoch; dual on
# wk-small, 10 projections ≈ 290 img/s on 2 idle cores at batch 32 or 50 alike (3.5 min per
# epoch, with convex-adversarial's bound; pixgen.dual's step is about 2× that): 10 epochs took 37 min
# and certified 93.9% (7 epochs: 91.8%); ibp on wk-small costs ~3
# plain steps, so a long schedule like Gowal et al.'s fits where dual fits 10 epochs.
METHODS: dict[str, Method] = {
    "standard": Method(standard_loss, PLAIN),
    "pixmix": Method(standard_loss, PLAIN, reads_shards=True),
    "pgd": Method(
        adversarial_loss,
        {"epochs": 8, "batch_size": 100, "lr": 2e-3, "eps": 0.3, "eps_start": 0.0, "ramp_epochs": 2.0, "attack": "pgd", "attack_steps": 5},
        ("eps", "eps_start", "ramp_epochs", "attack", "attack_steps", "step_size"),
        check_pgd,
        epoch_metrics=pgd_epoch_metrics,
    ),
    "dual": Method(
        dual_loss,
        {"epochs": 10, "batch_size": 32, "lr": 1.5e-3, "eps": 0.1, "eps_start": 0.01, "ramp_epochs": 3.0, "projections": 10, "certify_size": 1000},
        ("eps", "eps_start", "ramp_epochs", "projections", "certify_size"),
        check_dual,
        final_metrics=certificate(bounds.dual_certified),
    ),
    "ibp": Method(
        ibp_loss,
        {"epochs": 50, "batch_size": 100, "lr": 1e-3, "eps": 0.1, "eps_start": 0.0, "ramp_epochs": 20.0, "certify_size": 1000},
        ("eps", "eps_start", "ramp_epochs", "certify_size"),
        check_ibp,
        final_metrics=certificate(bounds.ibp_certified),
    ),
}
METHOD_OPTIONS = ("eps", "eps_start", "ramp_epochs", "attack", "attack_steps", "step_size", "projections", "certify_size")


def default_text(name: str) -> str:
    """`--help` text of a field's per-method defaults, e.g. "pgd 0.3, dual 0.1", read from METHODS."""
    by_value: dict = {}
    for method, spec in METHODS.items():
        if name in spec.defaults:
            by_value.setdefault(spec.defaults[name], []).append(method)
    return "; ".join(f"{'/'.join(ms)} {v}" for v, ms in by_value.items())
