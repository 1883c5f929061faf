"""Bounds on a network's margins over the L∞ ball ∩ [0, 1]: the maths shared by certified training
(pixgen.methods) and the certify stage (pixgen.certify).

- `dual_logits` / `dual_certified`: Wong & Kolter's dual network (pixgen.dual, batched; the input
  set is [max(x−ε, 0), min(x+ε, 1)], tighter and still sound since every image lies in [0, 1]),
  exact, or estimated with Cauchy random projections for training; its ReLU relaxation uses the
  fixed slope α = u/(u−l) below each ambiguous unit. `dual_pass` computes the same bound through
  convex-adversarial's DualNetwork, whose intermediate bounds dual-opt and the LP start from.
- `optimise_slopes` (dual-opt): the same dual objective by back-substitution, with the lower
  slopes α ∈ [0, 1] of the ambiguous ReLUs (one per digit, class and unit) maximised by projected
  gradient ascent, as α-CROWN does. Every α gives a sound bound; the best seen is kept.
- `lp_margins`: the primal linear programme of the same relaxation, every ambiguous ReLU replaced
  by its triangle hull over [l, u], solved by HiGHS; the bound reported is HiGHS's dual objective
  (`lp_dual_objective`), valid within its dual feasibility tolerance. The intermediate bounds [l, u] of all three
  come from the one dual pass, so they relax the same set: weak duality gives dual ≤ dual-opt ≤
  lp, and with the α's at their optimum dual-opt reaches lp (strong duality of the LP).
- `interval_margins`: interval bounds (Gowal et al. 2018), the last linear layer folded into the
  margin (elision). Loosest on networks not trained for it (on an IBP-trained one it can beat the
  dual bound, whose intermediate bounds differ), but a few forward passes, so it can train.

A network's input normalisation (pixgen.models.Normalize) enters every bound as the equal 1×1
convolution (`boundable`): an exact affine layer, so each bound is the one of the same map, and
the ε-ball ∩ [0, 1] stays in pixels. It is not folded into the first convolution's weights:
that convolution pads the normalised map with 0 (a pixel of value `mean`), which a folded one,
padding the pixels with 0, would not reproduce. The LP composes the two as matrices, which carry
the padding exactly.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError, dual, models

BOUNDABLE = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten)
ASCENT_LR, ASCENT_DECAY = 0.5, 0.98  # Adam on α with exponential decay, α-CROWN's recipe
LP_SOLVERS = ("highs", "highs-ipm")  # tried in turn (see lp_margins)


def boundable(model: nn.Sequential) -> nn.Sequential:
    """`model` with its Normalize layers as the equal 1×1 convolutions, the layers shared."""
    if not any(isinstance(layer, models.Normalize) for layer in model):
        return model
    return nn.Sequential(*(layer.as_conv() if isinstance(layer, models.Normalize) else layer for layer in model))


def check_layers(model: nn.Sequential, method: str) -> None:
    """The dual methods and the LP take convex-adversarial's layers (BOUNDABLE); IBP also
    takes max-pooling, which is monotone, so it maps the interval's ends. BatchNorm is refused by
    all: convex-adversarial's fails on current torch, and in training mode it is not one affine
    map per digit."""
    allowed = BOUNDABLE + ((nn.MaxPool2d,) if method == "ibp" else ())
    model = boundable(model)
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
    model = boundable(model)
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


# ---- the dual network ---------------------------------------------------------------------------


def dual_logits(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float, projections: int = 0) -> torch.Tensor:
    """(B, K) upper bounds on z_j − z_y over the ε-ball ∩ [0, 1] (column y is 0): exact with
    projections=0, else the random-projection estimate used for training (pixgen.dual, equal to
    convex-adversarial's `RobustBounds(bounded_input=True)`, which tests/test_dual.py checks)."""
    return dual.bounds(boundable(model), images, labels, eps, projections)


@torch.no_grad()
def dual_certified(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 50) -> torch.Tensor:
    """Per digit, True where the exact bound proves every other class below the true one for all
    perturbations in the ε-ball ∩ [0, 1]."""
    model.eval()
    proved = []
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        bounds = dual_logits(model, images[s : s + batch_size], y, eps)
        others = bounds.scatter(1, y[:, None], -torch.inf)
        proved.append(others.max(1).values < 0)
    return torch.cat(proved)




def dual_pass(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, eps: float):
    """Wong & Kolter's exact bound: (B, K) margin lower bounds, and the pre-activation bounds
    [(l, u)] of every ReLU that the dual pass computed on the way, for dual-opt and the LP. Built
    here rather than through dual_logits because those intermediate bounds are needed."""
    from convex_adversarial import DualNetwork
    from convex_adversarial.dual_layers import DualReLU

    dual = DualNetwork(boundable(model), images, eps, bounded_input=True, norm_type="l1")
    margins = dual(margin_specs(labels, images.dtype))
    bounds = [(layer.zl, layer.zu) for layer in dual.dual_net if isinstance(layer, DualReLU)]
    return margins, bounds


def input_shapes(model: nn.Sequential, images: torch.Tensor) -> list[torch.Size]:
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
    for layer, shape in zip(reversed(boundable(model)), reversed(shapes)):
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
    shapes = input_shapes(model, images)
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
    """(sparse CSC matrix, bias vector) of the affine map before each ReLU and of the last one, in
    order, in float64: a convolution becomes the matrix of its action on the flattened (C, H, W)
    input, found by applying it to the identity, and affine layers with no ReLU between them (an
    input normalisation and the first convolution) are composed into one."""
    from scipy import sparse

    out, pending = [], None  # pending: the affine map since the last ReLU
    for layer, shape in zip(boundable(model), shapes):
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
            if isinstance(layer, nn.ReLU):
                out.append(pending)
                pending = None
            continue
        matrix = sparse.csc_matrix(matrix)
        pending = (matrix, bias) if pending is None else (sparse.csc_matrix(matrix @ pending[0]), matrix @ pending[1] + bias)
    return [*out, pending]


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
        margins[j] = lp_dual_objective(result, b_ub, b_eq, var_bounds) + bias[label] - bias[j]
    return margins


def lp_dual_objective(result, b_ub, b_eq, var_bounds: np.ndarray) -> float:
    """HiGHS's dual objective of a solved `linprog` minimisation, from its marginals (the duals of
    the inequality and equality rows and of the variables' bounds): by weak duality a lower bound
    on the LP's minimum for any dual-feasible point, so valid within HiGHS's dual feasibility
    tolerance, where the primal objective is only an upper bound on it within the primal one."""
    total = float(b_eq @ result.eqlin.marginals)
    if b_ub is not None:
        total += float(b_ub @ result.ineqlin.marginals)
    for bound, duals in ((var_bounds[:, 0], result.lower.marginals), (var_bounds[:, 1], result.upper.marginals)):
        # An infinite bound has a zero dual; skip it rather than make inf · 0.
        active = duals != 0
        total += float(bound[active] @ duals[active])
    return total
