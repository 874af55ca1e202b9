"""to_uint8 inverts the data scaling; grids put tile k at row k // nrow, column k % nrow."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.images import image_grid, save_image_grid, to_uint8, upscale_nearest


def test_to_uint8_inverts_the_data_scaling_and_clips():
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    np.testing.assert_array_equal(to_uint8(pixels / 127.5 - 1.0), pixels)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, -1.0, 0.0, 1.0, 2.5])),
                                  [0, 0, 128, 255, 255])  # round(127.5) = 128 (half to even)


def test_grid_places_tiles_row_major_with_padding():
    images = np.stack([np.full((2, 3, 3), 10 * (k + 1), np.uint8) for k in range(5)])
    grid = image_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    for k in range(5):
        top, left = 1 + (k // 3) * 3, 1 + (k % 3) * 4
        assert (grid[top:top + 2, left:left + 3] == 10 * (k + 1)).all()
    assert (grid[4:6, 9:12] == 0).all()  # the sixth slot stays empty
    assert (grid[0] == 0).all() and (grid[:, 0] == 0).all()


def test_save_image_grid_writes_a_png(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 1), dtype=np.uint8)
    save_image_grid(images, tmp_path / "grid.png", padding=0, tile_px=1)
    loaded = np.asarray(Image.open(tmp_path / "grid.png"))
    np.testing.assert_array_equal(loaded, image_grid(images, padding=0)[..., 0])
    with pytest.raises(ValueError, match="to_uint8"):
        save_image_grid(images.astype(np.float32), tmp_path / "bad.png")


def test_tiles_are_upscaled_by_pixel_repetition_to_the_requested_size():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    big = upscale_nearest(images, 64)
    assert big.shape == (2, 64, 64, 1)
    # Output pixel (r, c) is input pixel (r // 8, c // 8): nearest, no interpolation.
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    np.testing.assert_array_equal(big[1, ..., 0], images[1, rows // 8, cols // 8, 0])
    assert upscale_nearest(images, 60).shape[1] == 64   # the smallest integer factor: 8
    assert upscale_nearest(images, 8) is images


def test_a_grid_of_many_samples_shows_the_first_max_tiles_at_64_pixels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
    save_image_grid(images, tmp_path / "grid.png", padding=2)
    loaded = np.asarray(Image.open(tmp_path / "grid.png"))
    # 100 tiles of 64 px: 10 x 10 with 2 px padding.
    assert loaded.shape == (10 * 66 + 2, 10 * 66 + 2)
    np.testing.assert_array_equal(loaded, image_grid(upscale_nearest(images[:100], 64))[..., 0])
    with pytest.raises(ValueError, match="max_tiles"):
        save_image_grid(images, tmp_path / "bad.png", max_tiles=0)
