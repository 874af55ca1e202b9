"""Model-space images to 8-bit pixels, and image grids and sample files on disk.

Every output file is written atomically (`write_atomically`): to a temporary name in its own
directory, then renamed into place, so that a reader (or a `kill -9` in the middle) sees the
old file or the new one, never a torn one; a PNG grid and the .npz beside it are renamed
together, the .npz last."""

from __future__ import annotations

import errno
import math
import os
import uuid
from collections.abc import Callable, Mapping
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


GUTTER = 128  # mid-gray between tiles: apart from black backgrounds and white strokes alike


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2,
               gutter: int = GUTTER) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] (C = 1 or 3) into one [rows*(H+p)+p, nrow*(W+p)+p, C]
    array with `padding` pixels of value `gutter` around and between tiles (and in empty
    slots); nrow (tiles per row) defaults to ceil(sqrt(N)). The gutter is gray, not black, so
    that tiles with black backgrounds (digits) do not run into each other."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images [N, H, W, 1 or 3]; got {images.dtype} of shape "
                         f"{images.shape}. Convert with to_uint8 first.")
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow!r}.")
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), gutter,
                   np.uint8)
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
    1 keeps the native size), atomically (`write_atomically`)."""
    write_atomically({os.fspath(path): _grid_writer(images, nrow, padding, tile_px, max_tiles)})


def _grid_writer(images: np.ndarray, nrow: int | None, padding: int, tile_px: int,
                 max_tiles: int | None) -> Callable[[str], None]:
    """A writer (path -> None) of `save_image_grid`'s PNG; the grid is built (and checked) now."""
    if max_tiles is not None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None; got {max_tiles!r}.")
        images = np.asarray(images)[:max_tiles]
    grid = image_grid(upscale_nearest(images, tile_px), nrow=nrow, padding=padding)
    return lambda path: Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_samples(images: np.ndarray, png_path: str, labels: np.ndarray | None = None, *,
                 grid_images: np.ndarray | None = None,
                 extra: Mapping[str, np.ndarray] | None = None, nrow: int | None = None,
                 padding: int = 2, tile_px: int = TILE_PX,
                 max_tiles: int | None = MAX_TILES) -> str:
    """Writes uint8 images [N, H, W, C] as a PNG grid at png_path (of `grid_images`, default
    the images; `save_image_grid`'s options) and, beside it with the suffix .npz, every image
    ('images'), their classes ('labels', [N] int, when given) and the `extra` arrays. Both
    atomically, renamed together, the .npz last (`write_atomically`). Returns the .npz path."""
    npz_path = os.path.splitext(png_path)[0] + ".npz"
    arrays = dict(images=images, **({} if labels is None else {"labels": labels}), **(extra or {}))
    write_atomically({
            png_path: _grid_writer(images if grid_images is None else grid_images, nrow, padding,
                                   tile_px, max_tiles),
            npz_path: lambda path: np.savez(path, **arrays)})
    return npz_path


class OutputError(ValueError):
    """An output that could not be written (a full disk, a vanished directory): one line; the
    previous file at that path, if any, is untouched."""


def write_atomically(writers: Mapping[str, Callable[[str], None]]) -> None:
    """Writes each output path with its writer (`write(temporary_path)`, e.g. a PNG save) to a
    temporary name in the path's directory (created if missing: a work dir removed meanwhile
    comes back), flushed to disk, then renames them all into place in the mapping's order, the
    last one last. A failure in any writer removes every temporary file and leaves every
    previous output as it was (OutputError, one line); a `kill -9` leaves at most a hidden
    `.tmp-*` file beside them. Paths through a symlink write to its target."""
    staged: list[tuple[str, str]] = []
    path = ""  # the one being written or renamed, for the message
    try:
        for path, write in writers.items():
            final = os.path.realpath(path)
            folder, name = os.path.split(final)
            os.makedirs(folder, exist_ok=True)
            temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{name}")  # same suffix
            staged.append((temporary, final))
            write(temporary)
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        for (temporary, final), path in zip(staged, writers):
            os.replace(temporary, final)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"Could not write {path}: {reason} ([Errno {e.errno}]); nothing was "
                          "replaced (any previous file there is intact): free some space or "
                          "choose another location.") from None
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


def write_text_atomically(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` with `write_atomically`: a report or a config."""
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically({path: write})
