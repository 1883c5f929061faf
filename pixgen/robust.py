"""Robust training: the primal network (adversarial training), the dual network (Wong & Kolter's
convex bound), their ε schedule, the certificate, and the PixMix shards as a batch source.

Both robust methods approach min_θ E max_{‖δ‖∞≤ε} L(f(x+δ), y). `adversarial_loss` (method `pgd`)
solves the inner maximum approximately with an attack from torchattacks: PGD from a random start,
or FGSM from a random start (`fgsm-rs`, Wong, Rice & Kolter 2020). `dual_loss` (method `dual`)
replaces it by an upper bound from convex-adversarial's dual network: the cross-entropy of
per-class bounds on z_j − z_y over the ε-ball intersected with the pixel box [0, 1]
(`bounded_input=True`: the input set is [max(x−ε, 0), min(x+ε, 1)], which is tighter and still
sound because every image lies in [0, 1]). Training estimates the bound's ℓ1 terms with
`projections` Cauchy random projections (median estimator, `l1_median`); the certificate uses
the exact bound.

ε ramps linearly, step by step, from `eps_start` to `eps` over the first `ramp_epochs` epochs;
attack step sizes are multiples of the current ε, so they follow the ramp. Attacks' random starts
and the bound's random projections draw from torch's global RNG, which train.py checkpoints, so a
resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from . import PixgenError, assets, attacks, data, models

if TYPE_CHECKING:
    from .train import Step, TrainConfig

ROBUST = ("pgd", "dual", "ibp")
ATTACKS = ("pgd", "fgsm-rs")
ROBUST_SAMPLE = 500  # class-balanced test digits attacked with PGD-40 after every pgd epoch
SAMPLE_SEED = 0  # the PGD sample, its random starts and the certify sample are the same in every run

# Per-method defaults, chosen so that each method's full-MNIST training fits in ~45 minutes on
# 2 CPU cores at the costs measured here (issue 10): pgd on madry-cnn, PGD-5 + PGD-40 checks
# ≈ 4.8 min per epoch; dual on wk-small, 10 projections ≈ 290 img/s on 2 idle cores at batch 32 or
# 50 alike (3.5 min per epoch): 10 epochs took 37 min and certified 93.9% (7 epochs: 91.8%).
DEFAULTS = {
    "standard": {"epochs": 10, "batch_size": 128, "lr": 2e-3},
    "pixmix": {"epochs": 10, "batch_size": 128, "lr": 2e-3},
    "pgd": {"epochs": 8, "batch_size": 100, "lr": 2e-3, "eps": 0.3, "eps_start": 0.0, "ramp_epochs": 2.0, "attack": "pgd", "attack_steps": 5},
    "dual": {"epochs": 10, "batch_size": 32, "lr": 1.5e-3, "eps": 0.1, "eps_start": 0.01, "ramp_epochs": 3.0, "projections": 10, "certify_size": 1000},
    # ibp (pixgen.certify) on wk-small costs ~3 plain steps, ≈ 15 s per epoch on one core at load ≈ 4:
    # a long schedule like Gowal et al.'s (batch 100, Adam 1e-3, a long ε ramp) fits where dual fits 10 epochs.
    "ibp": {"epochs": 50, "batch_size": 100, "lr": 1e-3, "eps": 0.1, "eps_start": 0.0, "ramp_epochs": 20.0, "certify_size": 1000},
}
BOUNDABLE = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten)
METHOD_OPTIONS = ("eps", "eps_start", "ramp_epochs", "attack", "attack_steps", "step_size", "projections", "certify_size")
PGD_ONLY = ("attack", "attack_steps", "step_size")
DUAL_ONLY = ("projections", "certify_size")


def resolve(config: TrainConfig) -> TrainConfig:
    """The config with every method option left unset (None) given the method's default."""
    given = {name: getattr(config, name) for name in METHOD_OPTIONS}
    fills = {k: v for k, v in DEFAULTS.get(config.method, {}).items() if k in given and given[k] is None}
    if "ramp_epochs" in fills:  # a short run still spends half its steps at the full ε
        fills["ramp_epochs"] = min(fills["ramp_epochs"], config.epochs / 2)
    if "eps_start" in fills:
        fills["eps_start"] = min(fills["eps_start"], given["eps"] if given["eps"] is not None else fills["eps"])
    if config.attack == "fgsm-rs":
        fills.pop("attack_steps", None)
    config = replace(config, **fills)
    if config.method == "pgd" and config.step_size is None:
        config = replace(config, step_size=default_step_size(config.attack, config.attack_steps))
    return config


def default_step_size(attack: str, steps: int) -> float:
    """As a multiple of ε. Madry's PGD-40 uses 0.01 at ε 0.3 (ε/30); 2.5 ε / steps lets a few
    steps still cross the ball. FGSM-RS's paper step 1.25 ε overfits catastrophically at MNIST's
    ε 0.3 (BACKGROUND.md), so its default is the smaller step ε."""
    return 1.0 if attack == "fgsm-rs" else 2.5 / steps


def validate(config: TrainConfig) -> None:
    """One clear line for options this method cannot use (config already resolved)."""
    method = config.method
    unused = [n for n in METHOD_OPTIONS if getattr(config, n) is not None]
    unused = [n for n in unused if method not in ROBUST or (method == "pgd" and n in DUAL_ONLY) or (method == "dual" and n in PGD_ONLY) or (method == "ibp" and n in PGD_ONLY + ("projections",))]
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise PixgenError(f"{names} do not apply to method {method}; drop them or choose a method that uses them")
    if method not in ROBUST:
        return
    if not 0 <= config.eps <= 1 or not 0 <= config.eps_start <= config.eps:
        raise PixgenError(f"need 0 <= eps-start <= eps <= 1 (pixels are in [0, 1]); got eps {config.eps}, eps-start {config.eps_start}")
    if not 0 <= config.ramp_epochs <= config.epochs:
        raise PixgenError(f"--ramp-epochs must lie in [0, epochs = {config.epochs}], got {config.ramp_epochs}")
    if method == "pgd":
        if config.attack not in ATTACKS:
            raise PixgenError(f"unknown attack {config.attack!r}; choose one of {', '.join(ATTACKS)}")
        if config.attack == "fgsm-rs" and config.attack_steps is not None:
            raise PixgenError("--attack-steps applies to --attack pgd; fgsm-rs takes one step")
        if config.attack == "pgd" and config.attack_steps < 1 or not config.step_size > 0:
            raise PixgenError(f"need attack-steps >= 1 and step-size > 0, got {config.attack_steps}, {config.step_size}")
    elif method == "ibp":
        from .certify import check_layers  # certify builds on this module

        check_layers(models.build(config.arch), "ibp")
        if config.certify_size < 1:
            raise PixgenError(f"need certify-size >= 1, got {config.certify_size}")
    else:
        check_boundable(models.build(config.arch), config.arch)
        if not 0 <= config.projections < 28 * 28 or config.certify_size < 1:
            raise PixgenError(f"need 0 <= projections < 784 (0: exact bound) and certify-size >= 1; got {config.projections}, {config.certify_size}")


def check_boundable(model: nn.Sequential, arch: str) -> None:
    """convex-adversarial bounds Sequential nets of Linear/Conv2d/ReLU/Flatten. Its BatchNorm2d
    layer fails on current torch (0.4.4's DualBatchNorm2d skips nn.Module.__init__), and it has no
    bound for MaxPool2d."""
    for layer in model:
        if not isinstance(layer, BOUNDABLE):
            raise PixgenError(
                f"method dual cannot train --arch {arch}: convex-adversarial cannot bound its {type(layer).__name__} layer; use --arch wk-small"
            )


def current_eps(step: Step) -> float:
    """ε at this step: linear from eps_start to eps over the first ramp_epochs epochs."""
    c = step.config
    epochs_done = step.index * c.epochs / step.total
    if epochs_done >= c.ramp_epochs:
        return c.eps
    return c.eps_start + (c.eps - c.eps_start) * epochs_done / c.ramp_epochs


def make_attack(config: TrainConfig, model: nn.Module, eps: float):
    alpha = config.step_size * eps
    if config.attack == "fgsm-rs":
        return torchattacks.FFGSM(model, eps=eps, alpha=alpha)  # uniform start in the ball, one step
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=config.attack_steps, random_start=True)


def adversarial_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: Step):
    adversarial = make_attack(step.config, model, current_eps(step))(images, labels)
    # torchattacks runs the attack in eval mode; the update itself must use batch statistics (BN).
    model.train()
    logits = model(adversarial)
    return F.cross_entropy(logits, labels), logits


def bound_logits(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float, projections: int = 0) -> torch.Tensor:
    """(B, 10) upper bounds on z_j − z_y over the ε-ball ∩ [0, 1] (column y is 0): exact with
    projections=0, else the random-projection estimate used for training."""
    from convex_adversarial.dual_network import RobustBounds

    kwargs = {"proj": projections, "norm_type": "l1_median"} if projections else {"norm_type": "l1"}
    with warnings.catch_warnings():
        # Raised whenever a layer has no unstable ReLU, which is normal for a robust net.
        warnings.filterwarnings("ignore", message="ReLU projection has no origin crossing")
        return RobustBounds(model, eps, bounded_input=True, **kwargs)(images, labels)


def dual_loss(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, step: Step):
    bounds = bound_logits(model, images, labels, current_eps(step), step.config.projections)
    return F.cross_entropy(bounds, labels), bounds


@torch.no_grad()
def certify(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 50) -> torch.Tensor:
    """Per digit, True where the exact bound proves every other class below the true one for all
    perturbations in the ε-ball ∩ [0, 1]."""
    model.eval()
    proved = []
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        bounds = bound_logits(model, images[s : s + batch_size], y, eps)
        others = bounds.scatter(1, y[:, None], -torch.inf)
        proved.append(others.max(1).values < 0)
    return torch.cat(proved)


def _sample(test: tuple[torch.Tensor, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = test
    index = torch.from_numpy(data.balanced_subset(labels.cpu().numpy(), size, SAMPLE_SEED)).to(labels.device)
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


def epoch_metrics(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], config: TrainConfig) -> dict:
    """Extra entries of an epoch's history record: PGD-40 accuracy for the primal network."""
    if config.method != "pgd":
        return {}
    x, y = _sample(test, ROBUST_SAMPLE)
    return {"pgd40_accuracy": pgd_accuracy(model, x, y, config.eps), "pgd40_count": len(y)}


def final_metrics(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], config: TrainConfig) -> dict:
    """Extra metadata of a finished model: the certificate of a certified-training method by its
    own bound (dual: the exact dual network; ibp: interval bounds)."""
    if config.method not in ("dual", "ibp"):
        return {}
    x, y = _sample(test, config.certify_size)
    if config.method == "dual":
        proved = certify(model, x, y, config.eps)
    else:
        from .certify import ibp_certified  # certify builds on this module

        proved = ibp_certified(model, x, y, config.eps)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return {"certify": {"eps": config.eps, "count": len(y), "certified_accuracy": float(proved.float().mean()), "clean_accuracy": float(correct.float().mean())}}


# ---- PixMix shards as the batch source ---------------------------------------------------------


def open_shards(path, train_identity: str, train_count: int) -> str:
    """The shards asset at `path`, checked to be PixMix copies of this run's training digits:
    (epochs, N, 28, 28) uint8, built from the same MNIST training slice. Returns its asset id."""
    group = assets.open_asset(path, stage="augment")
    if "images" not in group or "labels" not in group:
        raise PixgenError(f"{path} has no images/labels arrays; rebuild it with pixgen augment")
    images, labels = group["images"], group["labels"]
    if images.ndim != 4 or tuple(images.shape[2:]) != (28, 28) or images.dtype != np.uint8 or labels.shape != images.shape[1:2]:
        raise PixgenError(f"{path}: shards must be images (epochs, N, 28, 28) uint8 with labels (N,), got {tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}")
    built_from = dict(group.attrs).get("inputs", {}).get("mnist-train")
    if built_from != train_identity:
        raise PixgenError(
            f"{path} was not built from this run's MNIST training digits ({images.shape[1]} digits, data id {built_from}; "
            f"this run trains on {train_count}, id {train_identity}); rebuild it with pixgen augment --train-size {train_count}, "
            f"or pass --train-size {images.shape[1]} if it was built from this MNIST"
        )
    return assets.asset_id(dict(group.attrs))


def shard_epochs(path, epochs: int, batch_size: int, seed: int, device: torch.device, log):
    """`batches(epoch)` for train.fit: training epoch e reads shard epoch e % E."""
    count = assets.open_asset(path, stage="augment")["images"].shape[0]
    if epochs > count:
        log(f"the shards hold {count} PixMix epochs for {epochs} training epochs: epoch e reads shard epoch e % {count}")

    def batches(epoch: int):
        if epoch >= count:
            log(f"epoch {epoch + 1}: reusing shard epoch {epoch % count}")
        for x, y in data.shard_batches(path, epoch, batch_size, seed):
            yield x.to(device), y.to(device)

    return batches
