"""The certify stage: per test digit and wrong class j, a lower bound on the margin
f_y(x+δ) − f_j(x+δ) over the ε-ball ∩ [0, 1] (ε in pixels, or stated in the network's input units
and × its normalisation's std), by one of the bounds of pixgen.bounds (dual, dual-opt, lp, ibp).
All bounds are computed in float64 (the LP and the α ascent would otherwise disagree at 1e-5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import PixgenError, assets, bounds, data, heap, models

METHODS = ("dual", "dual-opt", "lp", "ibp")
STEPS = 100  # dual-opt's default ascent steps: the remaining gap to the LP is measured in docs/commands.md ("pixgen certify")


@dataclass(frozen=True)
class CertifyConfig:
    eps: float
    method: str = "dual"
    count: int = 1000  # class-balanced MNIST test digits (data.balanced_subset with `seed`)
    seed: int = 0
    steps: int | None = None  # dual-opt only; None elsewhere, so it is no part of their identity
    chunk: int = 10  # digits per unit of work and per batch
    eps_units: str = "pixel"  # "input": eps is in the network's normalised input units, × its std in pixels


def resolve(config: CertifyConfig) -> CertifyConfig:
    if config.method == "dual-opt" and config.steps is None:
        return replace(config, steps=STEPS)
    return config


def validate(config: CertifyConfig) -> None:
    if config.method not in METHODS:
        raise PixgenError(f"unknown certify method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.eps_units not in models.EPS_UNITS:
        raise PixgenError(f"unknown ε units {config.eps_units!r}; choose one of {', '.join(models.EPS_UNITS)}")
    # An input-unit ε's upper limit depends on the network's std, so run checks it.
    if not 0 <= config.eps <= (1 if config.eps_units == "pixel" else float("inf")):
        raise PixgenError(f"--eps must be at least 0{' and at most 1 (pixel units)' if config.eps_units == 'pixel' else ''}, got {config.eps}")
    if config.count < 1 or config.chunk < 1:
        raise PixgenError(f"need count >= 1 and chunk >= 1, got {config.count}, {config.chunk}")
    if config.method != "dual-opt" and config.steps is not None:
        raise PixgenError(f"--steps applies to method dual-opt, not {config.method}; drop it")
    if config.method == "dual-opt" and config.steps < 1:
        raise PixgenError(f"--steps must be at least 1, got {config.steps}")


# ---- the certify stage ---------------------------------------------------------------------------


def bound_chunk(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, config: CertifyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) margin lower bounds of a chunk of digits by `config.method` (true class: +inf) and
    each digit's solve time: the LP's own time per digit plus an equal share of the dual pass;
    the batched methods' chunk time shared equally."""
    start = time.perf_counter()
    if config.method == "ibp":
        with torch.no_grad():
            margins = bounds.interval_margins(model, images, labels, config.eps)
        seconds = np.full(len(labels), (time.perf_counter() - start) / len(labels))
    else:
        with torch.no_grad():
            margins, relus = bounds.dual_pass(model, images, labels, config.eps)
        if config.method == "dual-opt":
            margins = bounds.optimise_slopes(model, images, labels, config.eps, relus, config.steps)
        seconds = np.full(len(labels), (time.perf_counter() - start) / len(labels))
        if config.method == "lp":
            affine = bounds.affine_matrices(model, bounds.input_shapes(model, images))
            x_lo, x_hi = ((images - config.eps).clamp(0, 1).flatten(1).numpy(), (images + config.eps).clamp(0, 1).flatten(1).numpy())
            rows = []
            for i, y in enumerate(labels.tolist()):
                begin = time.perf_counter()
                rows.append(bounds.lp_margins(affine, x_lo[i], x_hi[i], [(l[i].flatten().numpy(), u[i].flatten().numpy()) for l, u in relus], y))
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
    bounds.check_layers(model, config.method)
    eps_to_pixel = models.eps_to_pixel(model, config.eps_units)
    # The bounds run on `bounded`, the config with ε in pixels; the asset's identity stays `config`.
    bounded = replace(config, eps=config.eps * eps_to_pixel)
    if bounded.eps > 1:
        raise PixgenError(f"--eps {config.eps:g} in input units is {bounded.eps:g} in pixels (× the network's std {eps_to_pixel:g}), beyond the pixel range's 1; lower it")
    weights = models.weights_hash(model)
    model = model.double().requires_grad_(False)
    dataset = meta.get("dataset", "mnist")
    images, labels = data.load(dataset, "test", data_root)
    indices = data.balanced_subset(labels, config.count, config.seed)
    n, c, k = len(indices), config.chunk, model[-1].out_features
    plan = assets.Plan(
        "certify",
        config,
        arrays={
            "bounds": assets.ArraySpec((n, k), (c, k), "float64", ("sample", "class")),
            **{name: assets.ArraySpec((n,), (c,), dtype, ("sample",)) for name, dtype in (("certified", "bool"), ("seconds", "float64"), ("labels", "int64"), ("indices", "int64"))},
        },
        units=-(-n // c),
        inputs={"model": weights, f"{dataset}-test": data.identity(images, labels)},
        attrs={
            "model_arch": meta["arch"], "model_config_hash": meta["config_hash"], "true_class_bound": "+inf",
            "eps_units": config.eps_units, "eps_to_pixel": eps_to_pixel, "pixel_eps": bounded.eps,
            **({"lp_bound": "HiGHS's dual objective (a lower bound within its dual feasibility tolerance, 1e-7)"} if config.method == "lp" else {}),
        },  # fmt: skip
    )

    def work(unit: int) -> assets.Writes:
        span = slice(unit * c, min(n, (unit + 1) * c))
        x = torch.from_numpy(images[indices[span]]).to(torch.float64).div(255).unsqueeze(1)
        y = torch.from_numpy(labels[indices[span]])
        margins, seconds = bound_chunk(model, x, y, bounded)
        writes = {"bounds": margins, "certified": margins.min(1) > 0, "seconds": seconds, "labels": y.numpy(), "indices": indices[span]}
        return {name: (span, value) for name, value in writes.items()}

    def summary(group) -> dict:
        certified, seconds = group["certified"][:], group["seconds"][:]
        return {"certified_accuracy": float(certified.mean()), "certified_count": int(certified.sum()), "count": n, "seconds_per_digit": float(seconds.mean())}

    # The library's float64 dual pass frees and reallocates large tensors at every layer: `pixgen
    # certify --method dual` on 100 digits of a dual-trained wk-small faulted 3.9 million pages in
    # and took 14.8–16.6 s against 0.4 million and 7.1–10.9 s with freed memory kept (15 of 16 runs;
    # docs/benchmarks.md, 2 December).
    heap.keep_freed_memory()
    return assets.build(out, plan, work, force=force, summary=summary)
