"""MNIST-C (Mu & Gilmer 2019): the 15 corruptions of the benchmark, each at its single fixed severity.

Written from the published descriptions and the parameters of the published generator
(google-research/mnist-c). Every function takes a uint8 batch (N, 28, 28) and a numpy Generator and
returns a uint8 batch of the same shape; the ops work on x / 255 in [0, 1], as the generator does,
and round to the nearest integer at the end (the generator returns float32 in 0..255).

Where the generator has quirks that shape its images they are kept, so that accuracies stay
comparable with the published benchmark; each is named in a comment at the place it matters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import PixgenError, assets, data

# scipy.ndimage and skimage are imported by the functions that use them: every pixgen process
# imports this module through the CLI, and only `pixgen corrupt` needs them.

SIZE = 28
CENTRE = (SIZE - 1) / 2  # the generator's affine ops keep pixel coordinate 13.5 fixed
STAGE = "corrupt"


# ---------------------------------------------------------------- conversions and shared ops


def _unit(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian's defaults (edge-replicating border, truncate 4σ), per image."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma), mode="nearest", truncate=4.0)


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample each image of x (N, H, W) at its own float coordinates (N, H, W); zero outside."""
    n, h, w = x.shape
    # One ring of zeros, and indices clamped onto it, make every outside neighbour read zero.
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    batch = np.arange(n)[:, None, None]

    def at(r, c):
        return padded[batch, np.clip(r, -1, h).astype(np.intp) + 1, np.clip(c, -1, w).astype(np.intp) + 1]

    return (
        (1 - fr) * (1 - fc) * at(r0, c0)
        + (1 - fr) * fc * at(r0, c0 + 1)
        + fr * (1 - fc) * at(r0 + 1, c0)
        + fr * fc * at(r0 + 1, c0 + 1)
    )


def _warp(x: np.ndarray, inverse: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """Affine warp about the centre, as skimage.transform.warp with an inverse map (bilinear, zero fill).

    inverse (N, 2, 2) maps each output pixel's (col, row) offset from the centre to the input's;
    shift (N, 2) is added to the input (col, row).
    """
    grid_rows, grid_cols = np.mgrid[0:SIZE, 0:SIZE] - CENTRE
    if shift is None:
        shift = np.zeros((len(x), 2))
    a = inverse[:, :, :, None, None]
    cols = a[:, 0, 0] * grid_cols + a[:, 0, 1] * grid_rows + CENTRE + shift[:, 0, None, None]
    rows = a[:, 1, 0] * grid_cols + a[:, 1, 1] * grid_rows + CENTRE + shift[:, 1, None, None]
    return _bilinear(x, rows, cols)


def _signs(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=shape)


# ---------------------------------------------------------------- noise


def shot_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise: poisson(x * 3) / 3."""
    photons = 3.0
    return _to_uint8(rng.poisson(_unit(images) * photons) / photons)


def impulse_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: 17% of the pixels set to 0 or 1 with equal chance (skimage's 's&p')."""
    amount = 0.17
    x = _unit(images)
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return _to_uint8(np.where(hit, salt.astype(np.float64), x))


# ---------------------------------------------------------------- blurs


def glass_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian σ 0.7, two sweeps of random local pixel swaps, Gaussian σ 0.7 (severity 1).

    As in the generator: the first blur is truncated to uint8 before the swaps; the sweep visits
    rows and columns 27 down to 2; each pixel is swapped with probability 1/2 and its partner offset
    is drawn from {-1, 0}² (numpy's randint(-1, 1) excludes 1), so swaps only reach up and left.
    """
    sweeps, first, last = 2, SIZE - 1, 2
    x = np.floor(np.clip(_blur(_unit(images), 0.7), 0, 1) * 255.0)
    n = len(x)
    positions = np.arange(first, last - 1, -1)
    swap = rng.random((sweeps, len(positions), len(positions), n)) < 0.5
    offsets = rng.integers(-1, 1, size=(sweeps, len(positions), len(positions), n, 2))
    # A swap may move a pixel that an earlier swap of the sweep moved, so the sweep runs in order;
    # each step is vectorised over the batch.
    for s in range(sweeps):
        for i, h in enumerate(positions):
            for j, w in enumerate(positions):
                idx = np.flatnonzero(swap[s, i, j])
                dy, dx = offsets[s, i, j, idx, 0], offsets[s, i, j, idx, 1]
                here, there = x[idx, h, w], x[idx, h + dy, w + dx]
                x[idx, h, w], x[idx, h + dy, w + dx] = there, here
    return _to_uint8(_blur(x / 255.0, 0.7))


def _motion_kernel(radius: int, sigma: float) -> np.ndarray:
    """ImageMagick's motion-blur weights: one-sided Gaussian over 2·radius + 1 taps, normalised."""
    taps = np.arange(2 * radius + 1, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def motion_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick MotionBlurImage(radius 10, σ 3, angle ~ U(-45°, 45°)) (severity 1).

    Each output pixel is the weighted sum of the pixels at offsets round(i·(cos a, sin a)),
    i = 0..20, behind it along the angle; outside pixels repeat the edge (ImageMagick's default).
    """
    radius, sigma = 10, 3.0
    kernel = _motion_kernel(radius, sigma)
    angle = np.deg2rad(rng.uniform(-45.0, 45.0, size=len(images)))
    taps = np.arange(len(kernel))
    # ImageMagick rounds with ceil(v - 0.5).
    dx = np.ceil(taps[None, :] * np.cos(angle)[:, None] - 0.5).astype(np.intp)
    dy = np.ceil(taps[None, :] * np.sin(angle)[:, None] - 0.5).astype(np.intp)
    pad = len(kernel) - 1
    padded = np.pad(_unit(images), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + pad
    batch = np.arange(len(images))[:, None, None]
    out = np.zeros(images.shape)
    for i, weight in enumerate(kernel):
        out += weight * padded[batch, rows + dy[:, i, None, None], cols + dx[:, i, None, None]]
    return _to_uint8(out)


# ---------------------------------------------------------------- geometric


def shear(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Affine shear 0.4 with a random sign, about the centre (severity 2).

    The generator used skimage's AffineTransform(shear=s) of its time, whose inverse map is
    [[1, -sin s], [0, cos s]] on (col, row); newer skimage defines shear differently.
    """
    s = 0.4 * _signs(rng, len(images))
    inverse = np.zeros((len(images), 2, 2))
    inverse[:, 0, 0] = 1.0
    inverse[:, 0, 1] = -np.sin(s)
    inverse[:, 1, 1] = np.cos(s)
    return _to_uint8(_warp(_unit(images), inverse))


def scale(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit shrunk to 70% about the centre (severity 3); no randomness."""
    inverse = np.broadcast_to(np.eye(2) / 0.7, (len(images), 2, 2))
    return _to_uint8(_warp(_unit(images), inverse))


def rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by 0.4 rad with a random sign, about the centre (severity 2)."""
    a = 0.4 * _signs(rng, len(images))
    cos, sin = np.cos(a), np.sin(a)
    inverse = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)
    return _to_uint8(_warp(_unit(images), inverse))


def translate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by 3 px in x and in y, each with a random sign (severity 3), zero fill."""
    shift = 3.0 * _signs(rng, (len(images), 2))
    inverse = np.broadcast_to(np.eye(2), (len(images), 2, 2))
    return _to_uint8(_warp(_unit(images), inverse, shift))


# ---------------------------------------------------------------- intensity


def brightness(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HSV value + 0.5, clipped (severity 5).

    For a gray image the generator's gray→RGB→HSV→RGB→gray round trip is exactly clip(x + 0.5):
    saturation is 0, value is the gray level, and skimage's rgb2gray weights sum to 1.
    """
    return _to_uint8(_unit(images) + 0.5)


def stripe(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Columns 0-6 and 21-27 inverted."""
    out = np.array(images, dtype=np.uint8)
    out[:, :, :7] = 255 - out[:, :, :7]
    out[:, :, 21:] = 255 - out[:, :, 21:]
    return out


# ---------------------------------------------------------------- weather


def _noisy_mean(total: np.ndarray, wibble: float, rng: np.random.Generator) -> np.ndarray:
    # float32 draws are several times faster than float64 ones and the maps' precision does not
    # need more: even the finest level's noise (≈ 90) is far above float32's resolution there.
    noise = rng.random(total.shape, dtype=np.float32) * np.float32(2 * wibble) - np.float32(wibble)
    return total / 4 + np.float32(wibble) * noise


def _plasma(count: int, rng: np.random.Generator, size: int = 256, decay: float = 1.4) -> np.ndarray:
    """Diamond-square height maps (count, size, size) in [0, 1], wrapping at the edges.

    As in the generator, the random term at each step is wibble · U(-wibble, wibble), with wibble
    starting at 100 and divided by `decay` per level.
    """
    maps = np.zeros((count, size, size), dtype=np.float32)
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        square_sum = corners + np.roll(corners, -1, axis=1)
        square_sum = square_sum + np.roll(square_sum, -1, axis=2)
        maps[:, half::step, half::step] = _noisy_mean(square_sum, wibble, rng)
        centres = maps[:, half::step, half::step]
        top_edge = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = _noisy_mean(top_edge, wibble, rng)
        left_edge = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = _noisy_mean(left_edge, wibble, rng)
        step, wibble = half, wibble / decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def fog(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x + 3 · plasma fractal (decay 1.4), rescaled by max(x) / (max(x) + 3) (severity 5).

    The fractal is drawn at the generator's 256 × 256 and its top-left 28 × 28 used, so its
    normalisation (by the whole map's range) matches the generator's.
    """
    strength, block = 3.0, 64  # blocks bound the memory of the 256² maps
    x = _unit(images)
    out = np.empty_like(x)
    for start in range(0, len(x), block):
        part = x[start : start + block]
        peak = part.max(axis=(1, 2), keepdims=True)
        haze = _plasma(len(part), rng)[:, :SIZE, :SIZE]
        out[start : start + block] = (part + strength * haze) * peak / (peak + strength)
    return _to_uint8(out)


def spatter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mud spatter (severity 4): a liquid layer N(0.65, 0.3) blurred σ 1 and thresholded at 0.65;
    the mask blurred σ 1.5 and zeroed below 0.8; mud of 63/255 painted in through the mask."""
    mud = 63 / 255
    x = _unit(images)
    liquid = _blur(rng.normal(0.65, 0.3, size=x.shape), 1.0)
    mask = _blur((liquid > 0.65).astype(np.float64), 1.5)
    mask[mask < 0.8] = 0.0
    return _to_uint8(x * (1 - mask) + mud * mask)


# ---------------------------------------------------------------- drawn lines


def _line(c0, r0, c1, r1) -> np.ndarray:
    """The generator's anti-aliased line through (c0, r0) and (c1, r1), one image per endpoint set.

    Intensity falls with the vertical distance d from the line as 1 + log(1 - d / 2.3) (zero from
    d ≈ 1.45) and is drawn only in columns floor(c0) .. ceil(c1) - 1. Endpoints are arrays of one
    shape S (c0 < c1); returns (*S, 28, 28).
    """
    c0, r0, c1, r1 = (np.asarray(v, dtype=np.float64)[..., None, None] for v in (c0, r0, c1, r1))
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    distance = np.abs(rows - (r0 + (r1 - r0) / (c1 - c0) * (cols - c0)))
    # Clipping the log's argument at e⁻¹ (where the intensity reaches 0) keeps it away from log(0).
    intensity = 1 + np.log(np.clip(1 - distance / 2.3, np.exp(-1), 1))
    inside = (cols >= np.floor(c0)) & (cols < np.ceil(c1))
    return np.where(inside, intensity, 0.0)


def dotted_line(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A line from column 0 to column 27 between random rows 0-26, added with alternate 2-px
    segments removed (columns 2-3, 6-7, ... kept) and clipped; as in the generator, the line stops
    before column 27."""
    r0, r1 = rng.integers(0, SIZE - 1, size=(2, len(images)))
    line = _line(np.zeros(len(images)), r0, np.full(len(images), SIZE - 1), r1)
    kept = (np.arange(SIZE) // 2) % 2 == 1
    return _to_uint8(_unit(images) + line * kept)


def _zigzag_vertices(rise: int) -> np.ndarray:
    """(2, K) (col, row) vertices of the generator's zigzag from column 2 towards column 25 at a
    slope of rise / 23, starting at row 0: teeth of half-length 2 and amplitude 2 along the line,
    closed by the generator's odd last vertex (d, r / (2 (d - max_c)))."""
    half_tooth, amplitude, start, end = 2.0, 2.0, 2, 25
    theta = np.arctan(rise / (end - start))
    length = (end - start) / np.cos(theta)
    teeth = int((length - half_tooth) // (2 * half_tooth)) + 1
    along = [0.0] + [(2 * i + 1) * half_tooth for i in range(teeth)]
    across = [0.0] + [(-1) ** i * amplitude for i in range(teeth)]
    last_full = 2 * half_tooth * (length // (2 * half_tooth))
    if length != last_full:
        along.append(length)
        across.append(across[-1] / (2 * (length - last_full)))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return rotation @ np.array([along, across]) + np.array([[start], [0.0]])


def zigzag(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A zigzag (segment length 2, amplitude 2) from column 2 to 25, starting at a random row 0-26
    and ending -5..4 rows lower, added and clipped."""
    n = len(images)
    start = rng.integers(0, SIZE - 1, size=n)
    rise = rng.integers(-5, 5, size=n)
    pattern = np.zeros((n, SIZE, SIZE))
    # Images are grouped by their rise (ten values), because each rise gives its own vertex list.
    for value in np.unique(rise):
        members = np.flatnonzero(rise == value)
        cs, rs = _zigzag_vertices(int(value))
        for k in range(1, cs.size):
            pattern[members] += _line(cs[k - 1], rs[k - 1] + start[members], cs[k], rs[k] + start[members])
    # The generator clips after each segment; as every segment adds a non-negative amount,
    # clipping once at the end gives the same image.
    return _to_uint8(_unit(images) + pattern)


def canny_edges(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canny edge map (skimage, σ 1, hysteresis thresholds 0.1 and 0.2) × 255; no randomness."""
    from skimage import feature

    # skimage's canny takes a single 2-D image, so this loops over the batch.
    edges = [feature.canny(img, sigma=1.0, low_threshold=0.1, high_threshold=0.2) for img in _unit(images)]
    return np.stack(edges).astype(np.uint8) * 255


# ---------------------------------------------------------------- the benchmark as an asset

CORRUPTIONS = {
    fn.__name__: fn
    for fn in (
        shot_noise,
        impulse_noise,
        glass_blur,
        motion_blur,
        shear,
        scale,
        rotate,
        brightness,
        translate,
        stripe,
        fog,
        spatter,
        dotted_line,
        zigzag,
        canny_edges,
    )
}
NAMES = tuple(CORRUPTIONS)
AFFINE = ("shear", "scale", "rotate", "translate")  # those that overlap PixMix's own augmentations


@dataclasses.dataclass(frozen=True)
class CorruptConfig:
    """seed: randomness of every corruption; count: size of a fixed class-balanced subset of the
    dataset's test split (None: all of it); corruptions: which ones, in this order."""

    seed: int = 0
    count: int | None = None
    corruptions: tuple[str, ...] = NAMES
    dataset: str = "mnist"

    def __post_init__(self):
        unknown = [name for name in self.corruptions if name not in CORRUPTIONS]
        if unknown:
            raise PixgenError(f"unknown corruption {', '.join(unknown)}; choose from {', '.join(NAMES)}")
        if not self.corruptions or len(set(self.corruptions)) != len(self.corruptions):
            raise PixgenError("give each corruption once and at least one")
        if self.count is not None and self.count <= 0:
            raise PixgenError(f"count (--count) must be a positive number of test images, got {self.count}")
        if data.spec(self.dataset).shape != (1, SIZE, SIZE):
            raise PixgenError(f"the MNIST-C corruptions are defined for 1 × {SIZE} × {SIZE} images; {self.dataset} has {data.spec(self.dataset).shape}")


def corruption_rng(seed: int, name: str) -> np.random.Generator:
    """Each corruption's generator, keyed by its index in the benchmark's list (not in the
    config's), so a corruption's images do not depend on which others are made."""
    return np.random.default_rng(np.random.SeedSequence([seed, NAMES.index(name)]))


def corrupt(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """One corruption of a uint8 batch (N, 28, 28), seeded as in the asset."""
    return CORRUPTIONS[name](np.asarray(images, dtype=np.uint8), corruption_rng(seed, name))


def _test_subset(config: CorruptConfig, data_root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = data.load(config.dataset, "test", data_root)
    if config.count is not None and config.count > len(labels):
        raise PixgenError(f"count (--count) {config.count} exceeds the {len(labels)} {config.dataset} test images; leave it out to use them all")
    indices = data.balanced_subset(labels, config.count, config.seed)
    return images[indices], labels[indices], indices


def run(config: CorruptConfig, out: str | Path, data_root=None, force: bool = False) -> Path:
    """Write `<dataset>-c` as a "corrupt" asset: images (C, N, 28, 28) uint8, one corruption per chunk
    and unit; labels (N,) and indices (N,) into the test split; names in attrs["corruptions"]."""
    images, labels, indices = _test_subset(config, data_root)
    n, names = len(images), config.corruptions
    plan = assets.Plan(
        STAGE,
        config,
        arrays={
            "images": assets.ArraySpec((len(names), n, SIZE, SIZE), (1, n, SIZE, SIZE), "uint8", ("corruption", "sample", "y", "x")),
            "labels": assets.ArraySpec((n,), (n,), "int64", ("sample",)),
            "indices": assets.ArraySpec((n,), (n,), "int64", ("sample",)),
        },
        units=len(names),
        inputs={f"{config.dataset}-test": data.identity(images, labels)},
        attrs={"corruptions": list(names)},
    )

    def work(unit: int) -> assets.Writes:
        writes = {"images": (unit, corrupt(images, names[unit], config.seed))}
        if unit == 0:
            writes.update(labels=(slice(None), labels), indices=(slice(None), indices))
        return writes

    return assets.build(out, plan, work, force=force, unit_name="corruption")


def preview(asset: str | Path, png: str | Path, data_root=None, ncol: int = 12) -> Path:
    """A grid: the clean digits on the first row, then a row per corruption of the same digits."""
    from .grids import save_grid

    group = assets.open_asset(asset, STAGE)
    ncol = min(ncol, group["labels"].shape[0])
    clean, _ = data.load(group.attrs["config"].get("dataset", "mnist"), "test", data_root)
    rows = [clean[group["indices"][:ncol]]] + [group["images"][c, :ncol] for c in range(group["images"].shape[0])]
    return save_grid(np.concatenate(rows), png, ncol=ncol)
