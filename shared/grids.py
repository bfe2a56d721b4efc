"""Image grids as PNG: validation samples and data previews, written the same way by both backends."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from shared.diffusers_format import atomic_write


def make_grid(images: np.ndarray, *, rows: int) -> np.ndarray:
    """Tiles (N, H, W, C) images into one (rows*H, cols*W, C) image, row-major; blanks pad the end."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    if not 1 <= rows <= max(n, 1):
        raise ValueError(f"rows must be in [1, {n}], got {rows}")
    cols = -(-n // rows)
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 as is; floats in [0, 1] scaled (model outputs in [-1, 1] are mapped by the caller)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_grid(images: np.ndarray, path: str | os.PathLike, *, rows: int = 1) -> Path:
    """Writes a PNG grid atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(to_uint8(images), rows=rows)
    image = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
