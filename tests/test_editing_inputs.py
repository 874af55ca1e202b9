"""Editing inputs: images and masks read back exactly from what sample.py writes (PNG grids at any
tile_px, .npz), and every bad file refused with one line that names the file and the shape."""

import re

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.editing.inputs import bottom_half_mask, load_images, load_mask
from ddpm_jax.images import save_image_grid

GRAY, RGB = (8, 8, 1), (8, 8, 3)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _save_png(array, path):
    array = np.asarray(array)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(path)
    return str(path)


def _refuses(flag, path, *parts):
    """pytest.raises for a ValueError whose message is one line '{flag}={path}: ...' that goes on
    to mention each of `parts`, in order."""
    pattern = "^" + re.escape(f"{flag}={path}: ") + "".join(".*" + re.escape(p) for p in parts)
    return pytest.raises(ValueError, match=pattern)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


# --- images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [GRAY, RGB])
@pytest.mark.parametrize("n", [1, 4, 5, 7])
@pytest.mark.parametrize("tile_px", [1, 64])
def test_grid_png_round_trips_exactly_at_any_tile_size(tmp_path, shape, n, tile_px):
    images = _images(n, shape, seed=n)
    path = str(tmp_path / "grid.png")
    save_image_grid(images, path, tile_px=tile_px, max_tiles=None)
    if tile_px == 64:
        assert Image.open(path).size[0] > 64  # really upscaled (k = 8)
    loaded = load_images(path, image_shape=shape, grid_cells=n)
    assert loaded.dtype == np.uint8 and loaded.shape == (n, *shape)
    np.testing.assert_array_equal(loaded, images)


@pytest.mark.parametrize("shape", [GRAY, RGB])
def test_single_png_is_one_image(tmp_path, shape):
    image = _images(1, shape)[0]
    loaded = load_images(_save_png(image, tmp_path / "one.png"), image_shape=shape)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, image[None])


def test_png_is_converted_to_the_models_channels(tmp_path):
    gray = _images(1, GRAY)[0]
    as_rgb = load_images(_save_png(gray, tmp_path / "g.png"), image_shape=RGB)
    np.testing.assert_array_equal(as_rgb, np.repeat(gray[None], 3, axis=-1))
    rgb_path = _save_png(_images(1, RGB)[0], tmp_path / "c.png")
    assert load_images(rgb_path, image_shape=GRAY).shape == (1, *GRAY)


@pytest.mark.parametrize("shape", [GRAY, RGB])
def test_npz_of_many_or_one_image(tmp_path, shape):
    images = _images(3, shape)
    np.savez(tmp_path / "many.npz", images=images, labels=np.arange(3))
    np.testing.assert_array_equal(load_images(str(tmp_path / "many.npz"), image_shape=shape),
                                  images)
    np.savez(tmp_path / "one.npz", images=images[1])
    np.testing.assert_array_equal(load_images(str(tmp_path / "one.npz"), image_shape=shape),
                                  images[1:2])


# --- masks ------------------------------------------------------------------------------------

def _half_known(h=8, w=8):
    mask = np.zeros((h, w), bool)
    mask[:, : w // 2] = True  # left half known
    return mask


@pytest.mark.parametrize("k", [1, 4])
def test_mask_png_nonzero_is_known_at_native_or_upscaled_size(tmp_path, k):
    mask = _half_known()
    pixels = np.where(mask, 200, 0).astype(np.uint8).repeat(k, 0).repeat(k, 1)
    loaded = load_mask(_save_png(pixels, tmp_path / "m.png"), image_shape=RGB, num_images=3)
    assert loaded.dtype == bool and loaded.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(loaded, np.broadcast_to(mask[None, ..., None], (3, 8, 8, 1)))


@pytest.mark.parametrize("stored_shape", [(8, 8), (8, 8, 1), (1, 8, 8, 1)])
def test_single_npz_mask_is_broadcast_to_every_image(tmp_path, stored_shape):
    mask = _half_known()
    np.savez(tmp_path / "m.npz", mask=mask.reshape(stored_shape).astype(np.uint8))
    loaded = load_mask(str(tmp_path / "m.npz"), image_shape=GRAY, num_images=2)
    assert loaded.dtype == bool and loaded.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(loaded, np.stack([mask[..., None]] * 2))


def test_npz_masks_per_image_and_the_only_array_under_any_name(tmp_path):
    masks = np.stack([_half_known(), ~_half_known()])[..., None]
    np.savez(tmp_path / "m.npz", whatever=masks)
    loaded = load_mask(str(tmp_path / "m.npz"), image_shape=GRAY, num_images=2)
    np.testing.assert_array_equal(loaded, masks)


def test_bottom_half_mask_knows_the_top_rows_only():
    mask = bottom_half_mask((7, 5, 3))
    assert mask.dtype == bool and mask.shape == (7, 5, 1)
    assert mask[:3].all() and not mask[3:].any()


# --- refusals ---------------------------------------------------------------------------------

def test_missing_file_and_wrong_extension(tmp_path):
    missing = str(tmp_path / "nope.png")
    with _refuses("--images", missing, "no such file", ".png or .npz") as excinfo:
        load_images(missing, image_shape=GRAY)
    _one_line(excinfo)
    jpg = str(tmp_path / "x.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(jpg)
    with _refuses("--mask", jpg, "'.jpg'", ".png or an .npz"):
        load_mask(jpg, image_shape=GRAY, num_images=1)


@pytest.mark.parametrize("name", ["bad.png", "bad.npz", "empty.npz", "array.npz"])
def test_unreadable_files_are_refused_in_one_line(tmp_path, name):
    path = tmp_path / name
    if name == "array.npz":  # a bare .npy behind an .npz name
        with open(path, "wb") as f:
            np.save(f, _images(1, GRAY))
    else:
        path.write_bytes(b"" if name == "empty.npz" else b"PK\x03\x04 definitely not an image")
    for load in (lambda p: load_images(p, image_shape=GRAY, flag="--images"),
                 lambda p: load_mask(p, image_shape=GRAY, num_images=1, flag="--images")):
        with _refuses("--images", str(path), "not") as excinfo:
            load(str(path))
        _one_line(excinfo)


def test_png_of_the_wrong_size_names_the_models_shape(tmp_path):
    path = _save_png(_images(1, (16, 16, 1))[0], tmp_path / "x.png")
    with _refuses("--images", path, "a 16x16 image", "model takes 8x8x1 images",
                  "an 8x8 PNG", "uint8 [N, 8, 8, 1]", "--grid_cells") as excinfo:
        load_images(path, image_shape=GRAY)
    _one_line(excinfo)


def test_npz_with_wrong_channels_dtype_or_keys(tmp_path):
    path = str(tmp_path / "x.npz")
    np.savez(path, images=_images(2, RGB))
    with _refuses("--images", path, "(2, 8, 8, 3)", "8x8x1", "[N, 8, 8, 1]"):
        load_images(path, image_shape=GRAY)
    np.savez(path, images=_images(2, GRAY).astype(np.float32))
    with _refuses("--images", path, "uint8 0..255 expected, got float32", "[N, 8, 8, 1]"):
        load_images(path, image_shape=GRAY)
    np.savez(path, samples=_images(2, GRAY), labels=np.arange(2))
    with _refuses("--images", path, "no 'images'", "['labels', 'samples']", "[N, 8, 8, 1]"):
        load_images(path, image_shape=GRAY)


def test_grid_that_fits_no_tile_count_names_the_expected_size(tmp_path):
    path = str(tmp_path / "grid.png")
    save_image_grid(_images(4, GRAY), path, tile_px=1, max_tiles=None)  # 2 x 2 tiles: 22x22
    with _refuses("--images", path, "22x22 PNG", "5 8x8 tiles", "expected 22x32 (k=1)"):
        load_images(path, image_shape=GRAY, grid_cells=5)  # 2 rows of 3 tiles
    with _refuses("--images", path, "16x16 tiles", "expected 38x38 (k=1)"):
        load_images(path, image_shape=(16, 16, 1), grid_cells=4)
    with _refuses("--images", path, "grid_cells=0", "--grid_cells"):
        load_images(path, image_shape=GRAY, grid_cells=0)


def test_masks_of_the_wrong_size_or_count(tmp_path):
    png = _save_png(np.full((12, 12), 255, np.uint8), tmp_path / "m.png")
    with _refuses("--mask", png, "a 12x12 mask", "8x8 images", "[8, 8, 1]"):
        load_mask(png, image_shape=GRAY, num_images=1)
    npz = str(tmp_path / "m.npz")
    np.savez(npz, mask=np.stack([_half_known()] * 3)[..., None])
    with _refuses("--mask", npz, "3 masks for 2 images", "[2, 8, 8, 1]"):
        load_mask(npz, image_shape=GRAY, num_images=2)
    np.savez(npz, mask=np.stack([_half_known()] * 2))  # [N, H, W] without the channel
    with _refuses("--mask", npz, "shape (2, 8, 8)", "[8, 8, 1] or [2, 8, 8, 1]"):
        load_mask(npz, image_shape=GRAY, num_images=2)
    np.savez(npz, a=_half_known(), b=_half_known())
    with _refuses("--mask", npz, "no 'mask'", "['a', 'b']", "[8, 8, 1]"):
        load_mask(npz, image_shape=GRAY, num_images=1)


def test_masks_with_nothing_known_or_nothing_unknown(tmp_path):
    png = _save_png(np.zeros((8, 8), np.uint8), tmp_path / "m.png")
    with _refuses("--mask", png, "the mask is empty: nothing to condition on") as excinfo:
        load_mask(png, image_shape=GRAY, num_images=2)
    _one_line(excinfo)
    _save_png(np.full((8, 8), 1, np.uint8), png)
    with _refuses("--mask", png, "every pixel known: nothing to inpaint"):
        load_mask(png, image_shape=GRAY, num_images=2)
    npz = str(tmp_path / "m.npz")
    np.savez(npz, mask=np.stack([_half_known(), np.ones((8, 8), bool)])[..., None])
    with _refuses("--mask", npz, "mask 1 of 2", "nothing to inpaint"):
        load_mask(npz, image_shape=GRAY, num_images=2)
    np.savez(npz, mask=np.stack([np.zeros((8, 8), bool), _half_known()])[..., None])
    with _refuses("--mask", npz, "mask 0 of 2", "empty: nothing to condition on"):
        load_mask(npz, image_shape=GRAY, num_images=2)


# --- issue 29: inputs that were silently misread -----------------------------------------------

def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    # Before: PIL's convert("L") clipped every value above 255 to white.
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0..63000
    path = str(tmp_path / "wide.png")
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit PNG
    loaded = load_images(path, image_shape=GRAY)
    np.testing.assert_array_equal(loaded[0, ..., 0], np.round(wide / 65535 * 255).astype(np.uint8))
    rgb = load_images(path, image_shape=RGB)  # grey to RGB after the scaling
    np.testing.assert_array_equal(rgb[0, ..., 1], loaded[0, ..., 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_mask_of_nan_is_refused_not_read_as_every_pixel_known(tmp_path, bad):
    # Before: NaN != 0 made every pixel known ("marks every pixel known: nothing to inpaint").
    mask = np.ones((8, 8), np.float32)
    mask[4:] = bad
    path = str(tmp_path / "m.npz")
    np.savez(path, mask=mask)
    with _refuses("--mask", path, "the mask holds 32 NaN or inf values", "save 0 / False") as e:
        load_mask(path, image_shape=GRAY, num_images=1)
    _one_line(e)
