"""Batched PixMix (Hendrycks, Zou et al., CVPR 2022) for single-channel digits.

Every sample has its own mixing picture, rounds, augmentation ops, levels and mixing weights. All
of a batch's draws are made up front from one numpy Generator in a fixed number of vectorised calls
(`draw`), so the bytes depend only on the Generator's seed, never on how the work is split. One
fused Numba kernel then does, image by image, only the work that image drew (`apply`).

The augmentation ops reproduce the reference code's PIL ops for the same parameters: PIL's pixel
centres, its out-of-image fill (0) and edge clamping, and its uint8 truncation after bilinear
interpolation. `pil_augment` is that per-image PIL reference, for tests and the benchmark baseline.
"""

from __future__ import annotations

import functools
import types as pytypes
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from PIL import Image, ImageOps

from . import PixgenError

# The reference's `augmentations` list, in its order: MNIST-safe as the levels go (at severity 3:
# rotations up to 8 degrees, shears up to 0.09, shifts up to 2 pixels; no flips).
OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x", "translate_y")
ADD, MULTIPLY = 0, 1
MAX_DEGREES = 30  # rotate's largest turn, at severity 10

# Parameter of each op from its level (U(0.1, severity) / 10) and sign, as the reference's
# int_parameter/float_parameter make them: whole degrees, whole pixels, whole bits.
_PARAMETER = {
    "autocontrast": lambda level, sign, size: np.zeros_like(level),
    "equalize": lambda level, sign, size: np.zeros_like(level),
    "posterize": lambda level, sign, size: 4 - np.floor(level * 4),
    "rotate": lambda level, sign, size: np.floor(level * 30) * sign,
    "solarize": lambda level, sign, size: 256 - np.floor(level * 256),
    "shear_x": lambda level, sign, size: level * 0.3 * sign,
    "shear_y": lambda level, sign, size: level * 0.3 * sign,
    "translate_x": lambda level, sign, size: np.floor(level * size / 3) * sign,
    "translate_y": lambda level, sign, size: np.floor(level * size / 3) * sign,
}


def check_ops(ops: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise PixgenError(f"unknown or no augmentation ops {unknown or list(ops)}; choose from {', '.join(OPS)}")
    return tuple(ops)


@dataclass(frozen=True)
class Draws:
    """Every random choice of a batch of n samples; slot 0 is the start image, slot j round j."""

    mixing_index: np.ndarray  # (n,) which mixing picture
    rounds: np.ndarray  # (n,) mixing rounds, U{0..k}
    augmented: np.ndarray  # (n, k+1) slot uses augment(x) (else x at slot 0, the mixing picture after)
    op: np.ndarray  # (n, k+1) index into OPS
    param: np.ndarray  # (n, k+1) the op's parameter (degrees, shear, pixels, bits, threshold)
    mix: np.ndarray  # (n, k) ADD or MULTIPLY
    a: np.ndarray  # (n, k) weight of the mixed image
    b: np.ndarray  # (n, k) weight of the other image


def draw(rng: np.random.Generator, n: int, n_mixing: int, *, k: int = 4, beta: float = 3.0,
         severity: float = 3.0, ops: tuple[str, ...] = OPS, size: int = 28) -> Draws:
    """Draw all of a batch's PixMix choices. Draws for rounds a sample skips are made and unused,
    so the number of calls on `rng` never depends on the outcomes."""
    codes = np.array([OPS.index(op) for op in check_ops(ops)])
    slots = (n, k + 1)
    mixing_index = rng.integers(0, n_mixing, n)
    rounds = rng.integers(0, k + 1, n)
    augmented = rng.random(slots) < 0.5
    op = codes[rng.integers(0, len(codes), slots)]
    level = rng.uniform(0.1, severity, slots) / 10
    sign = np.where(rng.random(slots) < 0.5, 1.0, -1.0)
    param = np.zeros(slots)
    for code, name in enumerate(OPS):
        chosen = op == code
        param[chosen] = _PARAMETER[name](level[chosen], sign[chosen], size)
    mix = rng.integers(0, 2, (n, k)).astype(np.int8)
    a, b = _weights(rng, (n, k), beta)
    return Draws(mixing_index, rounds, augmented, op, param, mix, a, b)


def _weights(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Half the rounds blend (a ~ Beta(β,1), b ~ Beta(1,β)); half extrapolate away from the other
    image (a = 1 + Beta(1,β), b = −Beta(1,β), two independent draws).

    By inverse CDFs, several times faster than rng.beta: Beta(β,1) is U^(1/β), Beta(1,β) is
    1 − U^(1/β)."""
    blend = rng.random(shape) < 0.5
    u, v, w = rng.random((3, *shape)) ** (1 / beta)
    v, w = 1 - v, 1 - w
    a = np.where(blend, u, 1 + v)
    b = np.where(blend, v, -w)
    return a.astype(np.float32), b.astype(np.float32)


def apply(images: np.ndarray, mixing: np.ndarray, draws: Draws, parallel: bool = True) -> np.ndarray:
    """PixMix a batch: uint8 digits (n, H, W) and mixing pictures (M, H, W) -> uint8 (n, H, W).

    `parallel` spreads the images over Numba's threads; turn it off where the caller already runs
    one batch per core (Dask workers)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    mixing = np.ascontiguousarray(mixing, dtype=np.uint8)
    if images.ndim != 3 or mixing.ndim != 3 or images.shape[1:] != mixing.shape[1:]:
        raise PixgenError(f"digits {images.shape} and mixing pictures {mixing.shape} must be (N, H, W) of one size")
    _check_rotations(draws.op, draws.param)
    out = np.empty_like(images)
    kernel = _pixmix_parallel if parallel else _pixmix_serial
    kernel(images, mixing, draws.mixing_index, draws.rounds, draws.augmented, draws.op, draws.param,
           draws.mix, draws.a, draws.b, *_rotations(*images.shape[1:]), out)  # fmt: skip
    return out


def augment(images: np.ndarray, op: np.ndarray, param: np.ndarray) -> np.ndarray:
    """One augmentation op per image (op indexes OPS); the kernel's ops, exposed for testing."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    op, param = np.asarray(op, np.int64), np.asarray(param, np.float64)
    _check_rotations(op, param)
    out = np.empty_like(images)
    _augment_batch(images, op, param, *_rotations(*images.shape[1:]), out)
    return out


def _check_rotations(op: np.ndarray, param: np.ndarray) -> None:
    degrees = param[op == OPS.index("rotate")]
    if (np.abs(degrees) > MAX_DEGREES).any() or (degrees != np.round(degrees)).any():
        raise PixgenError(f"rotations must be whole degrees within ±{MAX_DEGREES} (severity <= 10)")


@functools.lru_cache(maxsize=4)
def _rotations(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return _rotation_taps(h, w)


def pil_augment(img: Image.Image, op: str, param: float) -> Image.Image:
    """The reference implementation's op on one PIL image, for a given parameter (see `draw`)."""
    size = img.size
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "posterize":
        return ImageOps.posterize(img, int(param))
    if op == "solarize":
        return ImageOps.solarize(img, int(param))
    if op == "rotate":
        return img.rotate(param, resample=Image.BILINEAR)
    affine = {
        "shear_x": (1, param, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, param, 1, 0),
        "translate_x": (1, 0, param, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, param),
    }
    return img.transform(size, Image.AFFINE, affine[op], resample=Image.BILINEAR)


# ---- Numba kernels -------------------------------------------------------------------------------
# Lookup tables and coordinates are computed exactly as PIL does (float64, no fastmath), so that
# integer truncations land where PIL's do; only the mixing arithmetic is fastmath float32.
# fastmath=False is explicit because Numba otherwise lets callees inherit the caller's fastmath.

_jit = numba.njit(cache=True, nogil=True, fastmath=False)
# Without "nnan"/"ninf", so min/max clipping keeps IEEE meaning for every value.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_fast = numba.njit(cache=True, nogil=True, fastmath=_FAST)

_ROTATE, _SOLARIZE = OPS.index("rotate"), OPS.index("solarize")
_AUTOCONTRAST, _EQUALIZE, _POSTERIZE = OPS.index("autocontrast"), OPS.index("equalize"), OPS.index("posterize")
_SHEAR_X, _SHEAR_Y = OPS.index("shear_x"), OPS.index("shear_y")
_TRANSLATE_X = OPS.index("translate_x")
# float32 constants: a Python number would promote the arithmetic to float64
_ZERO, _HALF, _ONE, _TWO = np.float32(0), np.float32(0.5), np.float32(1), np.float32(2)
_LN2 = np.float32(np.log(2.0))
_GRAY = np.float32(255)
_TINY_2X = np.float32(1e-30)  # below any 2x that matters: (2x)^a of it is black in uint8
_TINY_2Y = np.float32(1e-37)  # the reference clips 2y here, before its possibly negative power


@_jit
def _histogram(src):
    # Four interleaved counts: digits are mostly 0, and one count per pixel would wait on itself.
    flat = src.ravel()
    counts = np.zeros((4, 256), np.int64)
    for p in range(flat.size):
        counts[p & 3, flat[p]] += 1
    return counts[0] + counts[1] + counts[2] + counts[3]


@_jit
def _autocontrast_lut(src):
    hist = _histogram(src)
    lut = np.arange(256).astype(np.uint8)
    lo, hi = 0, 255
    while lo < 255 and hist[lo] == 0:
        lo += 1
    while hi > 0 and hist[hi] == 0:
        hi -= 1
    if hi > lo:
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        for i in range(256):
            lut[i] = min(max(int(i * scale + offset), 0), 255)
    return lut


@_jit
def _equalize_lut(src):
    hist = _histogram(src)
    lut = np.arange(256).astype(np.uint8)
    last = 255
    while last > 0 and hist[last] == 0:
        last -= 1
    if hist[last] == src.size:  # one gray level only
        return lut
    step = (src.size - hist[last]) // 255
    if step == 0:
        return lut
    n = step // 2
    for i in range(256):
        # n // step, by float division: exact here, as n / step is never within 1e-9 below an integer
        lut[i] = min(int(n / step), 255)
        n += hist[i]
    return lut


@_jit
def _pointwise_lut(op, param):
    lut = np.arange(256).astype(np.uint8)
    if op == _POSTERIZE:
        keep = ~((1 << (8 - int(param))) - 1) & 255
        for i in range(256):
            lut[i] = i & keep
    else:  # solarize: invert from the threshold up
        for i in range(int(param), 256):
            lut[i] = 255 - i
    return lut


@_jit
def _rotation_taps(h, w):
    """Bilinear taps of Image.rotate(d, BILINEAR) for every whole degree d in ±MAX_DEGREES: for
    each output pixel the flat indices of its 4 input neighbours (-1: outside, so 0) and the
    weights (dx, dy). PIL's geometry: about the centre, pixel centres mapped back into the input,
    edges clamped. Rotations are whole degrees, so a table replaces the per-pixel geometry."""
    index = np.full((2 * MAX_DEGREES + 1, h * w, 4), -1, np.int32)
    weight = np.zeros((2 * MAX_DEGREES + 1, h * w, 2))
    cx, cy = w / 2.0, h / 2.0
    for k in range(2 * MAX_DEGREES + 1):
        angle = -np.radians(k - MAX_DEGREES)
        c, s = np.cos(angle), np.sin(angle)
        for y in range(h):
            for x in range(w):
                xin = c * (x + 0.5 - cx) + s * (y + 0.5 - cy) + cx
                yin = -s * (x + 0.5 - cx) + c * (y + 0.5 - cy) + cy
                if xin < 0.0 or xin >= w or yin < 0.0 or yin >= h:
                    continue
                # xin - 0.5 >= -0.5, so int() of it + 1 is its floor + 1
                x0, y0 = int(xin + 0.5) - 1, int(yin + 0.5) - 1
                xa, xb = max(x0, 0), min(x0 + 1, w - 1)
                ya, yb = max(y0, 0), min(y0 + 1, h - 1)
                p = y * w + x
                index[k, p, 0], index[k, p, 1] = ya * w + xa, ya * w + xb
                index[k, p, 2], index[k, p, 3] = yb * w + xa, yb * w + xb
                weight[k, p, 0], weight[k, p, 1] = xin - 0.5 - x0, yin - 0.5 - y0
    return index, weight


@_jit
def _rotate(src, index, weight, dst):
    """Interpolate with one rotation's taps, truncating to uint8 as PIL does."""
    flat, out = src.ravel(), dst.ravel()
    for p in range(flat.size):
        if index[p, 0] < 0:
            out[p] = 0
            continue
        q00, q01 = np.float64(flat[index[p, 0]]), np.float64(flat[index[p, 1]])
        q10, q11 = np.float64(flat[index[p, 2]]), np.float64(flat[index[p, 3]])
        top = q00 + (q01 - q00) * weight[p, 0]
        bottom = q10 + (q11 - q10) * weight[p, 0]
        out[p] = np.uint8(top + (bottom - top) * weight[p, 1])


@_jit
def _shear_rows(src, shear, dst):
    """PIL's affine (1, shear, 0, 0, 1, 0) with BILINEAR: row y moves by shear·(y + 0.5) pixels
    (about the top-left corner, as in the reference), so it is a 1-D interpolation per row."""
    h, w = src.shape
    for y in range(h):
        shift = shear * (y + 0.5)
        whole = int(np.floor(shift))
        frac = shift - whole
        for x in range(w):
            xin = x + 0.5 + shift
            if xin < 0.0 or xin >= w:
                dst[y, x] = 0
                continue
            xa, xb = max(x + whole, 0), min(x + whole + 1, w - 1)
            dst[y, x] = np.uint8(src[y, xa] + (src[y, xb] - np.float64(src[y, xa])) * frac)


@_jit
def _shift_rows(src, pixels, dst):
    """A whole-pixel translation: PIL's bilinear weights are then exactly 0 and 1, so a copy."""
    h, w = src.shape
    for y in range(h):
        for x in range(w):
            dst[y, x] = src[y, x + pixels] if 0 <= x + pixels < w else 0


@_jit
def _augment_one(src, op, param, taps_index, taps_weight, dst):
    if op == _AUTOCONTRAST or op == _EQUALIZE or op == _POSTERIZE or op == _SOLARIZE:
        if op == _AUTOCONTRAST:
            lut = _autocontrast_lut(src)
        elif op == _EQUALIZE:
            lut = _equalize_lut(src)
        else:
            lut = _pointwise_lut(op, param)
        flat, out = src.ravel(), dst.ravel()
        for p in range(flat.size):
            out[p] = lut[flat[p]]
    elif op == _ROTATE:
        k = int(param) + MAX_DEGREES
        _rotate(src, taps_index[k], taps_weight[k], dst)
    elif op == _SHEAR_X:
        _shear_rows(src, param, dst)
    elif op == _SHEAR_Y:
        _shear_rows(src.T, param, dst.T)
    elif op == _TRANSLATE_X:
        _shift_rows(src, int(param), dst)
    else:  # translate_y
        _shift_rows(src.T, int(param), dst.T)


@_jit
def _augment_batch(images, op, param, taps_index, taps_weight, out):
    for i in range(images.shape[0]):
        _augment_one(images[i], op[i], param[i], taps_index, taps_weight, out[i])


# The mixing loops below vectorise only without table lookups, branches or calls to libm (no SIMD
# log/exp without SVML): on 4,000 random 28x28 pictures, a lookup of y/255 made `add` 2.6x slower,
# and the libm calls and a lookup of log(2y) made `multiply` 14x slower. So gray levels are
# converted in the loop, and log and exp are float32 polynomials (Cephes' logf and expf, within
# 2.5e-7 relative), made of arithmetic and bit casts that vectorise.


@intrinsic
def _float_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_SQRT_HALF = np.float32(np.sqrt(0.5))
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = HI + LO, HI exact
_LOG2E = np.float32(1 / np.log(2.0))
_LOG_P = tuple(np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                       1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                       3.3333331174e-1))  # fmt: skip
_EXP_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                       1.6666665459e-1, 5.0000001201e-1))  # fmt: skip
_MIN_EXPONENT = np.float32(-127)


@_fast
def _log(x):
    """ln x of a normal float32 x > 0: x = m·2^e with m in [√½, √2), then a polynomial in m − 1."""
    bits = _float_bits(x)
    e = ((bits >> 23) & 0xFF) - 126
    m = _bits_float((bits & 0x7FFFFF) | 0x3F000000)  # the mantissa, in [0.5, 1)
    low = m < _SQRT_HALF
    e = e - 1 if low else e
    f = m + m - _ONE if low else m - _ONE
    z = f * f
    y = _LOG_P[0]
    for c in _LOG_P[1:]:
        y = y * f + c
    y = y * f * z
    fe = np.float32(e)
    return f + (y + fe * _LN2_LO - _HALF * z) + fe * _LN2_HI


@_fast
def _exp(x):
    """e^x of a float32 x <= ln 2: 2^k · e^r with |r| <= ln2/2 by a polynomial; 0 below about
    2^-125, so no subnormal number reaches the next round."""
    k = max(np.floor(x * _LOG2E + _HALF), _MIN_EXPONENT)
    r = x - k * _LN2_HI - k * _LN2_LO
    y = _EXP_P[0]
    for c in _EXP_P[1:]:
        y = y * r + c
    y = y * r * r + r + _ONE
    whole = np.int32(k)
    return y * _bits_float((whole + 127) << 23) if whole > -126 else _ZERO


@_fast
def _add(mixed, other, a, b):
    """a·(2x−1) + b·(2y−1) in [−1, 1], mapped back to [0, 1] and clipped."""
    flat, picture = mixed.ravel(), other.ravel()
    for p in range(flat.size):
        y = np.float32(picture[p]) / _GRAY
        v = (a * (_TWO * flat[p] - _ONE) + b * (_TWO * y - _ONE) + _ONE) * _HALF
        flat[p] = min(max(v, _ZERO), _ONE)


@_fast
def _multiply(mixed, other, a, b):
    """(2x)^a · (2y)^b / 2, a weighted geometric mean, clipped to [0, 1]. The exponent is capped at
    ln 2 (result 1) so it never overflows; x = 0 stays 0 (a > 0)."""
    flat, picture = mixed.ravel(), other.ravel()
    for p in range(flat.size):
        v = flat[p]
        y = np.float32(picture[p]) / _GRAY
        e = a * _log(max(_TWO * v, _TINY_2X)) + b * _log(max(_TWO * y, _TINY_2Y))
        flat[p] = _exp(min(e, _LN2)) * _HALF if v > _ZERO else v


def _pixmix_images(images, mixing, mixing_index, rounds, augmented, op, param, mix, a, b, taps_index, taps_weight, out):
    n, h, w = images.shape
    for i in numba.prange(n):
        src = images[i]
        if rounds[i] == 0 and not augmented[i, 0]:
            out[i] = src
            continue
        other = np.empty((h, w), np.uint8)
        mixed = np.empty(h * w, np.float32)
        start = src
        if augmented[i, 0]:
            _augment_one(src, op[i, 0], param[i, 0], taps_index, taps_weight, other)
            start = other
        flat = start.ravel()
        for p in range(h * w):
            mixed[p] = np.float32(flat[p]) / _GRAY
        for j in range(rounds[i]):
            picture = mixing[mixing_index[i]]
            if augmented[i, j + 1]:
                _augment_one(src, op[i, j + 1], param[i, j + 1], taps_index, taps_weight, other)
                picture = other
            if mix[i, j] == ADD:
                _add(mixed, picture, a[i, j], b[i, j])
            else:
                _multiply(mixed, picture, a[i, j], b[i, j])
        result = out[i].ravel()
        for p in range(h * w):
            result[p] = np.uint8(mixed[p] * np.float32(255) + _HALF)


def _named(func, name: str):
    """`func` under another name. Numba files its cache by function name and signature, not by
    options, so two dispatchers of one function load whichever was compiled first: the serial
    kernel then ran on Numba's thread pool in every Dask task, two pools fighting for two cores."""
    copy = pytypes.FunctionType(func.__code__.replace(co_name=name, co_qualname=name), func.__globals__, name)
    copy.__qualname__ = name
    return copy


_pixmix_serial = numba.njit(cache=True, nogil=True, fastmath=_FAST)(_named(_pixmix_images, "_pixmix_serial"))
_pixmix_parallel = numba.njit(cache=True, nogil=True, fastmath=_FAST, parallel=True)(_named(_pixmix_images, "_pixmix_parallel"))
