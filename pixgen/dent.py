"""DENT (Wang et al. 2021): defend a trained network by test-time entropy minimisation.

Before predicting a batch, DENT adapts per-sample copies of a few parameters for `steps` steps
to lower the entropy of its own predictions, then predicts with them. It is episodic: every batch
starts again from the trained values, so a prediction depends on its batch and on nothing else.
The batch size is therefore part of the defence (`DentConfig.batch_size`, the reference's 128);
evaluators predict a set with `predict_in_batches`.

Two defences (`DEFENSES`):
- `dent`, the paper's: only the model adapts;
- `dent-input`, the study's f(g(x + δ; Σ); θ + Δ): the input adapts too, through
  g(x; Σ) = blur(warp(x)), a small affine warp (2×3 matrix, identity at the start) and a 3-tap
  blur [a, 1 − 2a, a] along rows and columns, a ∈ [0, 0.25] (a = 0, the start, is no blur). Blur
  strength is its variance 2a px², not a width: a Gaussian's effect grows with σ², so a gradient
  in σ vanishes at σ = 0 and would never move it.

What adapts in the model (`Dent.variant`):
- "bn": the scale and shift of every BatchNorm layer, which normalises with its stored statistics,
  exactly as published;
- "channel-affine (BN-free generalisation)": a network without BatchNorm (wk-small, madry-cnn, the
  dual networks, whose certificate needs fixed layers) gets a channel-wise scale and shift after
  each Conv2d, initialised to the identity, so the wrapped network starts out computing what it did.

All per-sample parameters of a batch live in one (batch, P) tensor, and the optimiser is written as
a function of tensors (`adamod_step`, `adam_step`, equal to the `adamod` package's AdaMod and
torch's Adam, see the tests), so that one code path serves both attack modes:
- `differentiable=False` (DENT paper's evaluation, "standard" attack): adaptation runs on a
  detached copy of the input; gradients of the output reach the input only through the final
  prediction with the adapted parameters held fixed;
- `differentiable=True` ("adaptive" attacks, Croce et al. 2022): the unrolled adaptation stays in
  the graph, so an attack differentiates through it. Each digit's adapted parameters depend in
  the graph on its own input only (see `shot`), so an attack on a batch is an attack on each
  digit, not on its neighbours' losses.
The outputs are the same in both modes, bit for bit; only their gradients differ.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError

LOSSES = ("entropy", "shot")
OPTIMIZERS = ("adamod", "adam")
VARIANTS = ("bn", "channel-affine (BN-free generalisation)")


@dataclass(frozen=True)
class DentConfig:
    """Defaults: the DENT reference (6 AdaMod steps, lr 6e-3, β 0.99, β3 0.6, entropy + diversity,
    batches of 128, the model adapting and not the input). The reference passes its single β as
    AdaMod's β1 and keeps β2 at 0.999."""

    steps: int = 6
    lr: float = 6e-3
    optimizer: str = "adamod"
    betas: tuple[float, float] = (0.99, 0.999)
    beta3: float = 0.6  # AdaMod's smoothing of the per-parameter step sizes
    loss: str = "shot"  # "entropy", or "shot": entropy + diversity
    adapt_input: bool = False
    batch_size: int = 128

    def __post_init__(self):
        if self.steps < 1:
            raise PixgenError(f"DENT needs at least 1 adaptation step (--dent-steps), got {self.steps}")
        if not self.lr > 0:
            raise PixgenError(f"DENT's learning rate must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise PixgenError(f"unknown DENT optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise PixgenError(f"unknown DENT loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.batch_size < 1:
            raise PixgenError(f"DENT's batch size must be at least 1, got {self.batch_size}")


DEFENSES = {"dent": DentConfig(adapt_input=False), "dent-input": DentConfig(adapt_input=True)}


class Dent(nn.Module):
    """A trained classifier made dynamic: every forward adapts to its batch, then predicts."""

    def __init__(self, model: nn.Module, config: DentConfig = DentConfig(), differentiable: bool = False):
        super().__init__()
        self.model = configure_model(model)
        self.config = config
        self.differentiable = differentiable
        self.variant = VARIANTS[0] if any(isinstance(m, StaticBatchNorm) for m in self.model) else VARIANTS[1]
        start = collect_params(self.model)
        if config.adapt_input:
            start = [torch.eye(2, 3).flatten(), torch.zeros(1)] + start  # warp, blur: the identity
        self.sizes = [len(t) for t in start]
        self.register_buffer("start", torch.cat(start))
        lower, upper = torch.full_like(self.start, -math.inf), torch.full_like(self.start, math.inf)
        if config.adapt_input:
            lower[6], upper[6] = 0.0, 0.25  # the blur, projected back into its range after each step
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x, self.adapt(x, self.differentiable))

    def adapt(self, x: torch.Tensor, differentiable: bool = False, tracked: int | None = None) -> torch.Tensor:
        """The (batch, P) per-sample parameters after `steps` steps of adaptation to batch x;
        differentiable: as functions of x (the unrolled steps kept in the graph), else detached.
        tracked (with differentiable): only the first `tracked` digits stay in the graph, the others
        adapt detached, with the same values (a digit's graph never reaches another's, see `shot`):
        EOT needs the gradient of a few adversarial digits among many clean ones, and the graph of
        the clean ones would cost most of its backward pass for nothing."""
        tracked = len(x) if tracked is None else tracked
        blocks = [(x[:tracked], True), (x[tracked:].detach(), False)] if differentiable else [(x.detach(), False)]
        blocks = [(part, graph) for part, graph in blocks if len(part)]
        with torch.enable_grad():  # adapt even when called under no_grad, as in evaluation
            params = [self.start.expand(len(part), -1).clone().requires_grad_() for part, _ in blocks]
            states = [None] * len(blocks)
            for step in range(1, self.config.steps + 1):
                params, states = forward_and_adapt(self, blocks, params, states, step)
        params = params[0] if len(params) == 1 else torch.cat(params)
        return params if differentiable else params.detach()

    def predict(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The network's logits on batch x with per-sample parameters `params` (batch, P)."""
        pieces = iter(params.split(self.sizes, dim=1))
        if self.config.adapt_input:
            x = blur(warp(x, next(pieces).view(-1, 2, 3)), next(pieces).view(-1))
        for layer in self.model:
            x = layer(x, next(pieces), next(pieces)) if isinstance(layer, (StaticBatchNorm, ChannelAffine)) else layer(x)
        return x

    def train(self, mode: bool = True):
        """Only the flag changes: DENT's network always normalises with stored statistics
        (attack libraries switch modes around their calls)."""
        self.training = mode
        return self


def forward_and_adapt(dent: Dent, blocks: list[tuple[torch.Tensor, bool]], params: list[torch.Tensor], states: list, step: int) -> tuple[list, list]:
    """One adaptation step of a batch given as consecutive blocks of digits (x, kept in the graph
    or not) with their (rows, P) parameters: predict, measure the loss on the whole batch, step
    every per-sample parameter."""
    config = dent.config
    outputs = [dent.predict(x, p) for (x, _), p in zip(blocks, params)]
    loss = LOSS_FUNCTIONS[config.loss](outputs[0] if len(outputs) == 1 else torch.cat(outputs))
    # A block kept in the graph needs the loss's graph after the others' gradients are taken.
    keep = any(graph for _, graph in blocks)
    grads = [torch.autograd.grad(loss, p, create_graph=graph, retain_graph=keep)[0] for (_, graph), p in zip(blocks, params)]
    new_params, new_states = [], []
    for (_, graph), p, grad, state in zip(blocks, params, grads, states):
        with torch.set_grad_enabled(graph):
            if config.optimizer == "adamod":
                p, state = adamod_step(p, grad, state, step, config.lr, config.betas, config.beta3)
            else:
                p, state = adam_step(p, grad, state, step, config.lr, config.betas)
            if config.adapt_input:
                p = p.clamp(dent.lower, dent.upper)
        new_params.append(p if graph else p.requires_grad_())
        new_states.append(state)
    return new_params, new_states


def predict_in_batches(dent: Dent, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """DENT's logits for a set of inputs, adapting to consecutive batches of `batch_size` (by
    default the config's) in the order given."""
    size = batch_size or dent.config.batch_size
    return torch.cat([dent(x[i : i + size]) for i in range(0, len(x), size)])


# ---------------------------------------------------------------- losses


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the softmax predictions."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def shot(logits: torch.Tensor) -> torch.Tensor:
    """Entropy plus diversity (SHOT), as DENT's reference: the negative entropy of the batch's mean
    prediction p̄ rewards spreading predictions over the classes, so adaptation cannot collapse
    onto one class.

    p̄ couples the digits of a batch. Each digit i sees it as p̄ (a constant) + (p_i − p_i)/B, whose
    value is p̄ exactly and whose derivative in p_i is p̄'s (1/B). So the gradient in every digit's
    parameters is SHOT's, and DENT adapts exactly as published; but a second-order path (the one an
    attack through the adaptation follows) leads from digit i's parameters to its own input only,
    not to the others'. Detaching p̄ outright would have dropped the diversity term's gradient.
    The value returned is the entropy plus B times the diversity term: only gradients are used."""
    probs = logits.softmax(1)
    own_entropy = -(probs * torch.log(probs + 1e-5)).sum(1).mean()
    mean = probs.mean(0).detach() + (probs - probs.detach()) / len(probs)
    return own_entropy + (mean * torch.log(mean + 1e-5)).sum()


LOSS_FUNCTIONS = {"entropy": entropy, "shot": shot}


# ---------------------------------------------------------------- optimiser steps as functions


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0 (a parameter whose gradient is 0, e.g. behind a dead
    # ReLU), which turns second-order gradients into NaN; the floor changes values by < 1e-15.
    return v.clamp_min(1e-30).sqrt()


def adam_step(param: torch.Tensor, grad: torch.Tensor, state, step: int, lr: float, betas, eps: float = 1e-8):
    """torch.optim.Adam's update, as a function: returns (new param, new state)."""
    beta1, beta2 = betas
    m, v = state if state is not None else (torch.zeros_like(param), torch.zeros_like(param))
    m = torch.lerp(grad, m, beta1)
    v = torch.lerp(grad * grad, v, beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    return param - lr / bc1 * m / (_sqrt(v) / math.sqrt(bc2) + eps), (m, v)


def adamod_step(param: torch.Tensor, grad: torch.Tensor, state, step: int, lr: float, betas, beta3: float, eps: float = 1e-8):
    """The `adamod` package's AdaMod update, as a function: Adam whose per-parameter step sizes
    are capped by their own exponential average (smoothing β3)."""
    beta1, beta2 = betas
    m, v, s = state if state is not None else (torch.zeros_like(param),) * 3
    m = torch.lerp(grad, m, beta1)
    v = torch.lerp(grad * grad, v, beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rate = (lr * math.sqrt(bc2) / bc1) / (_sqrt(v) + eps)
    s = torch.lerp(rate, s, beta3)
    return param - torch.minimum(rate, s) * m, (m, v, s)


# ---------------------------------------------------------------- input transform g(x; Σ)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp (theta (B, 2, 3) in normalised coordinates), bilinear, zero fill."""
    # The grid as one matrix product, theta's 2B rows against the pixel centres' (x, y, 1): built by
    # broadcasting, or by F.affine_grid's batched 3×2 products, it cost 2-3× more with its gradient.
    height, width = x.shape[-2:]
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, dtype=x.dtype, device=x.device)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, dtype=x.dtype, device=x.device)
    centres = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), torch.ones_like(x[0, 0])]).flatten(1)
    grid = theta.reshape(-1, 3).matmul(centres).view(-1, 2, height, width).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-sample separable blur with taps [a, 1 − 2a, a] along both axes (edges replicated):
    x + a·(second difference), along rows, then columns."""
    # The second differences as products with a tridiagonal matrix: padding and shifting cost 1.6×
    # more with the gradient.
    a = a.view(-1, *([1] * (x.dim() - 1)))
    x = x + a * x.matmul(_second_difference(x.shape[-1], x))
    return x + a * _second_difference(x.shape[-2], x).matmul(x)


def _second_difference(size: int, like: torch.Tensor) -> torch.Tensor:
    """The symmetric (size, size) matrix of v ↦ v[i − 1] − 2v[i] + v[i + 1], edges replicated."""
    diagonal = torch.full((size,), -2.0, dtype=like.dtype, device=like.device)
    diagonal[0] += 1.0
    diagonal[-1] += 1.0
    off = torch.ones(size - 1, dtype=like.dtype, device=like.device)
    return torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)


# ---------------------------------------------------------------- the network's adaptable layers


class StaticBatchNorm(nn.Module):
    """BatchNorm with its stored statistics and a scale and shift that may be given per sample
    ((B, C) while DENT adapts them; the trained (C,) values otherwise)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.register_buffer("weight", bn.weight.detach().clone())
        self.register_buffer("bias", bn.bias.detach().clone())
        self.register_buffer("mean", bn.running_mean.detach().clone())
        self.register_buffer("inv_std", (bn.running_var.detach() + bn.eps).rsqrt())

    def forward(self, x, weight=None, bias=None):
        # Folded into one scale and shift per (sample, channel).
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        scale = weight * self.inv_std
        shift = bias - self.mean * scale
        return x * _per_channel(scale, x) + _per_channel(shift, x)


class ChannelAffine(nn.Module):
    """A channel-wise scale and shift, the identity unless DENT gives per-sample values."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))

    def forward(self, x, weight=None, bias=None):
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        return x * _per_channel(weight, x) + _per_channel(bias, x)


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) or (B, C) values shaped to broadcast over x (B, C, ...)."""
    lead = values.shape[:-1] if values.dim() > 1 else (1,)
    return values.reshape(*lead, x.shape[1], *([1] * (x.dim() - 2)))


def configure_model(model: nn.Module) -> nn.Sequential:
    """A frozen copy of `model` in eval mode, flattened to one nn.Sequential, whose adaptable
    layers are DENT's: BatchNorm layers become StaticBatchNorm; in a network without BatchNorm,
    each Conv2d is followed by a ChannelAffine. Called as a module it is the trained network."""
    if not isinstance(model, nn.Sequential):
        raise PixgenError(f"DENT wraps nn.Sequential networks (every pixgen architecture), got {type(model).__name__}")
    layers = _flatten(copy.deepcopy(model))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layers)
    configured = []
    for layer in layers:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            configured.append(StaticBatchNorm(layer))
        else:
            single = isinstance(layer, nn.Conv2d) and layer.in_channels == 1 and layer.groups == 1 and layer.padding_mode == "zeros"
            configured.append(ImageConv(layer) if single else layer)
            if isinstance(layer, nn.Conv2d) and not has_bn:
                configured.append(ChannelAffine(layer.out_channels))
    return nn.Sequential(*configured).eval().requires_grad_(False)


class ImageConv(nn.Module):
    """A frozen convolution of a one-channel image, computed as before, whose gradient in the image
    is a matrix product and a col2im (F.fold): oneDNN's backward-data for one input channel took
    4-5× longer (wk-small's first conv 2.3 against 0.5 ms a batch of 128, madry-cnn's 28 against
    7 ms). Only `dent-input` and the attacks through DENT need that gradient."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return _ImageConvFunction.apply(x, self.conv)


class _ImageConvFunction(torch.autograd.Function):
    # The backward is made of differentiable ops, so an attack through the unrolled adaptation
    # (create_graph) differentiates it again; the weights are frozen, so only x gets a gradient.
    @staticmethod
    def forward(ctx, x, conv):
        ctx.conv, ctx.size = conv, x.shape[-2:]
        return conv(x)

    @staticmethod
    def backward(ctx, grad):
        conv = ctx.conv
        columns = conv.weight.flatten(1).t() @ grad.flatten(2)
        return F.fold(columns, ctx.size, conv.kernel_size, conv.dilation, conv.padding, conv.stride), None


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [layer for child in module for layer in _flatten(child)]
    return [module]


def collect_params(model: nn.Sequential) -> list[torch.Tensor]:
    """The trained values DENT adapts per sample: each adaptable layer's scale, then its shift,
    in the order of the network (the order in which `Dent.predict` hands them back)."""
    return [t for m in model if isinstance(m, (StaticBatchNorm, ChannelAffine)) for t in (m.weight, m.bias)]
