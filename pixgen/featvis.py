"""Feature visualisation: pictures that drive one channel of a trained MNIST network, by gradient
ascent on the input (Olah et al. 2017), as PixMix mixing pictures.

Each image is a spectrum in Fourier space, scaled by 1/f so that the low frequencies dominate, and
turned into pixels by an inverse FFT and a sigmoid; what the optimiser sees is a natural-image-like
parameterisation in which high-frequency noise is expensive. Every step also moves each image by
a small random shift, scale and rotation, so only features that survive being moved can grow.
A chunk of images is optimised as one batch, each image with its own (layer, channel) target; the
targets cycle over the channels of every convolution layer but the first.

Every stored image must drive its target to at least `min_ratio` (5) times that channel's mean
activation over the dataset's 5,000 validation digits (one forward pass, computed here; test
digits are left to evaluation). After a chunk is
optimised, the images below that are optimised again from fresh initial spectra, drawn from the
chunk's generator in slot order (as fractals.make_chunk redraws degenerate pictures), so the
result still depends only on (seed, chunk). A slot whose target fails `attempts` times in a row
moves on to the next target of the cycle, so a channel that cannot reach the threshold costs a few
tries per slot but never blocks the run; only a threshold that no target reaches is an error.
On the `make data` network (wk-small, 3 epochs) that leaves channels 20, 21, 23, 25 and 30 of the
second convolution without images. They fire on MNIST's black background: a blank image alone
gives 41-100% of their mean (the median channel: 2%), so that mean is high and no picture
drives them past about 4.7x it. Their slots go to the channels after them (of 1,024 images,
channel 22 has 96, 24 and 31 have 64 each), and a few slots of the marginal channels 4 and 26
move on too.

The asset has `images` (N, S, S) uint8, and per image `layer` (the index in the network's
nn.Sequential of the activation maximised), `channel`, `objective` (that channel's mean
activation on the stored uint8 image) and `ratio` (objective / the channel's validation mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import PixgenError, assets, data, models, progress

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
    min_ratio: float = 5.0  # every image's objective / its channel's mean over the validation digits
    attempts: int = 3  # tries of one target per slot before the slot moves to the next target


def validate(config: FeatvisConfig) -> None:
    for name in ("count", "size", "steps", "chunk", "attempts"):
        if getattr(config, name) < 1:
            raise PixgenError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise PixgenError(f"lr must be positive, got {config.lr}")
    if not config.min_ratio >= 0:
        raise PixgenError(f"min_ratio must be at least 0, got {config.min_ratio}")


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


@torch.no_grad()
def channel_means(model, pairs: list[tuple[int, int]], digits: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Mean activation of every target over `digits` (uint8 (N, 28, 28)), float64 in `pairs` order."""
    dev = next(model.parameters()).device
    layers = {layer for layer, _ in pairs}
    sums = dict.fromkeys(layers, 0.0)
    for first in range(0, len(digits), batch):
        h = torch.tensor(digits[first : first + batch]).float().div(255).unsqueeze(1).to(dev)  # a copy: the split is read-only
        for index, module in enumerate(model[: max(layers) + 1]):
            h = module(h)
            if index in layers:
                sums[index] = sums[index] + h.flatten(2).mean(2).sum(0).double().cpu()
    return np.array([float(sums[layer][channel]) / len(digits) for layer, channel in pairs])


def ratios(objective: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """objective / mean; a channel that never fires on the digits (mean 0) gives inf if the image
    drives it at all and NaN (a failure) if not."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (objective / mean).astype(np.float32)


def make_chunk(model, pairs: list[tuple[int, int]], means: np.ndarray, config: FeatvisConfig, unit: int, bar) -> tuple[np.ndarray, ...]:
    """(images, layer, channel, objective, ratio) of one chunk, every image at >= min_ratio.

    Slots start on their place in the target cycle; those below min_ratio are optimised again,
    together, from fresh spectra drawn in slot order, and after `attempts` failures in a row a
    slot moves on to the next target.
    """
    start = unit * config.chunk
    count = min(config.chunk, config.count - start)
    generator = chunk_generator(config.seed, unit)
    target = (start + np.arange(count)) % len(pairs)  # index into pairs
    failures = np.zeros(count, np.int64)  # of the slot's current target
    moves = np.zeros(count, np.int64)
    images = np.empty((count, config.size, config.size), np.uint8)
    objective = np.empty(count, np.float32)
    pending = np.arange(count)
    while len(pending):
        layer = torch.tensor([pairs[t][0] for t in target[pending]])
        channel = torch.tensor([pairs[t][1] for t in target[pending]])
        images[pending] = visualise(model, layer, channel, config, generator, bar.update)
        objective[pending] = measure(model, images[pending], layer, channel)
        failed = pending[~(ratios(objective[pending], means[target[pending]]) >= config.min_ratio)]
        failures[failed] += 1
        exhausted = failed[failures[failed] >= config.attempts]
        target[exhausted] = (target[exhausted] + 1) % len(pairs)
        failures[exhausted] = 0
        moves[exhausted] += 1
        if (moves >= len(pairs)).any():
            raise PixgenError(
                f"no target channel reaches {config.min_ratio}x its mean over the validation digits in "
                f"{config.attempts} attempts each; lower --min-ratio or raise --steps"
            )
        pending = failed
        if len(pending):
            bar.total += config.steps  # the redraw is one more batch of steps
            bar.refresh()
    layer = np.array([pairs[t][0] for t in target], np.int16)
    channel = np.array([pairs[t][1] for t in target], np.int16)
    return images, layer, channel, objective, ratios(objective, means[target])


def run(config: FeatvisConfig, model_dir: str | Path, out: str | Path, data_root=None, force: bool = False) -> Path:
    """Write (or resume, or leave as it is if complete) the featvis asset `out` for a trained model."""
    validate(config)
    dev = models.device()
    model, meta = models.load(model_dir, map_location=dev)
    model.requires_grad_(False)
    pairs = targets(model)
    if not pairs:
        raise PixgenError(f"model {model_dir} ({meta['arch']}) has fewer than two convolution layers to visualise")
    dataset = meta.get("dataset", "mnist")
    digits, labels = data.load(dataset, "validation", data_root)
    n, s, c = config.count, config.size, config.chunk
    columns = ("images", "layer", "channel", "objective", "ratio")
    plan = assets.Plan(
        "featvis",
        config,
        arrays={
            "images": assets.ArraySpec((n, s, s), (c, s, s), "uint8", ("sample", "y", "x")),
            **{name: assets.ArraySpec((n,), (c,), dtype, ("sample",)) for name, dtype in zip(columns[1:], ("int16", "int16", "float32", "float32"))},
        },
        units=-(-n // c),
        inputs={"model": models.weights_hash(model), f"{dataset}-validation": data.identity(digits, labels)},
        attrs={"model_arch": meta["arch"], "model_config_hash": meta["config_hash"], "layers": {str(layer): repr(model[layer - 1]) for layer in sorted({p[0] for p in pairs})}},
    )
    means = channel_means(model, pairs, digits)
    with models.deterministic(dev), progress.bar(total=plan.units * config.steps, desc="featvis steps", unit="step") as steps:

        def work(unit: int) -> assets.Writes:
            span = slice(unit * c, min(n, (unit + 1) * c))
            return {name: (span, array) for name, array in zip(columns, make_chunk(model, pairs, means, config, unit, steps))}

        return assets.build(out, plan, work, force=force)
