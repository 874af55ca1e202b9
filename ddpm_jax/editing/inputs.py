"""Input images and masks of sample.py's image-editing commands (inpainting, SDEdit, encoding,
interpolation): read from a PNG or an .npz and checked against the model's image shape."""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np
from PIL import Image, UnidentifiedImageError

PADDING = 2  # gutter pixels around and between tiles, as ddpm_jax.images.image_grid writes them
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of a 16-bit greyscale PNG
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError,
               zipfile.BadZipFile)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _extension(path: str, flag: str) -> str:
    """'.png' or '.npz' (any case) for an existing file; ValueError otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}={path}: no such file; pass an existing .png or .npz file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".npz"):
        raise ValueError(f"{flag}={path}: unsupported extension {ext or '(none)'!r}; "
                         "pass a .png or an .npz file")
    return ext


def _read_png(path: str, flag: str, mode: str) -> np.ndarray:
    """uint8 [h, w] ('L') or [h, w, 3] ('RGB'): the PNG converted to `mode`. A 16-bit greyscale
    PNG is scaled to 8 bits (v * 255 / 65535, rounded), not clipped at 255 as PIL's convert
    would."""
    try:
        with Image.open(path) as image:
            if image.mode in WIDE_GREY_MODES:
                wide = np.asarray(image).astype(np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise ValueError(f"{flag}={path}: a {image.mode} PNG with values "
                                     f"{wide.min()}..{wide.max()}, outside 16 bits; save it as "
                                     "an 8-bit (0..255) or 16-bit (0..65535) PNG")
                image = Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8), "L")
            return np.asarray(image.convert(mode))
    except _UNREADABLE as error:
        if str(error).startswith(f"{flag}={path}: "):
            raise
        raise ValueError(f"{flag}={path}: not a readable PNG ({_one_line(error)})") from error


def _read_npz(path: str, flag: str) -> dict[str, np.ndarray]:
    """Every array of the .npz, by name (no pickled objects)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except _UNREADABLE as error:
        raise ValueError(f"{flag}={path}: not a readable .npz ({_one_line(error)})") from error
    if isinstance(archive, np.ndarray):
        raise ValueError(f"{flag}={path}: a bare .npy array, not an .npz archive; "
                         "save it with np.savez")
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except _UNREADABLE as error:
        raise ValueError(f"{flag}={path}: not a readable .npz ({_one_line(error)})") from error


def _split_grid(grid: np.ndarray, n: int, path: str, flag: str,
                image_shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [n, H, W, C] from a grid [gh, gw, C] of n tiles (image_grid's layout), each tile
    upscaled by an integer factor k >= 1 (detected) and downsampled by taking every k-th pixel."""
    h, w, c = image_shape
    nrow = math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    (gh, gw), p = grid.shape[:2], PADDING
    tile_h, rest_h = divmod(gh - p * (rows + 1), rows)
    tile_w, rest_w = divmod(gw - p * (nrow + 1), nrow)
    k = tile_h // h
    if rest_h or rest_w or k < 1 or (tile_h, tile_w) != (k * h, k * w):
        raise ValueError(
            f"{flag}={path}: a {gh}x{gw} PNG is no grid of {n} {h}x{w} tiles ({rows} row(s) of "
            f"{nrow}, padding {p}); expected {rows * (h + p) + p}x{nrow * (w + p) + p} (k=1), or "
            f"{rows}*({h}k+{p})+{p} x {nrow}*({w}k+{p})+{p} for tiles upscaled k times; "
            "check --grid_cells and the model's image size")
    grid = grid.reshape(gh, gw, c)
    tops = [p + (i // nrow) * (tile_h + p) for i in range(n)]
    lefts = [p + (i % nrow) * (tile_w + p) for i in range(n)]
    return np.stack([grid[t:t + tile_h:k, s:s + tile_w:k] for t, s in zip(tops, lefts)])


def load_images(path: str, *, image_shape: tuple[int, int, int], grid_cells: int | None = None,
                flag: str = "--images") -> np.ndarray:
    """uint8 [N, H, W, C] images from `path`: an .npz with key 'images' (uint8 [N, H, W, C], or
    [H, W, C] for one image) or a PNG: one H x W image, or with grid_cells=N a grid of N tiles in
    image_grid's layout (nrow = ceil(sqrt(N)) per row, 2 gutter pixels around/between tiles),
    possibly upscaled k times per tile as save_image_grid's tile_px does (k is detected).
    image_shape: the model's (H, W, C), C = 1 ('L') or 3 ('RGB'). grid_cells is for PNGs only."""
    h, w, c = image_shape
    want = f"{h}x{w}x{c}"
    if c not in (1, 3):
        raise ValueError(f"{flag}={path}: the model's images are {want}; only 1 or 3 channels")
    if grid_cells is not None and grid_cells < 1:
        raise ValueError(f"{flag}={path}: grid_cells={grid_cells}, but a grid holds >= 1 tile; "
                         "pass --grid_cells N with the number of images in the PNG grid")
    if _extension(path, flag) == ".png":
        png = _read_png(path, flag, "L" if c == 1 else "RGB")
        if grid_cells is not None:
            return _split_grid(png, grid_cells, path, flag, image_shape)
        if png.shape[:2] != (h, w):
            raise ValueError(
                f"{flag}={path}: a {png.shape[0]}x{png.shape[1]} image, but the model takes {want} "
                f"images; pass an {h}x{w} PNG, an .npz of uint8 [N, {h}, {w}, {c}], or a grid "
                "with --grid_cells")
        return png.reshape(1, h, w, c)
    arrays = _read_npz(path, flag)
    if "images" not in arrays:
        raise ValueError(f"{flag}={path}: no 'images' array (it has {sorted(arrays)}); "
                         f"save uint8 [N, {h}, {w}, {c}] under the key 'images'")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise ValueError(f"{flag}={path}: uint8 0..255 expected, got {images.dtype} of shape "
                         f"{images.shape}; save uint8 [N, {h}, {w}, {c}] images")
    images = images[None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[1:] != (h, w, c) or len(images) == 0:
        raise ValueError(f"{flag}={path}: 'images' of shape {arrays['images'].shape}, but the "
                         f"model takes {want} images; pass uint8 [N, {h}, {w}, {c}] (N >= 1) "
                         f"or [{h}, {w}, {c}]")
    return images


def load_mask(path: str, *, image_shape: tuple[int, int, int], num_images: int,
              flag: str = "--mask") -> np.ndarray:
    """bool [num_images, H, W, 1] (True = known pixel) from a PNG ('L' of H x W or an integer
    upscale k of it, read every k-th pixel; nonzero = known) or an .npz (key 'mask', or its only
    array; nonzero = known) of shape [H, W], [H, W, 1] or [N, H, W, 1]; one mask is broadcast to
    num_images. ValueError for a mask with no known pixel or with every pixel known."""
    h, w, _ = image_shape
    shapes = f"[{h}, {w}], [{h}, {w}, 1] or [{num_images}, {h}, {w}, 1]"
    if _extension(path, flag) == ".png":
        png = _read_png(path, flag, "L")
        k = png.shape[0] // h
        if k < 1 or png.shape != (k * h, k * w):
            raise ValueError(f"{flag}={path}: a {png.shape[0]}x{png.shape[1]} mask, but the model "
                             f"takes {h}x{w} images; pass an {h}x{w} PNG (or an integer upscale "
                             f"of it) or an .npz mask of {shapes}")
        mask = png[::k, ::k] != 0
    else:
        arrays = _read_npz(path, flag)
        if "mask" not in arrays and len(arrays) != 1:
            raise ValueError(f"{flag}={path}: no 'mask' array (it has {sorted(arrays)}); "
                             f"save one mask of {shapes} under the key 'mask'")
        mask = arrays["mask"] if "mask" in arrays else next(iter(arrays.values()))
        if mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
            raise ValueError(f"{flag}={path}: a {mask.dtype} mask; expected bool or numbers "
                             f"(nonzero = known) of {shapes}")
        bad = int(np.size(mask) - np.isfinite(mask).sum()) if mask.dtype != bool else 0
        if bad:  # NaN != 0 would make every NaN pixel 'known'
            raise ValueError(f"{flag}={path}: the mask holds {bad} NaN or inf values, which are "
                             "neither known nor unknown; save 0 / False for the pixels to "
                             "generate and 1 / True for the known ones")
        if mask.shape[-3:] != (h, w, 1) and mask.shape != (h, w) or mask.ndim > 4:
            raise ValueError(f"{flag}={path}: a mask of shape {mask.shape}, but the model takes "
                             f"{h}x{w} images; pass a mask of {shapes}")
        mask = mask != 0
    mask = mask.reshape(-1, h, w, 1)
    if len(mask) not in (1, num_images):
        raise ValueError(f"{flag}={path}: {len(mask)} masks for {num_images} images; pass one "
                         f"mask [{h}, {w}, 1] or one per image, [{num_images}, {h}, {w}, 1]")
    for i, known in enumerate(mask):
        which = "the mask" if len(mask) == 1 else f"mask {i} of {len(mask)}"
        if not known.any():
            raise ValueError(f"{flag}={path}: {which} is empty: nothing to condition on (no known "
                             "pixel); mark the known pixels nonzero / True")
        if known.all():
            raise ValueError(f"{flag}={path}: {which} marks every pixel known: nothing to "
                             "inpaint; mark the pixels to generate 0 / False")
    return np.repeat(mask, num_images // len(mask), axis=0)


def bottom_half_mask(image_shape: tuple[int, int, int]) -> np.ndarray:
    """bool [H, W, 1]: the top half known (True), the bottom half (rows >= H // 2) unknown."""
    h, w, _ = image_shape
    mask = np.ones((h, w, 1), bool)
    mask[h // 2:] = False
    return mask
