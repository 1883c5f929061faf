"""Image grids (PNG) for looking at assets: mixing pictures, PixMix previews, corruptions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import PixgenError


def tile(images: np.ndarray, ncol: int = 16, scale: int = 3, gap: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W) row by row into one uint8 picture, upscaled without smoothing."""
    if images.ndim != 3 or len(images) == 0:
        raise PixgenError(f"need a non-empty stack of gray images (N, H, W), got shape {images.shape}")
    n, h, w = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    out = np.full((nrow * (h + gap) + gap, ncol * (w + gap) + gap), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = img
    return np.kron(out, np.ones((scale, scale), dtype=np.uint8))


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 16, scale: int = 3) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tile(np.asarray(images, dtype=np.uint8), ncol, scale)).save(path)
    return path
