"""DENT (Wang et al. 2021): defend a trained network by test-time entropy minimisation.

Before predicting a batch, DENT adapts per-sample copies of a few parameters for `steps` steps
to lower the entropy of its own predictions, then predicts with them. It is episodic: every batch
starts again from the trained values, so a prediction depends only on its batch.

What adapts, per sample (all held as batched tensors, first axis the sample):
- model: the scale and shift of every BatchNorm layer, which normalises with its stored
  statistics. A network without BatchNorm gets a channel-wise scale and shift after each Conv2d,
  initialised to the identity, so the wrapped network starts out computing exactly what it did.
  This generalises DENT to BN-free networks (e.g. the dual network, whose certificate needs
  fixed layers);
- input: g(x; Σ) = blur(warp(x)): a small affine warp (2×3 matrix, identity at the start) and a
  3-tap blur [a, 1 − 2a, a] along rows and columns, a ∈ [0, 0.25] (variance 2a px² per axis;
  a = 0, the start, is no blur). Blur strength is parameterised by variance, not width, because a
  Gaussian's effect grows with σ², so the gradient in σ vanishes at σ = 0 and it would never move.

The optimiser steps are written out as functions of tensors (`adamod_step`, `adam_step`, equal to
the `adamod` package's AdaMod and torch's Adam, see the tests) so that the same code serves both
attack modes:
- `differentiable=False` (DENT paper's evaluation, "standard" attack): adaptation runs on a
  detached copy of the input; gradients of the output reach the input only through the final
  prediction with the adapted parameters held fixed;
- `differentiable=True` ("adaptive" attack, Croce et al. 2022): the unrolled adaptation steps stay
  in the graph (create_graph), so an attack differentiates through the adaptation too.
The outputs are the same in both modes; only their gradients differ. No randomness is involved.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import PixgenError

LOSSES = ("entropy", "shot")
OPTIMIZERS = ("adamod", "adam")


@dataclass(frozen=True)
class DentConfig:
    """Defaults: the DENT reference (6 AdaMod steps, lr 6e-3, β 0.99, β3 0.6, entropy + diversity).
    The reference passes its single β as AdaMod's β1 and keeps β2 at 0.999."""

    steps: int = 6
    lr: float = 6e-3
    optimizer: str = "adamod"
    betas: tuple[float, float] = (0.99, 0.999)
    beta3: float = 0.6  # AdaMod's smoothing of the per-parameter step sizes
    loss: str = "shot"  # "entropy", or "shot": entropy + diversity
    adapt_model: bool = True
    adapt_input: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise PixgenError(f"DENT needs at least 1 adaptation step (--dent-steps), got {self.steps}")
        if not self.lr > 0:
            raise PixgenError(f"DENT's learning rate must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise PixgenError(f"unknown DENT optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise PixgenError(f"unknown DENT loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not (self.adapt_model or self.adapt_input):
            raise PixgenError("DENT must adapt the model, the input, or both")


class Dent(nn.Module):
    """A trained classifier made dynamic: every forward adapts to its batch, then predicts."""

    def __init__(self, model: nn.Module, config: DentConfig = DentConfig(), differentiable: bool = False):
        super().__init__()
        self.model = configure_model(model)
        self.config = config
        self.differentiable = differentiable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = x if self.differentiable else x.detach()
        with torch.enable_grad():  # adapt even when called under no_grad, as in evaluation
            params = self.initial_params(len(x), x)
            state = None
            for step in range(1, self.config.steps + 1):
                params, state = forward_and_adapt(self, source, params, state, step)
        if not self.differentiable:
            params = {name: p.detach() for name, p in params.items()}
        return self.predict(x, params)

    def initial_params(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample copies of the trained values (leaves that require grad)."""
        params = {}
        if self.config.adapt_model:
            for name, p in collect_params(self.model).items():
                params[f"model.{name}"] = p.detach().expand(batch, *p.shape).clone()
        if self.config.adapt_input:
            params["input.warp"] = torch.eye(2, 3, dtype=like.dtype, device=like.device).expand(batch, 2, 3).clone()
            params["input.blur"] = torch.zeros(batch, dtype=like.dtype, device=like.device)
        return {name: p.requires_grad_() for name, p in params.items()}

    def predict(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.adapt_input:
            x = blur(warp(x, params["input.warp"]), params["input.blur"])
        model_params = {name[len("model.") :]: p for name, p in params.items() if name.startswith("model.")}
        return functional_call(self.model, model_params, (x,), strict=False)

    def train(self, mode: bool = True):
        """Only the flag changes: DENT's network always normalises with stored statistics
        (attack libraries switch modes around their calls)."""
        self.training = mode
        return self


def forward_and_adapt(dent: Dent, x: torch.Tensor, params: dict, state, step: int) -> tuple[dict, object]:
    """One adaptation step: predict, measure the loss, step every per-sample parameter."""
    loss = LOSS_FUNCTIONS[dent.config.loss](dent.predict(x, params))
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=dent.differentiable)
    values = [params[n] for n in names]
    config = dent.config
    with torch.set_grad_enabled(dent.differentiable):
        if config.optimizer == "adamod":
            values, state = adamod_step(values, grads, state, step, config.lr, config.betas, config.beta3)
        else:
            values, state = adam_step(values, grads, state, step, config.lr, config.betas)
        values = [clamp_param(n, v) for n, v in zip(names, values)]
    if not dent.differentiable:
        values = [v.requires_grad_() for v in values]
    return dict(zip(names, values)), state


def clamp_param(name: str, value: torch.Tensor) -> torch.Tensor:
    return value.clamp(0.0, 0.25) if name == "input.blur" else value


# ---------------------------------------------------------------- losses


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the softmax predictions."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def shot(logits: torch.Tensor) -> torch.Tensor:
    """Entropy plus diversity (SHOT): the negative entropy of the batch's mean prediction rewards
    spreading predictions over the classes, so adaptation cannot collapse onto one class."""
    probs = logits.softmax(1)
    mean = probs.mean(0)
    return -(probs * torch.log(probs + 1e-5)).sum(1).mean() + (mean * torch.log(mean + 1e-5)).sum()


LOSS_FUNCTIONS = {"entropy": entropy, "shot": shot}


# ---------------------------------------------------------------- optimiser steps as functions


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0 (a parameter whose gradient is 0, e.g. behind a dead
    # ReLU), which turns second-order gradients into NaN; the floor changes values by < 1e-15.
    return v.clamp_min(1e-30).sqrt()


def adam_step(params, grads, state, step: int, lr: float, betas, eps: float = 1e-8):
    """torch.optim.Adam's update, as a function: returns (new params, new state)."""
    beta1, beta2 = betas
    m, v = state if state is not None else ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
    m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
    v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads)]
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    new = [p - lr / bc1 * mi / (_sqrt(vi) / math.sqrt(bc2) + eps) for p, mi, vi in zip(params, m, v)]
    return new, (m, v)


def adamod_step(params, grads, state, step: int, lr: float, betas, beta3: float, eps: float = 1e-8):
    """The `adamod` package's AdaMod update, as a function: Adam whose per-parameter step sizes
    are capped by their own exponential average (smoothing β3)."""
    beta1, beta2 = betas
    if state is None:
        state = tuple([torch.zeros_like(p) for p in params] for _ in range(3))
    m, v, s = state
    m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
    v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads)]
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rates = [lr * math.sqrt(bc2) / bc1 / (_sqrt(vi) + eps) for vi in v]
    s = [beta3 * si + (1 - beta3) * r for si, r in zip(s, rates)]
    new = [p - torch.minimum(r, si) * mi for p, r, si, mi in zip(params, rates, s, m)]
    return new, (m, v, s)


# ---------------------------------------------------------------- input transform g(x; Σ)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp (theta (B, 2, 3) in normalised coordinates), bilinear, zero fill."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-sample separable blur with taps [a, 1 − 2a, a] along both axes (edges replicated)."""
    a = a.reshape(-1, *([1] * (x.dim() - 1)))
    for axis in (-1, -2):
        padded = F.pad(x, (1, 1, 0, 0) if axis == -1 else (0, 0, 1, 1), mode="replicate")
        size = x.shape[axis]
        before, after = padded.narrow(axis, 0, size), padded.narrow(axis, 2, size)
        x = (1 - 2 * a) * x + a * (before + after)
    return x


# ---------------------------------------------------------------- the network's adaptable layers


class StaticBatchNorm(nn.Module):
    """BatchNorm with its stored statistics and a scale and shift that may be per-sample
    ((C,) as trained, or (B, C) while DENT adapts them)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = bn.eps

    def forward(self, x):
        # Folded into one scale and shift per (sample, channel): two passes over the feature map.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x))


class ChannelAffine(nn.Module):
    """A channel-wise scale and shift, the identity until DENT adapts it."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(_per_channel(self.bias, x), x, _per_channel(self.weight, x))


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) or (B, C) values shaped to broadcast over x (B, C, ...)."""
    lead = values.shape[:-1] if values.dim() > 1 else (1,)
    return values.reshape(*lead, x.shape[1], *([1] * (x.dim() - 2)))


def configure_model(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode, frozen, whose adaptable layers are DENT's: BatchNorm layers
    become StaticBatchNorm; in a network without BatchNorm, each Conv2d gains a ChannelAffine."""
    model = copy.deepcopy(model).eval()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    _convert(model, has_bn)
    return model.requires_grad_(False)


def _convert(module: nn.Module, has_bn: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, StaticBatchNorm(child))
        elif isinstance(child, nn.Conv2d) and not has_bn:
            setattr(module, name, nn.Sequential(child, ChannelAffine(child.out_channels)))
        else:
            _convert(child, has_bn)


def collect_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained values DENT adapts: the scale and shift of its adaptable layers, by name."""
    return {
        f"{prefix}.{kind}": getattr(m, kind)
        for prefix, m in model.named_modules()
        if isinstance(m, (StaticBatchNorm, ChannelAffine))
        for kind in ("weight", "bias")
    }
