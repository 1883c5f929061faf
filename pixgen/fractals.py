"""The fractal mixing set: random iterated function systems (IFS) rendered by the chaos game.

Sampling follows Anderson & Farrell (WACV 2022): N in {2, 3, 4} affine maps
w_i(p) = A_i p + b_i with A_i = R(theta) diag(s1, s2) R(phi) D, the singular values drawn so that
the sigma-factor sum_i (s_i1 + 2 s_i2) equals alpha ~ U((5+N)/2, (6+N)/2), translations
b_i ~ U(-1, 1), and map i picked with probability proportional to |det A_i|.

One Numba kernel plays the chaos game and bins each point as it is made (no coordinate array),
at `oversample` times the output size, over a bounding box fixed by a short probe run; it then
scales the hit counts to gray levels by log(1 + hits) / log(1 + max hits) and area-averages
blocks of oversample x oversample to the output size. The chaos game's own random stream
(xorshift64*) starts from a constant, so a stored system alone regenerates its image.

Degenerate pictures (almost empty, a line, a filled blob) are rejected and their slots drawn
again from the chunk's generator, in slot order, so the result depends only on (seed, chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from . import PixgenError, assets
from .config import from_dict

STAGE = "fractals"
MAX_MAPS = 4

# Chaos-game tuning, fixed rather than configurable: changing any of them changes the bytes.
PROBE_POINTS = 4096  # a short run whose extent, widened by MARGIN, is the rendered window
MARGIN = 0.04
CHAOS_SEED = 0x9E3779B97F4A7C15  # any nonzero constant; xorshift must not start at 0
XORSHIFT_MULT = 0x2545F4914F6CDD1D

# Degeneracy rule, on the final uint8 image: "lit" pixels are those at >= 1/8 of full scale.
LIT_LEVEL = 32
MIN_COVERAGE = 0.08  # fewer lit pixels: an almost empty picture or a short line
MAX_COVERAGE = 0.60  # more: a filled blob
MIN_SPREAD = 0.25  # minor/major axis ratio of the lit pixels' spread: below it, a line


@dataclass(frozen=True)
class FractalConfig:
    """Everything that changes the bytes of a fractal asset (the worker count does not)."""

    count: int = 10_000
    size: int = 28
    seed: int = 0
    points: int = 100_000
    oversample: int = 4
    chunk: int = 256

    def __post_init__(self):
        checks = [
            (self.count >= 1, f"count must be at least 1, got {self.count}"),
            (self.size >= 8, f"size must be at least 8 pixels, got {self.size}"),
            (self.points >= 1000, f"points must be at least 1000, got {self.points}"),
            (self.oversample >= 1, f"oversample must be at least 1, got {self.oversample}"),
            (self.chunk >= 1, f"chunk must be at least 1, got {self.chunk}"),
            (self.seed >= 0, f"seed must be non-negative, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PixgenError(message)

    @property
    def units(self) -> int:
        return -(-self.count // self.chunk)


# ---------------------------------------------------------------------------------------------
# Sampling IFS codes (vectorised over a batch of systems; numpy Generator, fully seeded)


def sample_singular_values(rng: np.random.Generator, nmaps: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(count, 4, 2) singular values with 1 >= s1 >= s2 >= 0 and sum(s1 + 2 s2) = alpha per row.

    Pairs are drawn one at a time, each uniformly within the bounds that still let the pairs after
    it (at most 3 each) reach the remaining budget exactly; the last pair takes what is left.
    Unused pairs (index >= nmaps) are zero.
    """
    count = len(nmaps)
    sv = np.zeros((count, MAX_MAPS, 2))
    budget = alpha.astype(float).copy()
    for j in range(MAX_MAPS):
        # One draw per row and quantity even for rows that are done, so rows never shift streams.
        u1, u2, u_last = rng.random((3, count))
        after = nmaps - 1 - j
        s1 = _between(u1, np.clip((budget - 3 * after) / 3, 0, 1), np.minimum(1, budget))
        s2 = _between(u2, np.maximum(0, (budget - 3 * after - s1) / 2), np.minimum(s1, (budget - s1) / 2))
        last = after == 0
        s2 = np.where(last, _between(u_last, np.maximum(0, (budget - 1) / 2), budget / 3), s2)
        s1 = np.where(last, budget - 2 * s2, s1)
        used = after >= 0
        sv[used, j, 0], sv[used, j, 1] = s1[used], s2[used]
        budget = np.where(used, budget - s1 - 2 * s2, budget)
    return sv


def _between(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo + u * (hi - lo)


def _rotations(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def sample_systems(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` random IFS codes: maps (count, 4, 2, 3) as [A | b] (unused maps zero), nmaps (count,)."""
    nmaps = rng.integers(2, MAX_MAPS + 1, count)
    alpha = rng.uniform((5 + nmaps) / 2, (6 + nmaps) / 2)
    sv = sample_singular_values(rng, nmaps, alpha)
    theta = rng.uniform(-np.pi, np.pi, (count, MAX_MAPS))
    phi = rng.uniform(-np.pi, np.pi, (count, MAX_MAPS))
    flips = rng.choice([-1.0, 1.0], (count, MAX_MAPS, 2))
    shift = rng.uniform(-1, 1, (count, MAX_MAPS, 2))
    # R(theta) diag(s) R(phi) D: scaling rows of R(phi) by s, columns by the flips D.
    linear = _rotations(theta) @ (sv[..., :, None] * _rotations(phi)) * flips[..., None, :]
    maps = np.concatenate([linear, shift[..., None]], axis=-1)
    maps[np.arange(MAX_MAPS)[None, :] >= nmaps[:, None]] = 0
    return maps, nmaps.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The chaos game and renderer (Numba)


@njit(inline="always")
def _xorshift(state):
    state ^= state >> np.uint64(12)
    state ^= state << np.uint64(25)
    state ^= state >> np.uint64(27)
    return state


@njit(cache=True)
def _thresholds(maps, nmaps):
    """32-bit cumulative-probability thresholds; map k is chosen by counting thresholds <= r.

    Thresholds of maps past `nmaps` are 2**32, which no 32-bit draw reaches.
    """
    dets = np.zeros(MAX_MAPS)
    for k in range(nmaps):
        dets[k] = abs(maps[k, 0, 0] * maps[k, 1, 1] - maps[k, 0, 1] * maps[k, 1, 0])
    total = dets.sum()
    if total == 0:  # every map singular (never sampled, but a hand-made code may be): equal odds
        dets[:nmaps] = 1.0
        total = nmaps
    limits = np.full(MAX_MAPS - 1, np.uint64(1) << np.uint64(32))
    acc = 0.0
    for k in range(nmaps - 1):
        acc += dets[k]
        limits[k] = np.uint64(acc / total * 4294967296.0)
    return limits


@njit(cache=True)
def _fixed_point(maps):
    """Fixed point of w_1, solving (I - A) p = b: it lies on the attractor, so no transient."""
    a, b, e = maps[0, 0, 0], maps[0, 0, 1], maps[0, 0, 2]
    c, d, f = maps[0, 1, 0], maps[0, 1, 1], maps[0, 1, 2]
    det = (1 - a) * (1 - d) - b * c
    return ((1 - d) * e + b * f) / det, ((1 - a) * f + c * e) / det


@njit(inline="always")
def _pick(state, limits):
    """Next xorshift64* state and the map index its top 32 bits select (branch-free)."""
    state = _xorshift(state)
    r = (state * np.uint64(XORSHIFT_MULT)) >> np.uint64(32)
    return state, (r >= limits[0]) + (r >= limits[1]) + (r >= limits[2])


@njit(cache=True)
def _probe(maps, limits, x, y, state):
    """Run PROBE_POINTS steps; return the square window (left, top, span) around them, widened by
    MARGIN and keeping the aspect ratio (so lines stay lines), and the walk's state to go on from."""
    xmin, xmax, ymin, ymax = x, x, y, y
    for _ in range(PROBE_POINTS):
        state, k = _pick(state, limits)
        x, y = maps[k, 0, 0] * x + maps[k, 0, 1] * y + maps[k, 0, 2], maps[k, 1, 0] * x + maps[k, 1, 1] * y + maps[k, 1, 2]
        xmin, xmax = min(xmin, x), max(xmax, x)
        ymin, ymax = min(ymin, y), max(ymax, y)
    span = max(xmax - xmin, ymax - ymin, 1e-9) * (1 + 2 * MARGIN)
    return (xmin + xmax - span) / 2, (ymin + ymax - span) / 2, span, x, y, state


@njit(cache=True)
def _pixel_maps(maps, left, top, scale, offset):
    """The maps conjugated by p -> (p - corner) * scale + offset, as float32 rows a, b, c, d, e, f.

    Iterating in pixel units saves the per-point transform; the +offset (one image width) keeps
    in-window points positive, so truncation to int is floor and one unsigned compare per axis
    rejects points on either side.
    """
    coef = np.zeros((6, MAX_MAPS), np.float32)
    for k in range(MAX_MAPS):
        a, b, e = maps[k, 0, 0], maps[k, 0, 1], maps[k, 0, 2]
        c, d, f = maps[k, 1, 0], maps[k, 1, 1], maps[k, 1, 2]
        coef[0, k], coef[1, k], coef[2, k], coef[3, k] = a, b, c, d
        coef[4, k] = scale * (a * left + b * top + e - left) + offset * (1 - a - b)
        coef[5, k] = scale * (c * left + d * top + f - top) + offset * (1 - c - d)
    return coef


@njit(cache=True, fastmath=True)
def _chaos_game(coef, limits, x, y, state, points, fine):
    """Hit counts (fine * fine,) of `points` steps of the walk in pixel space."""
    a, b, c, d, e, f = coef[0], coef[1], coef[2], coef[3], coef[4], coef[5]
    hits = np.zeros(fine * fine, np.int32)
    width = np.uint32(fine)
    for _ in range(points):
        state, k = _pick(state, limits)
        x, y = a[k] * x + b[k] * y + e[k], c[k] * x + d[k] * y + f[k]
        col = np.uint32(np.int32(x)) - width
        row = np.uint32(np.int32(y)) - width
        if col < width and row < width:
            hits[row * width + col] += 1
    return hits


@njit(cache=True)
def render_one(maps, nmaps, points, size, oversample, out):
    """Chaos game of one IFS code (4, 2, 3), binned as it runs at size*oversample, into `out` (size, size).

    The walk is float32 and fastmath (reassociation, FMA): both are the same on every call on a
    machine, so bytes never depend on the worker count; float32 is ample at a few hundred pixels.
    """
    fine = size * oversample
    limits = _thresholds(maps, nmaps)
    x, y = _fixed_point(maps)
    left, top, span, x, y, state = _probe(maps, limits, x, y, np.uint64(CHAOS_SEED))
    scale = fine / span
    coef = _pixel_maps(maps, left, top, scale, fine)
    start_x = np.float32((x - left) * scale + fine)
    start_y = np.float32((y - top) * scale + fine)
    hits = _chaos_game(coef, limits, start_x, start_y, state, points, fine)
    _tone_and_downsample(hits.reshape(fine, fine), size, oversample, out)


# log1p of small hit counts, looked up: most pixels hold few hits, and log1p per pixel is a tenth
# of the whole kernel's time otherwise.
LOG1P_TABLE = np.log1p(np.arange(4096, dtype=np.float64))


@njit(cache=True, fastmath=True)
def _tone_and_downsample(hits, size, oversample, out):
    """Log gray levels at the fine size, then an area average down to `size`, full scale 255.

    Log of hit density because the chaos game's measure is very uneven: linear levels would show
    a few bright specks; the log shows the whole shape with its density still visible.
    """
    peak = hits.max()
    if peak == 0:
        out[:] = 0
        return
    blocks = np.zeros((size, size))
    for i in range(size * oversample):
        for j in range(size * oversample):
            count = hits[i, j]
            if count:
                level = LOG1P_TABLE[count] if count < len(LOG1P_TABLE) else math.log1p(count)
                blocks[i // oversample, j // oversample] += level
    top = blocks.max()
    for i in range(size):
        for j in range(size):
            out[i, j] = np.uint8(blocks[i, j] / top * 255.0 + 0.5)


@njit(cache=True, parallel=True)
def _render_batch(maps, nmaps, points, size, oversample, out):
    for i in prange(maps.shape[0]):
        render_one(maps[i], nmaps[i], points, size, oversample, out[i])


def render(maps: np.ndarray, nmaps: np.ndarray, config: FractalConfig) -> np.ndarray:
    """Images (count, size, size) uint8 of IFS codes (count, 4, 2, 3); one Numba thread per image."""
    maps = np.ascontiguousarray(maps, dtype=np.float64).reshape(-1, MAX_MAPS, 2, 3)
    nmaps = np.ascontiguousarray(nmaps, dtype=np.int64).reshape(-1)
    out = np.empty((len(maps), config.size, config.size), np.uint8)
    _render_batch(maps, nmaps, config.points, config.size, config.oversample, out)
    return out


def rerender(path: str | Path, index: int) -> np.ndarray:
    """Image `index` of a fractal asset, made again from its stored IFS code and config."""
    group = assets.open_asset(path, stage=STAGE)
    config = from_dict(FractalConfig, group.attrs["config"])
    return render(group["systems"][index], group["nmaps"][index : index + 1], config)[0]


# ---------------------------------------------------------------------------------------------
# Degeneracy rule


def usable(images: np.ndarray) -> np.ndarray:
    """Which images (count, S, S) are proper mixing pictures: neither nearly empty, a line, nor a blob."""
    lit = images >= LIT_LEVEL
    coverage = lit.mean(axis=(1, 2))
    return (coverage >= MIN_COVERAGE) & (coverage <= MAX_COVERAGE) & (_spread(lit) >= MIN_SPREAD)


def _spread(lit: np.ndarray) -> np.ndarray:
    """sqrt(minor / major eigenvalue) of each image's lit-pixel coordinate covariance (0 for a line)."""
    size = lit.shape[1]
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    weight = lit.reshape(len(lit), -1).astype(float)
    n = np.maximum(weight.sum(1), 1)
    coords = np.stack([rows.ravel(), cols.ravel()]).astype(float)  # (2, S*S)
    mean = weight @ coords.T / n[:, None]
    second = np.einsum("np,ip,jp->nij", weight, coords, coords) / n[:, None, None]
    cov = second - mean[:, :, None] * mean[:, None, :]
    eig = np.linalg.eigvalsh(cov)
    return np.sqrt(np.clip(eig[:, 0], 0, None) / np.maximum(eig[:, 1], 1e-12))


# ---------------------------------------------------------------------------------------------
# The stage


def make_chunk(config: FractalConfig, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, maps, nmaps) of one chunk: slots drawn in order, degenerate ones drawn again."""
    start = chunk * config.chunk
    count = min(config.chunk, config.count - start)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, chunk]))
    images = np.empty((count, config.size, config.size), np.uint8)
    maps = np.empty((count, MAX_MAPS, 2, 3))
    nmaps = np.empty(count, np.uint8)
    pending = np.arange(count)
    while len(pending):
        maps[pending], nmaps[pending] = sample_systems(rng, len(pending))
        images[pending] = render(maps[pending], nmaps[pending], config)
        pending = pending[~usable(images[pending])]
    return images, maps, nmaps


def plan(config: FractalConfig) -> assets.Plan:
    n, s, c = config.count, config.size, config.chunk
    arrays = {
        "images": assets.ArraySpec((n, s, s), (c, s, s), "uint8", ("sample", "y", "x")),
        "systems": assets.ArraySpec((n, MAX_MAPS, 2, 3), (c, MAX_MAPS, 2, 3), "float64", ("sample", "map", "row", "column")),
        "nmaps": assets.ArraySpec((n,), (c,), "uint8", ("sample",)),
    }
    attrs = {"gray_levels": "log1p(hits)/log1p(max hits), area-averaged, max to 255"}
    return assets.Plan(STAGE, config, arrays, config.units, attrs=attrs)


def run(config: FractalConfig, out: str | Path, workers: int = 1, force: bool = False) -> Path:
    """Build (or resume, or leave alone if up to date) the fractal asset at `out`."""
    if not 1 <= workers <= numba.config.NUMBA_NUM_THREADS:
        raise PixgenError(f"workers must be between 1 and {numba.config.NUMBA_NUM_THREADS} on this machine, got {workers}")
    numba.set_num_threads(workers)  # parallel inside a chunk, so chunks run one after another

    def work(chunk: int) -> assets.Writes:
        images, maps, nmaps = make_chunk(config, chunk)
        rows = slice(chunk * config.chunk, chunk * config.chunk + len(images))
        return {"images": (rows, images), "systems": (rows, maps), "nmaps": (rows, nmaps)}

    return assets.build(out, plan(config), work, force=force)
