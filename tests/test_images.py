"""to_uint8 inverts the data scaling; grids put tile k at row k // nrow, column k % nrow."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.images import image_grid, save_image_grid, to_uint8


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
    save_image_grid(images, tmp_path / "grid.png", padding=0)
    loaded = np.asarray(Image.open(tmp_path / "grid.png"))
    np.testing.assert_array_equal(loaded, image_grid(images, padding=0)[..., 0])
    with pytest.raises(ValueError, match="to_uint8"):
        save_image_grid(images.astype(np.float32), tmp_path / "bad.png")
