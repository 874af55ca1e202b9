"""Model-space images to 8-bit pixels, and image grids and sample files on disk."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., H, W, C] floats in [-1, 1] -> uint8 in 0..255: round((x + 1) * 127.5), clipped.

    Inverse of `to_model_range`: `to_uint8(to_model_range(x)) == x` on uint8 x.
    Accepts NumPy or JAX arrays (copied to host); returns a NumPy array.
    """
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_range(images: Any) -> Any:
    """uint8 [..., H, W, C] in 0..255 -> float32 in [-1, 1]: (x - 127.5) / 127.5, so 0 and 255
    map to exactly -1 and 1 (the training input scaling; `to_uint8` inverts it). NumPy in,
    NumPy out; a JAX array in (inside jit), a JAX array out."""
    return (images.astype(np.float32) - 127.5) / 127.5


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] (C = 1 or 3) into one [rows*(H+p)+p, nrow*(W+p)+p, C]
    array with `padding` black pixels between tiles; nrow (tiles per row) defaults to
    ceil(sqrt(N))."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images [N, H, W, 1 or 3]; got {images.dtype} of shape "
                         f"{images.shape}. Convert with to_uint8 first.")
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow!r}.")
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for k in range(n):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


TILE_PX = 64       # default: tiles are upscaled (nearest) to at least this many pixels
MAX_TILES = 100    # default: a grid shows at most this many images (all of them go to the .npz)


def upscale_nearest(images: np.ndarray, min_px: int) -> np.ndarray:
    """[N, H, W, C] -> [N, kH, kW, C], each pixel repeated k x k times, with the smallest
    integer k >= 1 that makes min(H, W) * k >= min_px (pixels stay sharp, as in a zoom)."""
    if min_px < 1:
        raise ValueError(f"min_px (the tile size) must be >= 1 pixel; got {min_px!r}.")
    images = np.asarray(images)
    k = max(1, math.ceil(min_px / min(images.shape[1:3])))
    return images if k == 1 else images.repeat(k, axis=1).repeat(k, axis=2)


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None,
                    padding: int = 2, *, tile_px: int = TILE_PX,
                    max_tiles: int | None = MAX_TILES) -> None:
    """Writes the first `max_tiles` (None: all) of uint8 images [N, H, W, C] as one PNG grid
    (see `image_grid`) to `path`, each tile upscaled to >= `tile_px` pixels (`upscale_nearest`;
    1 keeps the native size)."""
    if max_tiles is not None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None; got {max_tiles!r}.")
        images = np.asarray(images)[:max_tiles]
    grid = image_grid(upscale_nearest(images, tile_px), nrow=nrow, padding=padding)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.fspath(path))


def save_samples(images: np.ndarray, png_path: str, labels: np.ndarray | None = None, *,
                 extra: dict[str, np.ndarray] | None = None, tiles: np.ndarray | None = None,
                 **grid: Any) -> str:
    """Writes uint8 images [N, H, W, C] as a PNG grid at png_path (`save_image_grid`'s
    options in `grid`; `tiles` [M, H, W, C]: show these instead, e.g. input / output pairs) and,
    beside it with the suffix .npz, every image ('images'), their classes ('labels', [N] int,
    when given) and the `extra` arrays. Returns the .npz path."""
    npz_path = os.path.splitext(png_path)[0] + ".npz"
    arrays = dict(extra or {}, images=images, **({} if labels is None else {"labels": labels}))
    np.savez(npz_path, **arrays)
    save_image_grid(images if tiles is None else tiles, png_path, **grid)
    return npz_path
