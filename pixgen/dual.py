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
through each layer as a batch, and every k-row group through it in a single call as
(B, rows, *shape), its ℓ1 norm estimated by the median of |·| over the group (Cauchy
projections; the median of |Cauchy(0, 1)| is 1, so no rescaling): the input's R·hi and R·lo
(one R (k, input) shared by the batch, as the library; abs gets (med_hi − med_lo)/2) and, per
ReLU, k Cauchy rows on its unstable units scaled by l·d (abs gets med/2) — or, as the library
does when the batch has at most k unstable units there, exact one-hot rows (abs gets their ℓ1
sum/2). The margins are exact given these bounds and, as in the library (its projected input
layer inherits the unclipped ε-ball objective), their input term is λ_inᵀx + ε‖λ_in‖₁, not the
box's: the projected estimate sits above the exact bound where the box clips the ball.

Differences from the library. Same numbers: the exact bound and its gradient agree to float
rounding; the projected estimate has its law, not its draws — Cauchy values come from
tan(π(U − ½)), no rows are drawn for the last ReLU (the library draws them and never uses
them), and the median (a sorting network, not torch.median) sends the gradient of a tie to
every tied element (ties are zeros, which pass none). Projections must be fewer than the input's
size (the library then uses the exact input term). The library ignores Conv2d dilation and
groups and lacks the transposed conv's output_padding (it fails on e.g. 3×3/stride-2 convs of
even maps); both are handled here.
"""

from __future__ import annotations

import functools

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
    shapes = _shapes(layers, x)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    if projections:
        if projections >= x[0].numel():
            raise PixgenError(f"need fewer projections than input values ({x[0].numel()}); use projections=0 for the exact bound")
        relus = _relax_projected(layers, shapes, lo, hi, projections, generator)
    else:
        relus = _relax_exact(layers, shapes, lo, hi)
    classes = shapes[-1][0]
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    lam = eye[None] - eye[y][:, None]  # row j: e_j − e_y
    if projections:  # the library's unclipped ε-ball input term
        return _margins(layers, lam, relus, shapes, x, torch.full_like(x, eps))
    return _margins(layers, lam, relus, shapes, (hi + lo) / 2, (hi - lo) / 2)


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
    for layer, shape in zip(layers, shapes):
        if isinstance(layer, nn.Linear) and len(shape) != 1:
            raise PixgenError("pixgen.dual needs flat inputs to Linear layers (put nn.Flatten() before them)")
    return shapes


def _relax(zl: torch.Tensor, zu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, l on I and 0 elsewhere). Masks carry no gradient; d does, through l and u, as in the library."""
    unstable = (zu > 0) & (zl < 0)
    slope = zu / torch.where(unstable, zu - zl, torch.ones_like(zu))  # no 0/0 off I, whose NaN would reach the gradient
    d = torch.where(unstable, slope, (zl >= 0).to(zl.dtype))
    return d, torch.where(unstable, zl, torch.zeros_like(zl))


def _affine_t(layer: nn.Module, lam: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """λ ← Wᵀλ for rows λ (B, N, *out_shape)."""
    b, n = lam.shape[:2]
    if isinstance(layer, nn.Linear):
        return lam.matmul(layer.weight)
    if isinstance(layer, nn.Flatten):
        return lam.reshape(b, n, *in_shape)
    out = lam.reshape(b * n, *lam.shape[2:])
    k, s, p, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if layer.in_channels <= FOLD_CHANNELS and layer.groups == 1:
        # oneDNN's transposed conv is slow when it makes few channels; Wᵀ on each position, then col2im, is not
        cols = layer.weight.flatten(1).t().matmul(out.flatten(2))
        out = F.fold(cols, in_shape[1:], k, dilation=dil, padding=p, stride=s)
    else:
        pad = tuple(in_shape[1 + i] - ((out.shape[2 + i] - 1) * s[i] - 2 * p[i] + dil[i] * (k[i] - 1) + 1) for i in range(2))
        out = out.contiguous(memory_format=torch.channels_last)  # oneDNN is ~2× faster so
        out = F.conv_transpose2d(out, layer.weight, stride=s, padding=p, output_padding=pad, groups=layer.groups, dilation=dil)
        out = out.contiguous()  # elementwise kernels on channels-last 5-D views fall off their fast paths
    return out.reshape(b, n, *in_shape)


def _backward(layers, stop, lam, relus, shapes, centre, radius):
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
            summed = lam if isinstance(layer, nn.Linear) else lam.sum((-2, -1))
            lin = lin + summed.matmul(layer.bias)
        lam = _affine_t(layer, lam, shapes[i])
    flat = lam.flatten(2)
    lin = lin + flat.matmul(centre.flatten(1)[:, :, None]).squeeze(2)
    abs_ = abs_ + flat.abs().matmul(radius.flatten(1)[:, :, None]).squeeze(2)
    return lin, abs_


def _margins(layers, lam, relus, shapes, centre, radius):
    """U for the margin rows λ (B, C, C): _backward with each ReLU term's halves merged back
    into (−l)[ν]_+ and products summed elementwise, whose gradients cost less than batched
    matrix-vector products' in the pass that training differentiates."""
    bound = 0
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.ReLU):
            d, low = relus[i]
            lam = lam * d[:, None]
            bound = bound - (F.relu(lam) * low[:, None]).flatten(2).sum(2)
            continue
        if getattr(layer, "bias", None) is not None:
            summed = lam if isinstance(layer, nn.Linear) else lam.sum((-2, -1))
            bound = bound + summed.matmul(layer.bias)
        lam = _affine_t(layer, lam, shapes[i])
    return bound + (lam * centre[:, None]).flatten(2).sum(2) + (lam.abs() * radius[:, None]).flatten(2).sum(2)


def _relax_exact(layers, shapes, lo, hi):
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
                lin, abs_ = _backward(layers, i, rows, relus, shapes, centre, radius)
                parts.append((lin.expand(batch, -1), abs_.expand(batch, -1)))
            lin = torch.cat([p[0] for p in parts], 1).reshape(batch, *shape)
            abs_ = torch.cat([p[1] for p in parts], 1).reshape(batch, *shape)
        relus[i] = _relax(lin - abs_, lin + abs_)
    return relus


def _windowed(layers, stop, relus, shapes, centre, radius):
    """(lin, abs) (B, C, H, W) of every unit of a conv layer's output (layers[:stop] all Conv2d
    and ReLU): the backward pass of a unit only reaches its receptive field, so each unit's rows
    live on windows — translates of one another — instead of whole feature maps. The rows of the
    C units at one position start as the identity, shared by the batch and the positions."""
    channels, height, width = shapes[stop]
    batch = centre.shape[0]
    per_example = height * width * channels * max(torch.Size(s).numel() for s in shapes[:stop])
    step = max(1, CHUNK_FLOATS // per_example)
    parts = []
    for s in range(0, batch, step):
        relus_part = {j: (d[s : s + step], low[s : s + step]) for j, (d, low) in relus.items() if j < stop}
        parts.append(_windowed_part(layers, stop, relus_part, shapes, centre[s : s + step], radius[s : s + step]))
    lin = torch.cat([p[0] for p in parts])
    abs_ = torch.cat([p[1] for p in parts])
    return (t.transpose(1, 2).reshape(len(t), channels, height, width) for t in (lin, abs_))


def _windowed_part(layers, stop, relus, shapes, centre, radius):
    channels, height, width = shapes[stop]
    batch = centre.shape[0]
    eye = torch.eye(channels, dtype=centre.dtype, device=centre.device)
    lam = eye.reshape(1, 1, channels, channels, 1, 1)  # (batch, position, unit, *window)
    size, stride, pad = (1, 1), (1, 1), (0, 0)
    lin = abs_ = 0

    def windows(t):  # (b, c, H, W) → (b, positions, c, *size): the unfolded windows of a map
        right = [(n - 1) * st + sz - full - p for n, st, sz, full, p in zip((height, width), stride, size, t.shape[-2:], pad)]
        padded = F.pad(t, (pad[1], right[1], pad[0], right[0]))  # a negative pad crops what no window reaches
        unfolded = F.unfold(padded, size, stride=stride)
        return unfolded.transpose(1, 2).reshape(t.shape[0], -1, t.shape[1], *size)

    def dot(rows, values):  # Σ over each row's window of rows · values
        return rows.flatten(3).matmul(values.flatten(2)[..., None]).squeeze(-1)

    for j in range(stop - 1, -1, -1):
        layer = layers[j]
        if isinstance(layer, nn.ReLU):
            d, low = relus[j]
            lam = lam * windows(d)[:, :, None]
            low = windows(low)
            lin = lin - dot(lam, low) / 2
            abs_ = abs_ - dot(lam.abs(), low) / 2
            continue
        if layer.bias is not None:
            lin = lin + lam.sum((-2, -1)).matmul(layer.bias)
        k, st, pd, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        # Wᵀ from one window to the next as one matrix: a GEMM beats oneDNN's transposed conv on
        # many tiny images several times over
        inputs = lam.shape[3:]
        basis = torch.eye(torch.Size(inputs).numel(), dtype=lam.dtype, device=lam.device).reshape(-1, *inputs)
        window_t = F.conv_transpose2d(basis, layer.weight, stride=st, groups=layer.groups, dilation=dil)
        size = tuple((sz - 1) * s_ + dl * (kk - 1) + 1 for sz, s_, dl, kk in zip(size, st, dil, k))
        lam = lam.flatten(3).matmul(window_t.flatten(1)).reshape(*lam.shape[:3], layer.in_channels, *size)
        stride = tuple(a * c for a, c in zip(stride, st))
        pad = tuple(a * c + q for a, c, q in zip(pad, st, pd))
        if j > 0 and not isinstance(layers[j - 1], nn.ReLU):  # conv on conv: drop what falls on padding
            lam = lam * windows(torch.ones(1, *shapes[j], dtype=lam.dtype, device=lam.device))[:, :, None]
    lin = lin + dot(lam, windows(centre))
    abs_ = abs_ + dot(lam.abs(), windows(radius))
    return lin.expand(batch, height * width, channels), abs_.expand(batch, height * width, channels)


def _relax_projected(layers, shapes, lo, hi, k, generator):
    """Each ReLU's (d, l on I), its pre-activation bounds estimated by the library's projections."""
    batch = lo.shape[0]
    projection = _cauchy((1, k, *shapes[0]), lo, generator)
    centre = (hi + lo) / 2
    rows = torch.cat([projection * hi[:, None], projection * lo[:, None]], 1)
    groups = [(1.0, True), (-1.0, True)]  # per k-row group: (sign in abs, median estimate?)
    relus = {}
    last_relu = max((i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)), default=-1)
    for i, layer in enumerate(layers[: last_relu + 1]):
        if not isinstance(layer, nn.ReLU):
            centre, rows = layer(centre), _affine_rows(layer, rows)
            continue
        groups_rows = rows.split(k, 1)
        estimates = [_abs_median(g) if median else g.abs().sum(1) for g, (_, median) in zip(groups_rows, groups)]
        abs_ = sum(sign * e for (sign, _), e in zip(groups, estimates)) / 2
        d, low = _relax(centre - abs_, centre + abs_)
        relus[i] = (d, low)
        if i == last_relu:
            break
        scale = (low * d)[:, None]
        unstable = int((low < 0).sum())
        if unstable > k:  # draws on the unstable units only, as the library
            mask = (low < 0)[:, None].expand(batch, k, *shapes[i])
            new = torch.zeros(mask.shape, dtype=lo.dtype, device=lo.device).masked_scatter_(mask, _cauchy((unstable * k,), lo, generator)) * scale
        else:  # the library's exact rows: one per unstable unit, at most k per example
            flat = scale.flatten(2)[:, 0]
            first = min(k, flat.shape[1])
            index = (low.flatten(1) < 0).to(lo.dtype).topk(first, 1).indices
            one_hot = torch.zeros(batch, k, flat.shape[1], dtype=lo.dtype, device=lo.device)
            one_hot[:, :first].scatter_(2, index[:, :, None], 1.0)
            new = (one_hot * flat[:, None]).reshape(batch, k, *shapes[i])
        groups.append((1.0, unstable > k))
        centre = d * (centre - low / 2)
        rows = torch.cat([d[:, None] * rows, new], 1)
    return relus


def _cauchy(shape, like, generator):
    """Standard Cauchy draws as tan(π(U − ½)): the same law as Tensor.cauchy_, several times faster on CPU."""
    uniform = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return uniform.sub_(0.5).mul_(torch.pi).tan_()


def _abs_median(rows: torch.Tensor) -> torch.Tensor:
    """torch.median of |rows| over dim 1 (the lower median for even sizes)."""
    if rows.shape[1] > MEDIAN_NETWORK_MAX:
        return rows.abs().median(1).values
    return _NetworkAbsMedian.apply(rows)


class _NetworkAbsMedian(torch.autograd.Function):
    """The median by a pruned Batcher sorting network of elementwise min/max: an order of
    magnitude faster on CPU than torch.median's strided reduction. The gradient goes to the
    elements whose magnitude equals it (ties are zeros, whose sign passes no gradient)."""

    @staticmethod
    def forward(ctx, rows):
        magnitudes = rows.abs()
        size = rows.shape[1]
        wires = list(magnitudes.unbind(1))
        for a, b, want_min, want_max in _selection_network(size, (size - 1) // 2):
            low = torch.minimum(wires[a], wires[b]) if want_min else None
            high = torch.maximum(wires[a], wires[b]) if want_max else None
            wires[a], wires[b] = low, high
        median = wires[(size - 1) // 2]
        ctx.save_for_backward(rows.sign() * (magnitudes == median[:, None]))
        return median

    @staticmethod
    def backward(ctx, grad):
        (chosen,) = ctx.saved_tensors
        return chosen * grad[:, None]


@functools.cache
def _selection_network(size: int, rank: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Comparators (a, b, keep min on a?, keep max on b?) of Batcher's odd–even merge sort of
    `size` wires, pruned to those that the wire `rank` depends on."""
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
            kept.append((a, b, a in needed, b in needed))
            needed |= {a, b}
    return tuple(reversed(kept))


def _affine_rows(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The layer without its bias on rows (B, R, *shape), all in one call."""
    b, n = rows.shape[:2]
    if isinstance(layer, nn.Flatten):
        return rows.reshape(b, n, -1)
    if isinstance(layer, nn.Linear):
        return F.linear(rows, layer.weight)
    # channels-last in oneDNN's call only: its backward pass for many small images is several
    # times faster so, and the elementwise kernels that follow are faster on plain layouts
    images = rows.reshape(b * n, *rows.shape[2:]).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(images, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups).contiguous()
    return out.reshape(b, n, *out.shape[1:])
