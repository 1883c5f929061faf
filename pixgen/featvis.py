"""Feature visualisation: pictures that drive one channel of a trained MNIST network, by gradient
ascent on the input (Olah et al. 2017), as PixMix mixing pictures.

Each image is a spectrum in Fourier space, scaled by 1/f so that the low frequencies dominate, and
turned into pixels by an inverse FFT and a sigmoid; what the optimiser sees is a natural-image-like
parameterisation in which high-frequency noise is expensive. Every step also moves each image by
a small random shift, scale and rotation, so only features that survive being moved can grow.
A chunk of images is optimised as one batch, each image with its own (layer, channel) target; the
targets cycle over the channels of every convolution layer but the first.

The asset has `images` (N, S, S) uint8, and per image `layer` (the index in the network's
nn.Sequential of the activation maximised), `channel` and `objective` (that channel's mean
activation on the stored uint8 image).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError, assets, models, progress

NET_SIZE = 28  # the networks' input size
LEAK = 0.1  # ReLU leak while optimising, so that channels that start switched off can grow
INIT_SD = 0.5  # initial spectrum: pixel logits of standard deviation ≈ 0.8


@dataclass(frozen=True)
class FeatvisConfig:
    count: int = 1024
    seed: int = 0
    size: int = 28
    steps: int = 256
    lr: float = 0.1
    chunk: int = 128
    # Random transforms per step. Larger ones (±2 px, ±10%, ±10°) wash out the fine stripes the
    # second convolution layer wants, and the objectives stay lower.
    jitter: float = 1.0  # pixels at the network's 28×28 scale
    scale: float = 0.05  # relative
    rotate: float = 5.0  # degrees
    settle: float = 0.25  # fraction of the steps, at the end, without random transforms


def validate(config: FeatvisConfig) -> None:
    for name in ("count", "size", "steps", "chunk"):
        if getattr(config, name) < 1:
            raise PixgenError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise PixgenError(f"lr must be positive, got {config.lr}")


def conv_activations(model: nn.Sequential) -> list[int]:
    """Indices of the ReLUs whose input comes from a convolution (through BatchNorm, if any)."""
    found, after_conv = [], False
    for index, module in enumerate(model):
        if isinstance(module, nn.Conv2d):
            after_conv = True
        elif isinstance(module, nn.ReLU) and after_conv:
            found.append(index)
            after_conv = False
        elif not isinstance(module, nn.BatchNorm2d):
            after_conv = False
    return found


def targets(model: nn.Sequential) -> list[tuple[int, int]]:
    """Every (layer, channel) pair of the convolution layers but the first.

    The first convolution sees only a few pixels: its pictures are flat fields or stripes, and
    its channels that fire on MNIST's black background cannot be driven far above their mean.
    """
    pairs = []
    for layer in conv_activations(model)[1:]:
        conv = next(m for m in reversed(model[:layer]) if isinstance(m, nn.Conv2d))
        pairs += [(layer, channel) for channel in range(conv.out_channels)]
    return pairs


def objectives(model: nn.Sequential, images: torch.Tensor, layer: torch.Tensor, channel: torch.Tensor, leak: float = 0.0) -> torch.Tensor:
    """Mean activation of each image's own (layer, channel), shape (N,); `layer` indexes a ReLU.

    With `leak` > 0 the ReLU leaks, so that a channel that is off everywhere still has a gradient.
    """
    wanted = set((layer - 1).tolist())
    out = torch.zeros(len(images), device=images.device)
    h = images
    for index, module in enumerate(model):
        h = module(h)
        if index in wanted:
            means = F.leaky_relu(h, leak)
            means = means.flatten(2).mean(2) if means.ndim == 4 else means
            picked = means.gather(1, channel.clamp(max=means.shape[1] - 1)[:, None]).squeeze(1)
            out = torch.where(layer - 1 == index, picked, out)
            wanted.discard(index)
            if not wanted:
                break
    return out


def spectrum_scale(size: int) -> torch.Tensor:
    """1/f amplitude for the rfft2 grid of a size×size image, capped at the lowest frequency."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freq = torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / size)
    return 1.0 / (freq * size)  # 1 at the DC term, so a unit spectrum has O(1) pixels


def render(spectrum: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels in [0, 1], shape (N, 1, size, size), from the (N, 1, size, size//2+1, 2) spectrum."""
    coeffs = torch.view_as_complex(spectrum) * scale
    return torch.sigmoid(torch.fft.irfft2(coeffs, s=(size, size), norm="ortho") * size / 4)


def random_affine(images: torch.Tensor, config: FeatvisConfig, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted, scaled and rotated by its own small random amounts (black outside)."""
    n = len(images)

    def uniform(limit):
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(config.rotate))
    zoom = 1 + uniform(config.scale)
    shift = torch.stack([uniform(config.jitter), uniform(config.jitter)], 1) * 2 / NET_SIZE
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))


def visualise(model, layer, channel, config: FeatvisConfig, generator: torch.Generator, tick=lambda: None) -> np.ndarray:
    """Optimise one batch of images for their targets; uint8 (N, size, size)."""
    dev = next(model.parameters()).device
    scale = spectrum_scale(config.size).to(dev)
    # A start of visible 1/f clouds (not flat gray) sends images with the same target to
    # different optima.
    spectrum = (torch.randn(len(layer), 1, config.size, config.size // 2 + 1, 2, generator=generator) * INIT_SD).to(dev).requires_grad_()
    optimizer = torch.optim.Adam([spectrum], lr=config.lr)
    layer, channel = layer.to(dev), channel.to(dev)
    # The last steps go without transforms: what is stored and measured is the unmoved image.
    settle = config.steps - round(config.settle * config.steps)
    for step in range(config.steps):
        image = render(spectrum, scale, config.size)
        moved = random_affine(image, config, generator) if step < settle else image
        loss = -objectives(model, resize(moved, NET_SIZE), layer, channel, LEAK).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tick()
    with torch.no_grad():
        final = render(spectrum, scale, config.size)
    return (final[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def measure(model, images: np.ndarray, layer: torch.Tensor, channel: torch.Tensor) -> np.ndarray:
    """Objective of stored uint8 images, as the network sees them."""
    dev = next(model.parameters()).device
    x = resize(torch.from_numpy(images).float().div(255).unsqueeze(1).to(dev), NET_SIZE)
    return objectives(model, x, layer.to(dev), channel.to(dev)).cpu().numpy().astype(np.float32)


def run(config: FeatvisConfig, model_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write (or resume, or leave as it is if complete) the featvis asset `out` for a trained model."""
    validate(config)
    dev = models.device()
    model, meta = models.load(model_dir, map_location=dev)
    model.requires_grad_(False)
    pairs = targets(model)
    if not pairs:
        raise PixgenError(f"model {model_dir} ({meta['arch']}) has fewer than two convolution layers to visualise")
    n, s, c = config.count, config.size, config.chunk
    units = -(-n // c)
    todo = assets.prepare(
        out,
        stage="featvis",
        config=config,
        arrays={
            "images": assets.ArraySpec((n, s, s), (c, s, s), "uint8"),
            "layer": assets.ArraySpec((n,), (c,), "int16"),
            "channel": assets.ArraySpec((n,), (c,), "int16"),
            "objective": assets.ArraySpec((n,), (c,), "float32"),
        },
        units=units,
        inputs={"model": models.weights_hash(model)},
        attrs={"model_arch": meta["arch"], "model_config_hash": meta["config_hash"], "layers": {str(layer): repr(model[layer - 1]) for layer in sorted({p[0] for p in pairs})}},
        force=force,
    )
    if not todo:
        print(f"{out} is complete with this config; nothing to do", file=sys.stderr)
        return Path(out)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    with progress.bar(total=len(todo) * config.steps, desc="featvis", unit="step") as bar:
        for unit in todo:
            span = slice(unit * c, min(n, (unit + 1) * c))
            layer = torch.tensor([pairs[i % len(pairs)][0] for i in range(span.start, span.stop)])
            channel = torch.tensor([pairs[i % len(pairs)][1] for i in range(span.start, span.stop)])
            images = visualise(model, layer, channel, config, chunk_generator(config.seed, unit), lambda: bar.update())
            writes = {
                "images": (span, images),
                "layer": (span, layer.numpy().astype(np.int16)),
                "channel": (span, channel.numpy().astype(np.int16)),
                "objective": (span, measure(model, images, layer, channel)),
            }
            assets.write_unit(out, unit, writes)
    assets.finish(out)
    return Path(out)
