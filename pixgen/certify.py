"""Certificates: lower bounds on the margin f_y(x+δ) − f_j(x+δ) over the ε-ball ∩ [0, 1], for
every wrong class j, by four methods, and interval bound propagation (IBP) as a training method.

- `dual`: Wong & Kolter's dual network (convex-adversarial, exact, `bounded_input=True`), whose
  ReLU relaxation uses the fixed slope α = u/(u−l) below each ambiguous unit.
- `dual-opt`: the same dual objective computed here by back-substitution, with the lower slopes
  α ∈ [0, 1] of the ambiguous ReLUs (one per digit, class and unit) maximised by projected
  gradient ascent, as α-CROWN does. Every α gives a sound bound; the best seen is kept.
- `lp`: the primal linear programme of the same relaxation, every ambiguous ReLU replaced by its
  triangle hull over [l, u], solved by HiGHS. The intermediate bounds [l, u] of all three come
  from the one dual pass, so they relax the same set: weak duality gives dual ≤ dual-opt ≤ lp,
  and with the α's at their optimum dual-opt reaches lp (strong duality of the LP).
- `ibp`: interval bounds (Gowal et al. 2018), the last linear layer folded into the margin
  (elision). Loosest on networks not trained for it (on an IBP-trained one it can beat `dual`,
  whose intermediate bounds differ), but a few forward passes, so it can train: `pixgen train --method ibp`.

All bounds are computed in float64 (the LP and the α ascent would otherwise disagree at 1e-5).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr
import torch.nn.functional as F
from torch import nn

from . import PixgenError, assets, data, models, progress, robust

METHODS = ("dual", "dual-opt", "lp", "ibp")
STEPS = 100  # dual-opt's default ascent steps: the remaining gap to the LP is measured in docs/commands.md ("pixgen certify")
ASCENT_LR, ASCENT_DECAY = 0.5, 0.98  # Adam on α with exponential decay, α-CROWN's recipe
# IBP training: the clean loss's weight κ falls from 1 to KAPPA over the ε ramp (Gowal et al.
# 2018: 0.5; CROWN-IBP's 0 costs clean accuracy), and training ε overshoots the certified ε by
# TRAIN_EPS_FACTOR (Gowal et al.), because a network trained exactly at ε certifies less at ε.
KAPPA = 0.5
TRAIN_EPS_FACTOR = 1.1
LP_SOLVERS = ("highs", "highs-ipm")  # tried in turn (see lp_margins)


@dataclass(frozen=True)
class CertifyConfig:
    eps: float
    method: str = "dual"
    count: int = 1000  # class-balanced MNIST test digits (data.balanced_subset with `seed`)
    seed: int = 0
    steps: int | None = None  # dual-opt only; None elsewhere, so it is no part of their identity
    chunk: int = 10  # digits per unit of work and per batch


def resolve(config: CertifyConfig) -> CertifyConfig:
    if config.method == "dual-opt" and config.steps is None:
        return replace(config, steps=STEPS)
    return config


def validate(config: CertifyConfig) -> None:
    if config.method not in METHODS:
        raise PixgenError(f"unknown certify method {config.method!r}; choose one of {', '.join(METHODS)}")
    if not 0 <= config.eps <= 1:
        raise PixgenError(f"--eps must lie in [0, 1] (pixel units), got {config.eps}")
    if config.count < 1 or config.chunk < 1:
        raise PixgenError(f"need count >= 1 and chunk >= 1, got {config.count}, {config.chunk}")
    if config.method != "dual-opt" and config.steps is not None:
        raise PixgenError(f"--steps applies to method dual-opt, not {config.method}; drop it")
    if config.method == "dual-opt" and config.steps < 1:
        raise PixgenError(f"--steps must be at least 1, got {config.steps}")


def check_layers(model: nn.Sequential, method: str) -> None:
    """The dual methods and the LP take convex-adversarial's layers (robust.BOUNDABLE); IBP also
    takes max-pooling, which is monotone, so it maps the interval's ends. BatchNorm is refused by
    all: convex-adversarial's fails on current torch, and in training mode it is not one affine
    map per digit."""
    allowed = robust.BOUNDABLE + ((nn.MaxPool2d,) if method == "ibp" else ())
    for layer in model:
        if not isinstance(layer, allowed):
            kinds = "Conv2d/Linear/ReLU/Flatten" + ("/MaxPool2d" if method == "ibp" else "")
            raise PixgenError(f"method {method} cannot bound the {type(layer).__name__} layer of this network; it takes {kinds} layers only")
    if not isinstance(model[-1], nn.Linear):
        raise PixgenError(f"method {method} needs a network whose last layer is Linear (the logits); this one ends in {type(model[-1]).__name__}")


def margin_specs(labels: torch.Tensor, dtype: torch.dtype, classes: int = 10) -> torch.Tensor:
    """(B, K, K): row j is e_y − e_j, so c·z is the margin z_y − z_j (row y is zero)."""
    eye = torch.eye(classes, dtype=dtype, device=labels.device)
    return eye[labels][:, None, :] - eye[None]


# ---- interval bounds ------------------------------------------------------------------------------


def interval_margins(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, K) lower bounds on z_y − z_j by interval propagation (column y is 0). Affine layers map
    the box's centre and radius (W c + b, |W| r); ReLU, max-pool and flatten are monotone and map
    its ends. The last layer enters through the margin's weights w_y − w_j (elision), which is
    tighter than subtracting the two logits' intervals."""
    lower, upper = (images - eps).clamp(0, 1), (images + eps).clamp(0, 1)
    for layer in model[:-1]:
        if isinstance(layer, nn.Linear):
            mid, rad = layer((upper + lower) / 2), F.linear((upper - lower) / 2, layer.weight.abs())
            lower, upper = mid - rad, mid + rad
        elif isinstance(layer, nn.Conv2d):
            rad = F.conv2d((upper - lower) / 2, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
            mid = layer((upper + lower) / 2)
            lower, upper = mid - rad, mid + rad
        else:
            lower, upper = layer(lower), layer(upper)
    last = model[-1]
    weight = last.weight[labels][:, None, :] - last.weight[None]
    bias = last.bias[labels][:, None] - last.bias[None]
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    return (weight @ mid[:, :, None]).squeeze(2) - (weight.abs() @ rad[:, :, None]).squeeze(2) + bias


@torch.no_grad()
def ibp_certified(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 500) -> torch.Tensor:
    """Per digit, True where interval bounds prove every other class below the true one."""
    model.eval()
    proved = []
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        margins = interval_margins(model, images[s : s + batch_size], y, eps)
        proved.append(margins.scatter(1, y[:, None], torch.inf).min(1).values > 0)
    return torch.cat(proved)


def ibp_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step):
    """κ·CE(clean logits) + (1 − κ)·CE(worst-case logits), the worst case from interval bounds at
    TRAIN_EPS_FACTOR × the ramped ε; κ ramps from 1 to KAPPA in step with ε. Returns the
    worst-case logits, so the training accuracy is the IBP-certified fraction."""
    eps = TRAIN_EPS_FACTOR * robust.current_eps(step)
    # The ε schedule of a ramp from 0 to 1 is the ramp's progress, so κ follows ε's own ramp.
    ramp = robust.current_eps(replace(step, config=replace(step.config, eps=1.0, eps_start=0.0)))
    kappa = 1 - (1 - KAPPA) * ramp
    worst = -interval_margins(model, images, labels, eps)
    return kappa * F.cross_entropy(model(images), labels) + (1 - kappa) * F.cross_entropy(worst, labels), worst


# ---- the dual network and its optimised slopes ---------------------------------------------------


def dual_pass(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float):
    """Wong & Kolter's exact bound: (B, K) margin lower bounds, and the pre-activation bounds
    [(l, u)] of every ReLU that the dual pass computed on the way, for dual-opt and the LP. Built
    here rather than through robust.bound_logits because those intermediate bounds are needed."""
    from convex_adversarial import DualNetwork
    from convex_adversarial.dual_layers import DualReLU

    dual = DualNetwork(model, images, eps, bounded_input=True, norm_type="l1")
    margins = dual(margin_specs(labels, images.dtype))
    bounds = [(layer.zl, layer.zu) for layer in dual.dual_net if isinstance(layer, DualReLU)]
    return margins, bounds


def _input_shapes(model: nn.Sequential, images: torch.Tensor) -> list[torch.Size]:
    shapes, z = [], images[:1]
    for layer in model:
        shapes.append(z.shape[1:])
        z = layer(z)
    return shapes


def backsubstitute(model, shapes, specs, x_lo, x_hi, bounds, alphas) -> torch.Tensor:
    """(B, K) lower bounds on specs·f(x) over the relaxation: the linear objective is carried back
    through the layers; at an ambiguous ReLU a positive coefficient takes the lower line α z and a
    negative one the upper line u (z − l)/(u − l); at the input the box [x_lo, x_hi] is minimised
    coordinate-wise. With α = u/(u − l) this is Wong & Kolter's dual objective."""
    lam = specs
    const = specs.new_zeros(specs.shape[:2])
    relus = list(zip(bounds, alphas))
    for layer, shape in zip(reversed(model), reversed(shapes)):
        if isinstance(layer, nn.Linear):
            const = const + lam @ layer.bias
            lam = lam @ layer.weight
        elif isinstance(layer, nn.Conv2d):
            const = const + lam.sum((-2, -1)) @ layer.bias
            flat = lam.flatten(0, 1)
            h, w = flat.shape[-2:]
            natural = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in zip((h, w), layer.stride, layer.padding, layer.dilation, layer.kernel_size)]
            pad = tuple(want - got for want, got in zip(shape[-2:], natural))
            flat = F.conv_transpose2d(flat, layer.weight, None, layer.stride, layer.padding, pad, layer.groups, layer.dilation)
            lam = flat.view(*lam.shape[:2], *shape)
        elif isinstance(layer, nn.Flatten):
            lam = lam.reshape(*lam.shape[:2], *shape)
        else:  # ReLU
            (lower, upper), alpha = relus.pop()
            lower, upper = lower[:, None], upper[:, None]
            ambiguous = (lower < 0) & (upper > 0)
            # The clamp keeps units with l = u (pinned by the bounds) from making 0/0 in the unused branch.
            slope = torch.where(ambiguous, upper / (upper - lower).clamp(min=1e-12), (lower >= 0).to(lam.dtype))
            below = torch.where(ambiguous, alpha, slope)
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const - (neg * torch.where(ambiguous, slope * lower, 0)).flatten(2).sum(2)
            lam = pos * below + neg * slope
    pos, neg = lam.clamp(min=0).flatten(2), lam.clamp(max=0).flatten(2)
    return const + (pos * x_lo.flatten(1)[:, None]).sum(2) + (neg * x_hi.flatten(1)[:, None]).sum(2)


def optimise_slopes(model, images, labels, eps, bounds, steps: int) -> torch.Tensor:
    """(B, K) dual bounds with the ambiguous ReLUs' lower slopes maximised by projected gradient
    ascent (Adam, α clipped to [0, 1] after each step), intermediate bounds held fixed; the best
    bound seen per (digit, class) is kept, since every α in [0, 1] gives a sound one."""
    shapes = _input_shapes(model, images)
    specs = margin_specs(labels, images.dtype)
    x_lo, x_hi = (images - eps).clamp(0, 1), (images + eps).clamp(0, 1)
    alphas = [(u / (u - l).clamp(min=1e-12)).clamp(0, 1)[:, None].expand(-1, specs.shape[1], *l.shape[1:]).clone().requires_grad_() for l, u in bounds]
    optimiser = torch.optim.Adam(alphas, lr=ASCENT_LR)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, ASCENT_DECAY)
    best = None
    for step in range(steps + 1):
        margins = backsubstitute(model, shapes, specs, x_lo, x_hi, bounds, alphas)
        best = margins.detach() if best is None else torch.maximum(best, margins.detach())
        if step == steps:
            return best
        optimiser.zero_grad(set_to_none=True)
        (-margins.sum()).backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            for alpha in alphas:
                alpha.clamp_(0, 1)


# ---- the primal LP -------------------------------------------------------------------------------


def affine_matrices(model: nn.Sequential, shapes) -> list[tuple]:
    """(sparse CSC matrix, bias vector) of every Conv2d/Linear in order, in float64; a convolution
    becomes the matrix of its action on the flattened (C, H, W) input, found by applying it to the
    identity."""
    from scipy import sparse

    out = []
    for layer, shape in zip(model, shapes):
        if isinstance(layer, nn.Linear):
            matrix, bias = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        elif isinstance(layer, nn.Conv2d):
            n = int(np.prod(shape))
            basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
            weight = layer.weight.detach().double()
            columns = F.conv2d(basis, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            matrix = columns.reshape(n, -1).T.numpy()
            bias = layer.bias.detach().double()[:, None].expand(-1, columns[0, 0].numel()).reshape(-1).numpy()
        else:
            continue
        out.append((sparse.csc_matrix(matrix), bias))
    return out


def lp_margins(affine, x_lo: np.ndarray, x_hi: np.ndarray, bounds, label: int) -> np.ndarray:
    """(K,) LP lower bounds on z_y − z_j for one digit: variables are the pixels, and for every ReLU
    its active and ambiguous pre-activations z (inactive ones are 0 and dropped) and the outputs a
    of its ambiguous units, with a ≥ 0, a ≥ z, a ≤ u (z − l)/(u − l), the [l, u] from the dual pass.
    Those bounds are implied by the relaxation of the earlier layers, so they are not added as
    variable bounds: on nets with nearly fixed units (width 1e-12) they left HiGHS, within its
    tolerances, no feasible point. One constraint matrix serves all K objectives."""
    from scipy import sparse
    from scipy.optimize import linprog

    lo, hi = [x_lo], [x_hi]
    columns = np.arange(len(x_lo))  # LP column of each unit of the current activation; −1: constant 0
    n_vars = len(x_lo)
    eq, eq_rhs, ub, ub_rhs = [], [], [], []
    n_eq = n_ub = 0
    for (matrix, bias), (lower, upper) in zip(affine[:-1], bounds):
        live = columns >= 0
        kept = np.flatnonzero(upper > 0)  # pre-activations that can be positive
        block = matrix[:, live][kept].tocoo()
        z = n_vars + np.arange(len(kept))
        n_vars += len(kept)
        rows = n_eq + np.arange(len(kept))
        # z − W a = b
        eq.append((np.concatenate([rows, n_eq + block.row]), np.concatenate([z, columns[live][block.col]]), np.concatenate([np.ones(len(kept)), -block.data])))
        eq_rhs.append(bias[kept])
        n_eq += len(kept)
        lo.append(np.full(len(kept), -np.inf))
        hi.append(np.full(len(kept), np.inf))
        l, u = lower[kept], upper[kept]
        ambiguous = np.flatnonzero(l < 0)
        a = n_vars + np.arange(len(ambiguous))
        n_vars += len(ambiguous)
        slope = u[ambiguous] / (u[ambiguous] - l[ambiguous])
        r1 = n_ub + np.arange(len(ambiguous))
        r2 = r1 + len(ambiguous)
        # z − a ≤ 0 and a − s z ≤ −s l
        ub.append((np.concatenate([r1, r1, r2, r2]), np.concatenate([z[ambiguous], a, a, z[ambiguous]]), np.concatenate([np.ones_like(slope), -np.ones_like(slope), np.ones_like(slope), -slope])))
        ub_rhs.append(np.concatenate([np.zeros_like(slope), -slope * l[ambiguous]]))
        n_ub += 2 * len(ambiguous)
        lo.append(np.zeros(len(ambiguous)))
        hi.append(np.full(len(ambiguous), np.inf))
        columns = np.full(len(lower), -1)
        columns[kept] = z
        columns[kept[ambiguous]] = a

    def stack(parts, n_rows):
        rows, cols, vals = (np.concatenate(p) for p in zip(*parts))
        return sparse.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_vars))

    a_eq, a_ub = stack(eq, n_eq), stack(ub, n_ub) if n_ub else None
    b_eq, b_ub = np.concatenate(eq_rhs), np.concatenate(ub_rhs) if n_ub else None
    var_bounds = np.column_stack([np.concatenate(lo), np.concatenate(hi)])
    matrix, bias = affine[-1]
    live = columns >= 0
    logits = matrix[:, live].toarray()
    margins = np.zeros(len(bias))
    for j in range(len(bias)):
        if j == label:
            continue
        cost = np.zeros(n_vars)
        cost[columns[live]] = logits[label] - logits[j]
        # HiGHS's simplex now and then stalls on the thin feasible sets of nets with many nearly
        # fixed units (IBP-trained ones); its interior-point solver, with crossover, gets through.
        for solver in LP_SOLVERS:
            result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=var_bounds, method=solver)
            if result.status == 0:
                break
        else:
            raise PixgenError(f"HiGHS did not solve the LP of class {j} (status {result.status}: {result.message})")
        margins[j] = result.fun + bias[label] - bias[j]
    return margins


# ---- the certify stage ---------------------------------------------------------------------------


def bound_chunk(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, config: CertifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) margin lower bounds of a chunk of digits by `config.method` (true class: +inf) and
    each digit's solve time: the LP's own time per digit plus an equal share of the dual pass;
    the batched methods' chunk time shared equally."""
    start = time.perf_counter()
    if config.method == "ibp":
        with torch.no_grad():
            margins = interval_margins(model, images, labels, config.eps)
        seconds = np.full(len(labels), (time.perf_counter() - start) / len(labels))
    else:
        with torch.no_grad():
            margins, bounds = dual_pass(model, images, labels, config.eps)
        if config.method == "dual-opt":
            margins = optimise_slopes(model, images, labels, config.eps, bounds, config.steps)
        seconds = np.full(len(labels), (time.perf_counter() - start) / len(labels))
        if config.method == "lp":
            affine = affine_matrices(model, _input_shapes(model, images))
            x_lo, x_hi = ((images - config.eps).clamp(0, 1).flatten(1).numpy(), (images + config.eps).clamp(0, 1).flatten(1).numpy())
            rows = []
            for i, y in enumerate(labels.tolist()):
                begin = time.perf_counter()
                rows.append(lp_margins(affine, x_lo[i], x_hi[i], [(l[i].flatten().numpy(), u[i].flatten().numpy()) for l, u in bounds], y))
                seconds[i] += time.perf_counter() - begin
            margins = torch.from_numpy(np.stack(rows))
    margins = margins.detach().scatter(1, labels[:, None], torch.inf)
    return margins.numpy(), seconds


def run(config: CertifyConfig, model_dir: str | Path, out: str | Path, data_root=None, force: bool = False) -> Path:
    """Write (or resume, or leave as it is if complete) the certify asset `out`: bounds (N, K)
    float64, certified (N,) bool, seconds (N,), labels (N,), indices (N,) into the test split."""
    config = resolve(config)
    validate(config)
    model, meta = models.load(model_dir)
    check_layers(model, config.method)
    weights = models.weights_hash(model)
    model = model.double().requires_grad_(False)
    images, labels = data.load("mnist", "test", data_root)
    indices = data.balanced_subset(labels, config.count, config.seed)
    n, c, k = len(indices), config.chunk, model[-1].out_features
    todo = assets.prepare(
        out,
        stage="certify",
        config=config,
        arrays={
            "bounds": assets.ArraySpec((n, k), (c, k), "float64"),
            "certified": assets.ArraySpec((n,), (c,), "bool"),
            "seconds": assets.ArraySpec((n,), (c,), "float64"),
            "labels": assets.ArraySpec((n,), (c,), "int64"),
            "indices": assets.ArraySpec((n,), (c,), "int64"),
        },
        units=-(-n // c),
        inputs={"model": weights, "mnist_test": data.identity(images, labels)},
        attrs={"model_arch": meta["arch"], "model_config_hash": meta["config_hash"], "true_class_bound": "+inf"},
        force=force,
    )
    if not todo:  # finished, or killed between its last unit and `finish`: finishing again is harmless
        print(f"{out} has every unit done with this config; nothing to compute", file=sys.stderr)
    for unit in progress.bar(todo, desc=f"certify {config.method}", unit="chunk"):
        span = slice(unit * c, min(n, (unit + 1) * c))
        x = torch.from_numpy(images[indices[span]]).to(torch.float64).div(255).unsqueeze(1)
        y = torch.from_numpy(labels[indices[span]])
        bounds, seconds = bound_chunk(model, x, y, config)
        writes = {"bounds": bounds, "certified": bounds.min(1) > 0, "seconds": seconds, "labels": y.numpy(), "indices": indices[span]}
        assets.write_unit(out, unit, {name: (span, value) for name, value in writes.items()})
    group = zarr.open_group(str(out), mode="r")
    certified, seconds = group["certified"][:], group["seconds"][:]
    assets.finish(out, {"certified_accuracy": float(certified.mean()), "certified_count": int(certified.sum()), "count": n, "seconds_per_digit": float(seconds.mean())})
    return Path(out)
