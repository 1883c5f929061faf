"""Wong & Kolter's dual bound on z_j − z_y, batched in plain torch (the bound convex-adversarial
0.4.4's `RobustBounds(model, eps, bounded_input=True)` computes, exact or projected).

The maths. Relax each ReLU whose pre-activation bounds straddle 0 (l < 0 < u, the set I) by
d·z ≤ ReLU(z) ≤ d·(z − l) with d = u/(u − l) (d = 1 above 0, 0 below). The upper bound on a·z_K over
the input box [lo, hi] = [max(x−ε, 0), min(x+ε, 1)] then follows from one backward pass
λ_K = a, ν = d ⊙ λ at a ReLU, λ ← Wᵀλ at an affine layer:

    U(a) = Σ λᵀb  +  Σ_{j∈I} (−l_j)[ν_j]_+  +  λ_inᵀ c + |λ_in|ᵀ r,     c, r = (hi ± lo)/2,

and every term splits into a part linear in λ ("lin") and an ℓ1 part ("abs"): (−l)[ν]_+ =
−lν/2 + |l||ν|/2. The bounds l, u of a layer's pre-activations are lin ∓ abs for λ = each unit.

Exact bound (`projections=0`): every layer's bounds by that backward pass from all its units.
The library instead pushes the input identity and one one-hot row per unstable unit forward
through the net, one Python object per term. Here, while the layers below are convolutions and
ReLUs, a unit's backward pass only reaches its receptive field, so all units' rows live on small
windows (unfolded maps; Wᵀ between windows as one GEMM) — the rows of the C units at one
position start as the identity, shared by batch and positions; above a Linear the rows are whole
maps, starting from the identity shared by the batch, in chunks of ≤ CHUNK_FLOATS.

Projected estimate (`projections=k`, training): forward, as the library. The centre (lin) goes
through each layer as a batch, and each k-row block through it in a single call as
(B, k, *shape), its ℓ1 norm estimated by the median of |·| over the block (Cauchy projections;
the median of |Cauchy(0, 1)| is 1, so no rescaling): the input's R·hi and R·lo (one R (k, input)
shared by the batch, as the library; abs gets (med_hi − med_lo)/2) and, per ReLU, k Cauchy rows
scaled by l·d, which is 0 off the unstable units (abs gets med/2) — or, as the library does when
the batch has at most k unstable units there, exact one-hot rows (abs gets their ℓ1 sum/2). The
margins are exact given these bounds and, as in the library (its projected input layer inherits
the unclipped ε-ball objective), their input term is λ_inᵀx + ε‖λ_in‖₁, not the box's: the
projected estimate sits above the exact bound where the box clips the ball.

Where the time goes, and how it is kept down (training, wk-small): the blocks through the convs
and their gradients, over 40% of the step at near the core's peak in oneDNN (its data gradient
of the stride-2 conv is the largest piece; its transposed conv does no better in place), and the
GEMMs of the last Linear, a tenth; the rest is passes over the blocks. Maps are held
channels-last, (H, W, C), so oneDNN's convs take and give them without copies; blocks are never
concatenated; the median is a sorting network run by a Numba kernel on each example's block in
cache; the passes over the blocks that autograd would make several of (rows·d and its two
gradients, the margins' Σ[ν]_+·(−l) and its gradients) are one Numba pass each way; the new
rows' Cauchy draws are made on the unstable units only (a small share once training has made
most ReLUs stable) and spread into the block by one Numba pass each way; the margins carry the
C − 1 rows e_j − e_y, j ≠ y, not the zero row; the last ReLU's estimate, whose products go no
further, is differentiated through the one chosen row per unit (B·U scaled rows instead of two
dense GEMMs k times larger); and Wᵀ of a few-channel conv (col2im) is differentiated by the conv
itself.

Differences from the library. Same numbers: the exact bound and its gradient agree to float
rounding; the projected estimate has its law, not its draws — Cauchy values come from
tan(π(U − ½)) (drawn on every unit, times a scale that is 0 off the unstable ones, off the CPU), no
rows are drawn for the last ReLU (the library draws them and never uses them), and the median
sends its gradient to one chosen element, as torch.median does (a tie of magnitudes is one of
zeros, whose sign passes no gradient, or has probability 0). Projections must be fewer than the
input's size (the library then uses the exact input term). The library ignores Conv2d dilation
and groups and lacks the transposed conv's output_padding (it fails on e.g. 3×3/stride-2 convs
of even maps); both are handled here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError

SUPPORTED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)
CHUNK_FLOATS = 1 << 24  # per tensor in the exact backward passes: ~64 MB in float32
FOLD_CHANNELS = 4  # Conv2d layers with at most this many input channels are transposed by col2im
MEDIAN_NETWORK_MAX = 64  # beyond, the network's comparators outnumber what a sort costs


def bounds(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, projections: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C) upper bounds on z_j − z_y over the ε-ball ∩ [0, 1] (column y is 0): exact with
    projections=0, else the k-projection median estimate used for training. Differentiable in the
    model's parameters; random draws come from `generator`, else torch's global RNG."""
    layers = _check(model)
    shapes = [_channels_last(s) for s in _shapes(layers, x)]
    weights = _weights(layers, shapes)
    # Copied to (H, W, C) strides: torch counts a permuted one-channel map as contiguous whatever
    # its channel stride (here a row's), the projected rows inherit that stride, and oneDNN's weight
    # gradient of the first conv then took 9.2 against 0.9 ms a block (a dual step's backward
    # pass: 113 against 94 ms).
    lo, hi = (side.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format) for side in ((x - eps).clamp(min=0), (x + eps).clamp(max=1)))
    if projections:
        if projections >= x[0].numel():
            raise PixgenError(f"need fewer projections than input values ({x[0].numel()}); use projections=0 for the exact bound")
        relus = _relax_projected(layers, weights, shapes, lo, hi, projections, generator)
    else:
        relus = _relax_exact(layers, weights, shapes, lo, hi)
    classes = shapes[-1][0]
    others = torch.arange(classes, device=x.device).expand(len(y), -1)
    others = others[others != y[:, None]].reshape(len(y), classes - 1)  # row y, e_y − e_y, is 0: not carried
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    lam = eye[others] - eye[y][:, None]  # row j: e_j − e_y
    if projections:  # the library's unclipped ε-ball input term
        margins = _margins(layers, weights, lam, relus, shapes, x.permute(0, 2, 3, 1), torch.full_like(lo, eps))
    else:
        margins = _margins(layers, weights, lam, relus, shapes, (hi + lo) / 2, (hi - lo) / 2)
    return margins.new_zeros(len(y), classes).scatter(1, others, margins)


def _check(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise PixgenError(f"pixgen.dual bounds nn.Sequential networks, got {type(model).__name__}")
    layers = list(model)
    for layer in layers:
        if not isinstance(layer, SUPPORTED):
            raise PixgenError(f"pixgen.dual cannot bound a {type(layer).__name__} layer; it bounds nn.Sequential nets of Conv2d, Linear, ReLU and Flatten")
        if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
            raise PixgenError("pixgen.dual bounds Conv2d layers with numeric zero padding only")
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise PixgenError("pixgen.dual needs a network whose last layer is nn.Linear (the logits)")
    return layers


@torch.no_grad()
def _shapes(layers: list[nn.Module], x: torch.Tensor) -> list[tuple[int, ...]]:
    """Per-example shape of each layer's input, then of the output."""
    z = x[:1]
    shapes = [tuple(z.shape[1:])]
    for layer in layers:
        z = layer(z)
        shapes.append(tuple(z.shape[1:]))
    for layer, shape, out in zip(layers, shapes, shapes[1:]):
        if isinstance(layer, nn.Linear) and len(shape) != 1:
            raise PixgenError("pixgen.dual needs flat inputs to Linear layers (put nn.Flatten() before them)")
        if isinstance(layer, nn.Flatten) and len(out) != 1:
            raise PixgenError("pixgen.dual needs Flatten layers that flatten each example whole")
    return shapes


def _channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-example shape in this module's layout: maps (C, H, W) are held as (H, W, C), so that
    oneDNN's convolutions take and give them without copies (and elementwise ops never meet two
    layouts, which sends them off their fast paths)."""
    return (*shape[1:], shape[0]) if len(shape) == 3 else shape


def _weights(layers: list[nn.Module], shapes: list[tuple[int, ...]]) -> dict[int, torch.Tensor]:
    """Each Linear's weight, its columns reordered to read a flattened (H, W, C) map."""
    weights, flat = {}, None
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Flatten) and len(shapes[i]) == 3:
            flat = shapes[i]
        elif isinstance(layer, nn.Linear) and flat is not None:
            height, width, channels = flat
            weights[i] = layer.weight.unflatten(1, (channels, height, width)).permute(0, 2, 3, 1).flatten(1)
            flat = None
        elif isinstance(layer, nn.Linear):
            weights[i] = layer.weight
    return weights


def _relax(zl: torch.Tensor, zu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, l on I and 0 elsewhere). Masks carry no gradient; d does, through l and u, as in the library."""
    unstable = (zu > 0) & (zl < 0)
    slope = zu / torch.where(unstable, zu - zl, torch.ones_like(zu))  # no 0/0 off I, whose NaN would reach the gradient
    d = torch.where(unstable, slope, (zl >= 0).to(zl.dtype))
    return d, torch.where(unstable, zl, torch.zeros_like(zl))


def _affine_t(layer: nn.Module, weight: torch.Tensor | None, lam: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """λ ← Wᵀλ for rows λ (B, N, *out_shape)."""
    b, n = lam.shape[:2]
    if isinstance(layer, nn.Linear):
        return lam.matmul(weight)
    if isinstance(layer, nn.Flatten):
        return lam.reshape(b, n, *in_shape)
    out = lam.reshape(b * n, *lam.shape[2:])
    k, s, p, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if layer.in_channels <= FOLD_CHANNELS and layer.groups == 1:
        out = _FoldTranspose.apply(out, layer.weight, in_shape[:2], s, p, dil)
    else:
        pad = tuple(in_shape[i] - ((out.shape[1 + i] - 1) * s[i] - 2 * p[i] + dil[i] * (k[i] - 1) + 1) for i in range(2))
        out = F.conv_transpose2d(out.permute(0, 3, 1, 2), layer.weight, stride=s, padding=p, output_padding=pad, groups=layer.groups, dilation=dil)
    return out.permute(0, 2, 3, 1).reshape(b, n, *in_shape)


class _FoldTranspose(torch.autograd.Function):
    """Wᵀλ of a Conv2d with few input channels, for λ (N, H', W', C_out): oneDNN's transposed conv
    is slow when it makes few channels; Wᵀ at each position, then col2im, is not. Its gradient is
    the layer's own conv (and that conv's weight gradient), which oneDNN does fast, where autograd
    would go back through col2im by im2col several times slower."""

    @staticmethod
    def forward(ctx, lam, weight, size, stride, padding, dilation):
        ctx.save_for_backward(lam, weight)
        ctx.geometry = stride, padding, dilation
        cols = weight.flatten(1).t().matmul(lam.flatten(1, 2).mT)
        return F.fold(cols, size, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)

    @staticmethod
    def backward(ctx, grad):
        lam, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_lam = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_lam = F.conv2d(grad, weight, None, stride, padding, dilation).permute(0, 2, 3, 1)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(lam.permute(0, 3, 1, 2), grad, weight, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])[1]
        return grad_lam, grad_weight, None, None, None, None


def _bias_t(layer: nn.Module, lam: torch.Tensor) -> torch.Tensor:
    """λᵀb of the layer's bias for rows λ (B, N, *out_shape)."""
    summed = lam if isinstance(layer, nn.Linear) else lam.sum((-3, -2))
    return summed.matmul(layer.bias)


def _backward(layers, weights, stop, lam, relus, shapes, centre, radius):
    """(lin, abs) of U for the rows λ (B or 1, N, *shape) at the output of layers[stop − 1], the
    input box being centre ± radius."""
    lin = abs_ = 0
    for i in range(stop - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.ReLU):
            d, low = relus[i]
            lam = lam * d[:, None]
            flat, low = lam.flatten(2), low.flatten(1)[:, :, None]
            lin = lin - flat.matmul(low).squeeze(2) / 2
            abs_ = abs_ - flat.abs().matmul(low).squeeze(2) / 2  # −l ≥ 0 on I
            continue
        if getattr(layer, "bias", None) is not None:
            lin = lin + _bias_t(layer, lam)
        lam = _affine_t(layer, weights.get(i), lam, shapes[i])
    flat = lam.flatten(2)
    lin = lin + flat.matmul(centre.flatten(1)[:, :, None]).squeeze(2)
    abs_ = abs_ + flat.abs().matmul(radius.flatten(1)[:, :, None]).squeeze(2)
    return lin, abs_


def _margins(layers, weights, lam, relus, shapes, centre, radius):
    """U for the margin rows λ (B, C, C): _backward with each ReLU term's halves merged back
    into (−l)[ν]_+ and products summed elementwise, whose gradients cost less than batched
    matrix-vector products' in the pass that training differentiates."""
    bound = 0
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.ReLU):
            d, low = relus[i]
            lam = _scale(lam, d)
            bound = bound - _relu_term_sum(lam, low)
            continue
        if getattr(layer, "bias", None) is not None:
            bound = bound + _bias_t(layer, lam)
        lam = _affine_t(layer, weights.get(i), lam, shapes[i])
    return bound + (lam * centre[:, None]).flatten(2).sum(2) + (lam.abs() * radius[:, None]).flatten(2).sum(2)


def _relax_exact(layers, weights, shapes, lo, hi):
    """Each ReLU's (d, l on I), its pre-activation bounds from backward passes over all its units."""
    relus = {}
    centre, radius = (hi + lo) / 2, (hi - lo) / 2
    batch = lo.shape[0]
    widest = max(torch.Size(s).numel() for s in shapes)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.ReLU):
            continue
        shape = shapes[i]
        if len(shape) == 3 and all(isinstance(below, (nn.Conv2d, nn.ReLU)) for below in layers[:i]):
            lin, abs_ = _windowed(layers, i, relus, shapes, centre, radius)
        else:
            units = torch.Size(shape).numel()
            step = max(1, CHUNK_FLOATS // (batch * widest))
            parts = []
            for s in range(0, units, step):
                rows = torch.eye(units, dtype=lo.dtype, device=lo.device)[s : s + step].reshape(1, -1, *shape)
                lin, abs_ = _backward(layers, weights, i, rows, relus, shapes, centre, radius)
                parts.append((lin.expand(batch, -1), abs_.expand(batch, -1)))
            lin = torch.cat([p[0] for p in parts], 1).reshape(batch, *shape)
            abs_ = torch.cat([p[1] for p in parts], 1).reshape(batch, *shape)
        relus[i] = _relax(lin - abs_, lin + abs_)
    return relus


def _windowed(layers, stop, relus, shapes, centre, radius):
    """(lin, abs) (B, H, W, C) of every unit of a conv layer's output (layers[:stop] all Conv2d
    and ReLU): the backward pass of a unit only reaches its receptive field, so each unit's rows
    live on windows — translates of one another — instead of whole feature maps. The rows of the
    C units at one position start as the identity, shared by the batch and the positions."""
    height, width, channels = shapes[stop]
    batch = centre.shape[0]
    maps = _window_maps(layers, stop, centre)
    widest = max(channels, *(window_t.shape[1] for window_t, *_ in maps.values()))
    step = max(1, CHUNK_FLOATS // (height * width * channels * widest))
    parts = []
    for s in range(0, batch, step):
        relus_part = {j: (d[s : s + step], low[s : s + step]) for j, (d, low) in relus.items() if j < stop}
        parts.append(_windowed_part(layers, stop, maps, relus_part, shapes, centre[s : s + step], radius[s : s + step]))
    lin = torch.cat([p[0] for p in parts])
    abs_ = torch.cat([p[1] for p in parts])
    return (t.reshape(len(t), height, width, channels) for t in (lin, abs_))


def _window_maps(layers, stop, like):
    """For each conv below layers[stop], walked down from it: (Wᵀ from its output window to its
    input window as one matrix, the input window's size, stride and padding on the input map).
    A GEMM by this matrix beats oneDNN's transposed conv on many tiny images several times over."""
    maps = {}
    size, stride, pad = (1, 1), (1, 1), (0, 0)
    for j in range(stop - 1, -1, -1):
        layer = layers[j]
        if isinstance(layer, nn.ReLU):
            continue
        k, st, pd, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        basis = torch.eye(layer.out_channels * size[0] * size[1], dtype=like.dtype, device=like.device).reshape(-1, layer.out_channels, *size)
        window_t = F.conv_transpose2d(basis, layer.weight, stride=st, groups=layer.groups, dilation=dil).flatten(1)
        size = tuple((sz - 1) * s_ + dl * (kk - 1) + 1 for sz, s_, dl, kk in zip(size, st, dil, k))
        stride = tuple(a * c for a, c in zip(stride, st))
        pad = tuple(a * c + q for a, c, q in zip(pad, st, pd))
        maps[j] = window_t, size, stride, pad
    return maps


def _windowed_part(layers, stop, maps, relus, shapes, centre, radius):
    height, width, channels = shapes[stop]
    batch = centre.shape[0]
    eye = torch.eye(channels, dtype=centre.dtype, device=centre.device)
    lam = eye.reshape(1, 1, channels, channels, 1, 1)  # (batch, position, unit, *window)
    size, stride, pad = (1, 1), (1, 1), (0, 0)
    lin = abs_ = 0

    def windows(t):  # (b, H, W, c) → (b, positions, c, *size): the unfolded windows of a map
        t = t.permute(0, 3, 1, 2)
        right = [(n - 1) * st + sz - full - p for n, st, sz, full, p in zip((height, width), stride, size, t.shape[-2:], pad)]
        padded = F.pad(t, (pad[1], right[1], pad[0], right[0]))  # a negative pad crops what no window reaches
        unfolded = F.unfold(padded, size, stride=stride)
        # contiguous, so that the rows scaled by it are too: with unfold's layout (positions
        # innermost) each matrix product over the rows first copied them (a third of the time)
        return unfolded.transpose(1, 2).reshape(t.shape[0], -1, t.shape[1], *size).contiguous()

    def dot(rows, values):  # Σ over each row's window of rows · values
        return rows.flatten(3).matmul(values.flatten(2)[..., None]).squeeze(-1)

    for j in range(stop - 1, -1, -1):
        layer = layers[j]
        if isinstance(layer, nn.ReLU):
            d, low = relus[j]
            shared = lam.flatten(3)[0, 0] if lam.shape[:2] == (1, 1) else None
            lam = lam * windows(d)[:, :, None]
            if shared is not None:  # rows the batch shares: both sums are their products with d·l (d ≥ 0), no pass over the scaled rows
                scaled = windows(d * low).flatten(2)
                lin = lin - scaled.matmul(shared.t()) / 2
                abs_ = abs_ - scaled.matmul(shared.abs().t()) / 2
            else:
                low = windows(low)
                lin = lin - dot(lam, low) / 2
                abs_ = abs_ - dot(lam.abs(), low) / 2
            continue
        if layer.bias is not None:
            lin = lin + lam.sum((-2, -1)).matmul(layer.bias)
        window_t, size, stride, pad = maps[j]
        lam = lam.flatten(3).matmul(window_t).reshape(*lam.shape[:3], layer.in_channels, *size)
        if j > 0 and not isinstance(layers[j - 1], nn.ReLU):  # conv on conv: drop what falls on padding
            lam = lam * windows(torch.ones(1, *shapes[j], dtype=lam.dtype, device=lam.device))[:, :, None]
    lin = lin + dot(lam, windows(centre))
    abs_ = abs_ + dot(lam.abs(), windows(radius))
    return lin.expand(batch, height * width, channels), abs_.expand(batch, height * width, channels)


def _relax_projected(layers, weights, shapes, lo, hi, k, generator):
    """Each ReLU's (d, l on I), its pre-activation bounds estimated by the library's projections.
    The rows travel as blocks of k, one per estimate, each through every layer on its own: no
    concatenation, and each median reads a block whole."""
    batch = lo.shape[0]
    projection = _cauchy((1, k, *shapes[0]), lo, generator)
    centre = (hi + lo) / 2
    blocks = [(projection * hi[:, None], 1.0, True), (projection * lo[:, None], -1.0, True)]  # (rows, sign in abs, median estimate?)
    relus = {}
    last_relu = max((i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)), default=-1)
    pending = None  # a Linear just below the last ReLU, left to the estimates (_LinearAbsMedian)
    for i, layer in enumerate(layers[: last_relu + 1]):
        if not isinstance(layer, nn.ReLU):
            centre = _affine_rows(layer, weights.get(i), centre[:, None], bias=True)[:, 0]
            if i + 1 == last_relu and isinstance(layer, nn.Linear):
                pending = weights[i]
            else:
                blocks = [(_affine_rows(layer, weights.get(i), rows), sign, median) for rows, sign, median in blocks]
            continue
        abs_ = sum(sign * _estimate(rows, median, pending) for rows, sign, median in blocks) / 2
        d, low = _relax(centre - abs_, centre + abs_)
        relus[i] = (d, low)
        if i == last_relu:
            break
        scale = low * d
        unstable = int((low < 0).sum())
        if unstable > k:
            new = _unstable_cauchy(scale, low < 0, k, generator)
        else:  # the library's exact rows: one per unstable unit, at most k per example
            flat = scale.flatten(1)
            first = min(k, flat.shape[1])
            index = (low.flatten(1) < 0).to(lo.dtype).topk(first, 1).indices
            one_hot = torch.zeros(batch, k, flat.shape[1], dtype=lo.dtype, device=lo.device)
            one_hot[:, :first].scatter_(2, index[:, :, None], 1.0)
            new = (one_hot * flat[:, None]).reshape(batch, k, *shapes[i])
        centre = d * (centre - low / 2)
        blocks = [(_scale(rows, d), sign, median) for rows, sign, median in blocks] + [(new, 1.0, unstable > k)]
    return relus


def _estimate(rows: torch.Tensor, median: bool, weight: torch.Tensor | None) -> torch.Tensor:
    """A block's ℓ1 estimate per unit: the median of |rows| over the block, or the exact sum of
    one-hot rows; of rows·Wᵀ where a Linear's weight W is given."""
    if weight is not None and median and rows.shape[1] <= MEDIAN_NETWORK_MAX and rows.device.type == "cpu":
        return _LinearAbsMedian.apply(rows, weight)
    if weight is not None:
        rows = F.linear(rows, weight)
    return _abs_median(rows) if median else rows.abs().sum(1)


class _LinearAbsMedian(torch.autograd.Function):
    """The median over a block of |rows·Wᵀ|, (B, U) for rows (B, R, D) and W (U, D), where these
    products go no further (the last ReLU's estimate). Only the chosen row of each unit and
    example carries a gradient, so the backward pass is B·U scaled rows of W and of the block
    (Numba) instead of two dense GEMMs R times larger."""

    @staticmethod
    def forward(ctx, rows, weight):
        products = F.linear(rows, weight).contiguous()
        picked = products.new_empty(products.shape[0], products.shape[2])
        index = torch.empty(picked.shape, dtype=torch.int64)
        network = _selection_network(rows.shape[1], (rows.shape[1] - 1) // 2)
        _split(_median_kernel, products, picked, index, network=network, rank=(rows.shape[1] - 1) // 2)
        ctx.save_for_backward(rows, weight, index, picked.sign())
        return picked.abs()

    @staticmethod
    def backward(ctx, grad):
        rows, weight, index, sign = ctx.saved_tensors
        chosen = (sign * grad).contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.zeros_like(rows)
            _split(_scatter_rows, grad_rows, index, chosen, weight=weight.detach().contiguous().numpy())
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            _split(_gather_rows, grad_weight, index.t().contiguous(), chosen.t().contiguous(), rows=rows.detach().contiguous().numpy())
        return grad_rows, grad_weight


@numba.njit(cache=True, nogil=True)
def _scatter_rows(grad_rows, index, chosen, weight):
    """grad_rows[b, index[b, u]] += chosen[b, u] · weight[u]."""
    for b in range(grad_rows.shape[0]):
        for u in range(index.shape[1]):
            r, c = index[b, u], chosen[b, u]
            for t in range(weight.shape[1]):
                grad_rows[b, r, t] += c * weight[u, t]


@numba.njit(cache=True, nogil=True)
def _gather_rows(grad_weight, index, chosen, rows):
    """grad_weight[u] += Σ_b chosen[u, b] · rows[b, index[u, b]] (index and chosen transposed, so
    that the threads split the units)."""
    for u in range(grad_weight.shape[0]):
        for b in range(index.shape[1]):
            r, c = index[u, b], chosen[u, b]
            for t in range(rows.shape[2]):
                grad_weight[u, t] += c * rows[b, r, t]


def _scale(rows: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """rows · d for rows (B, R, *shape) and d (B, *shape); by Numba's kernels on the CPU."""
    return _ScaleRows.apply(rows, d) if rows.device.type == "cpu" else rows * d[:, None]


def _relu_term_sum(lam: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Σ over the units of [λ]_+ · l, (B, R), for rows λ (B, R, *shape) and l (B, *shape); by
    Numba's kernels on the CPU."""
    return _ReluTerm.apply(lam, low) if lam.device.type == "cpu" else (F.relu(lam) * low[:, None]).flatten(2).sum(2)


class _ScaleRows(torch.autograd.Function):
    """_scale with a backward of one Numba pass (∂rows = grad · d and ∂d = Σ_r grad · rows
    together) where autograd's makes three over these rows, the largest tensors of the bound."""

    @staticmethod
    def forward(ctx, rows, d):
        ctx.save_for_backward(rows, d)
        return rows * d[:, None]

    @staticmethod
    def backward(ctx, grad):
        rows, d = ctx.saved_tensors
        flat = grad.contiguous().flatten(2)
        grad_rows = torch.empty_like(flat) if ctx.needs_input_grad[0] else flat.new_empty(0, 0, 0)
        grad_d = flat.new_empty(flat.shape[0], flat.shape[2]) if ctx.needs_input_grad[1] else flat.new_empty(0, 0)
        _split(_scale_backward, flat, rows.contiguous().flatten(2), d.contiguous().flatten(1), grad_rows, grad_d)
        return (grad_rows.reshape(rows.shape) if ctx.needs_input_grad[0] else None), (grad_d.reshape(d.shape) if ctx.needs_input_grad[1] else None)


class _ReluTerm(torch.autograd.Function):
    """_relu_term_sum in one Numba pass each way, where autograd's relu, product and sum make eight."""

    @staticmethod
    def forward(ctx, lam, low):
        ctx.shapes = lam.shape, low.shape
        lam, low = lam.contiguous().flatten(2), low.contiguous().flatten(1)
        ctx.save_for_backward(lam, low)
        out = lam.new_empty(lam.shape[:2])
        _split(_relu_term, lam, low, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        lam, low = ctx.saved_tensors
        grad_lam = torch.empty_like(lam)
        grad_low = torch.empty_like(low)
        _split(_relu_term_backward, grad.contiguous(), lam, low, grad_lam, grad_low)
        return grad_lam.reshape(ctx.shapes[0]), grad_low.reshape(ctx.shapes[1])


@numba.njit(cache=True, nogil=True)
def _scale_backward(grad, rows, d, grad_rows, grad_d):
    """grad_rows = grad · d and grad_d = Σ_r grad · rows, each skipped where given empty."""
    batch, size, units = grad.shape
    for b in range(batch):
        if grad_d.shape[0]:
            grad_d[b] = 0
        for r in range(size):
            if grad_rows.shape[0]:
                for u in range(units):
                    grad_rows[b, r, u] = grad[b, r, u] * d[b, u]
            if grad_d.shape[0]:
                for u in range(units):
                    grad_d[b, u] += grad[b, r, u] * rows[b, r, u]


@numba.njit(cache=True, nogil=True)
def _relu_term(lam, low, out):
    batch, size, units = lam.shape
    for b in range(batch):
        for r in range(size):
            total = 0.0
            for u in range(units):
                total += max(lam[b, r, u], 0.0) * low[b, u]
            out[b, r] = total


@numba.njit(cache=True, nogil=True)
def _relu_term_backward(grad, lam, low, grad_lam, grad_low):
    batch, size, units = lam.shape
    for b in range(batch):
        grad_low[b] = 0
        for r in range(size):
            g = grad[b, r]
            for u in range(units):
                positive = lam[b, r, u] > 0
                grad_lam[b, r, u] = g * low[b, u] if positive else 0.0
                grad_low[b, u] += g * lam[b, r, u] if positive else 0.0


def _split(kernel, *arrays, **constants):
    """kernel(*arrays, **constants) on CPU tensors' numpy views, the first axis of `arrays` (not
    of the constants) split over torch's threads: the kernels release the GIL."""
    arrays = [a.detach().numpy() for a in arrays]
    threads = min(torch.get_num_threads(), arrays[0].shape[0])
    if threads <= 1:
        kernel(*arrays, **constants)
        return
    edges = np.linspace(0, arrays[0].shape[0], threads + 1).astype(int)
    parts = [_pool().submit(kernel, *(a[s:e] if a.shape[0] else a for a in arrays), **constants) for s, e in zip(edges, edges[1:])]
    for part in parts:
        part.result()


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count())


def _cauchy(shape, like, generator):
    """Standard Cauchy draws as tan(π(U − ½)): the same law as Tensor.cauchy_, several times faster on CPU."""
    uniform = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return uniform.sub_(0.5).mul_(torch.pi).tan_()


def _unstable_cauchy(scale: torch.Tensor, unstable: torch.Tensor, k: int, generator) -> torch.Tensor:
    """k rows (B, k, *shape) of Cauchy draws times `scale`, which is 0 off the `unstable` units.
    The library draws on the unstable units only, as the CPU path does (a small share of the units
    once training has made most ReLUs stable); elsewhere drawing on every unit has the same law and
    saves a scatter."""
    if scale.device.type != "cpu":
        return _scale(_cauchy((scale.shape[0], k, *scale.shape[1:]), scale, generator), scale)
    return _SpreadCauchy.apply(scale, unstable, k, generator)


class _SpreadCauchy(torch.autograd.Function):
    """Draws on the unstable units only, spread into the dense rows (zeros elsewhere) and scaled in
    one Numba pass; the scale's gradient likewise reads the rows' gradient at those units only."""

    @staticmethod
    def forward(ctx, scale, unstable, k, generator):
        unstable = unstable.flatten(1).contiguous()
        counts = unstable.sum(1)
        start = counts.cumsum(0) - counts  # each example's first draw in a row of draws
        draws = _cauchy((k, int(counts.sum())), scale, generator)
        rows = scale.new_empty(scale.shape[0], k, unstable.shape[1])
        _split(_spread, rows, scale.detach().contiguous().flatten(1), unstable, start, draws=draws.numpy())
        ctx.save_for_backward(unstable, start, draws)
        ctx.shape = scale.shape
        return rows.reshape(scale.shape[0], k, *scale.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        unstable, start, draws = ctx.saved_tensors
        grad_scale = grad.new_empty(unstable.shape)
        _split(_spread_backward, grad.contiguous().flatten(2), unstable, start, grad_scale, draws=draws.numpy())
        return grad_scale.reshape(ctx.shape), None, None, None


@numba.njit(cache=True, nogil=True)
def _spread(rows, scale, unstable, start, draws):
    """rows[b, r, u] = scale[b, u] · draws[r, p], p counting example b's unstable units from start[b]; 0 off them."""
    batch, size, units = rows.shape
    for b in range(batch):
        for r in range(size):
            p = start[b]
            for u in range(units):
                if unstable[b, u]:
                    rows[b, r, u] = scale[b, u] * draws[r, p]
                    p += 1
                else:
                    rows[b, r, u] = 0.0


@numba.njit(cache=True, nogil=True)
def _spread_backward(grad, unstable, start, grad_scale, draws):
    batch, size, units = grad.shape
    for b in range(batch):
        grad_scale[b] = 0
        for r in range(size):
            p = start[b]
            for u in range(units):
                if unstable[b, u]:
                    grad_scale[b, u] += grad[b, r, u] * draws[r, p]
                    p += 1


def _abs_median(rows: torch.Tensor) -> torch.Tensor:
    """torch.median of |rows| over dim 1 (the lower median for even sizes)."""
    if rows.shape[1] > MEDIAN_NETWORK_MAX or rows.device.type != "cpu":
        return rows.abs().median(1).values
    return _NetworkAbsMedian.apply(rows)


class _NetworkAbsMedian(torch.autograd.Function):
    """The median by a pruned Batcher sorting network, run by a Numba kernel on each example's
    |rows| in cache: the same network of torch min/max ops made a pass over memory per
    comparator, and torch.median is slower still. The gradient goes to the chosen element."""

    @staticmethod
    def forward(ctx, rows):
        flat = rows.detach().flatten(2).contiguous()
        picked = torch.empty(flat.shape[0], flat.shape[2], dtype=rows.dtype)
        index = torch.empty(picked.shape, dtype=torch.int64)
        network = _selection_network(flat.shape[1], (flat.shape[1] - 1) // 2)
        _split(_median_kernel, flat, picked, index, network=network, rank=(flat.shape[1] - 1) // 2)
        ctx.save_for_backward(index, picked.sign())
        ctx.shape = rows.shape
        return picked.abs().reshape(rows.shape[:1] + rows.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        index, sign = ctx.saved_tensors
        b, r = ctx.shape[:2]
        chosen = torch.zeros(b, r, index.shape[1], dtype=grad.dtype, device=grad.device)
        return chosen.scatter_(1, index[:, None], (sign * grad.reshape(b, -1))[:, None]).reshape(ctx.shape)


@numba.njit(cache=True, nogil=True)
def _median_kernel(rows, picked, index, network, rank):
    """picked[b, u], index[b, u]: the row r whose |rows[b, r, u]| is of the given rank, by the
    network's comparators (a, b) run over all u at once."""
    batch, size, units = rows.shape
    for b in range(batch):
        wires = np.abs(rows[b])
        for c in range(network.shape[0]):
            one, two = network[c, 0], network[c, 1]
            for u in range(units):
                x, y = wires[one, u], wires[two, u]
                wires[one, u] = min(x, y)
                wires[two, u] = max(x, y)
        for u in range(units):
            median = wires[rank, u]
            for r in range(size):
                if abs(rows[b, r, u]) == median:
                    picked[b, u] = rows[b, r, u]
                    index[b, u] = r
                    break


@functools.cache
def _selection_network(size: int, rank: int) -> np.ndarray:
    """Comparators (a, b), rows of an (n, 2) array, of Batcher's odd–even merge sort of `size`
    wires, pruned to those that the wire `rank` depends on."""
    comparators = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {rank}, []
    for a, b in reversed(comparators):
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return np.array(kept[::-1], dtype=np.int64).reshape(-1, 2)


def _affine_rows(layer: nn.Module, weight: torch.Tensor | None, rows: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """The layer on rows (B, R, *shape), all in one call; without its bias unless `bias`."""
    b, n = rows.shape[:2]
    if isinstance(layer, nn.Flatten):
        return rows.reshape(b, n, -1)
    if isinstance(layer, nn.Linear):
        return F.linear(rows, weight, layer.bias if bias else None)
    images = rows.reshape(b * n, *rows.shape[2:]).permute(0, 3, 1, 2)
    out = F.conv2d(images, layer.weight, layer.bias if bias else None, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = out.permute(0, 2, 3, 1).contiguous()  # a no-op where oneDNN answers channels-last, as it does to channels-last inputs
    return out.reshape(b, n, *out.shape[1:])
