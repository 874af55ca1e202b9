"""to_uint8 inverts the data scaling; grids put tile k at row k // nrow, column k % nrow."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.images import GUTTER, image_grid, save_image_grid, to_uint8, upscale_nearest


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
    assert (grid[4:6, 9:12] == GUTTER).all()  # the sixth slot stays empty
    assert (grid[0] == GUTTER).all() and (grid[:, 0] == GUTTER).all()


def test_neighbouring_tiles_are_separated_by_a_gutter_neither_black_nor_white():
    """Digits are white strokes on black: a black gutter let strokes run from one tile into the
    next. Between two black tiles, and between two white ones, the gutter stands out."""
    for value in (0, 255):
        grid = image_grid(np.full((2, 4, 4, 1), value, np.uint8), nrow=2, padding=2)
        between = grid[2:6, 6:8]
        assert between.shape == (4, 2, 1) and np.all(np.abs(between.astype(int) - value) >= 100)


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


# --- atomic outputs (the fault drills of issue 29, item 3) --------------------------------------

def _pair(tmp_path, value):
    """Writes a (PNG grid, .npz) pair of 4 images of `value`; returns (png path, npz path, bytes
    of both)."""
    from ddpm_jax.images import save_samples
    png = str(tmp_path / "s.png")
    npz = save_samples(np.full((4, 8, 8, 1), value, np.uint8), png, tile_px=1)
    return png, npz, (open(png, "rb").read(), open(npz, "rb").read())


def _crash_half_way(real):
    """A writer that writes half of what `real` writes to the path, then dies (as a kill -9 or
    a full disk would stop it)."""
    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = next(a for a in args if isinstance(a, str) and a.startswith("/"))
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
        raise KeyboardInterrupt("killed while writing")
    return write


@pytest.mark.parametrize("dies", ["png", "npz"])
def test_a_crash_while_writing_leaves_the_previous_png_and_npz_whole(tmp_path, monkeypatch, dies):
    # Before: np.savez and PIL wrote in place, leaving a truncated file with a valid header.
    import ddpm_jax.images as images_lib
    png, npz, before = _pair(tmp_path, 10)
    if dies == "png":
        real = Image.Image.save
        monkeypatch.setattr(Image.Image, "save", lambda self, path, *a, **k: _crash_half_way(
                lambda p: real(self, p, *a, **k))(path))
    else:
        monkeypatch.setattr(images_lib.np, "savez", _crash_half_way(np.savez))
    with pytest.raises(KeyboardInterrupt):
        _pair(tmp_path, 200)
    assert (open(png, "rb").read(), open(npz, "rb").read()) == before  # the old pair, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]  # no temporaries
    monkeypatch.undo()
    _, _, after = _pair(tmp_path, 200)
    assert after != before and np.load(npz)["images"].max() == 200


def test_the_png_and_npz_are_renamed_into_place_together_the_npz_last(tmp_path, monkeypatch):
    import os
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((os.path.basename(a),
                                                                     os.path.basename(b))),
                                                     real(a, b)))
    _pair(tmp_path, 10)
    assert [b for _, b in renames] == ["s.png", "s.npz"]
    assert all(a.startswith(".tmp-") and a.endswith(b) for a, b in renames)  # same directory


def test_a_full_disk_is_one_line_and_leaves_no_empty_png(tmp_path, monkeypatch):
    # Simulated in process: the PNG write raises ENOSPC after creating its (empty) file.
    import errno
    import os

    from ddpm_jax.images import OutputError, save_samples

    def disk_full(self, path, *args, **kwargs):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OutputError, match=r"^Could not write .*/new\.png: the disk is full "
                                          r"\(\[Errno 28\]\); nothing was replaced .*: free some "
                                          r"space or choose another location\.$"):
        save_samples(np.zeros((2, 8, 8, 1), np.uint8), str(tmp_path / "new.png"))
    assert not list(tmp_path.iterdir())  # no 0-byte PNG, no .npz, no temporary


def test_writing_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    import os
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real" / "grid.png", tmp_path / "link.png")
    save_image_grid(np.zeros((1, 8, 8, 1), np.uint8), str(tmp_path / "link.png"), tile_px=1)
    assert os.path.islink(tmp_path / "link.png")
    assert Image.open(tmp_path / "real" / "grid.png").size == (12, 12)
