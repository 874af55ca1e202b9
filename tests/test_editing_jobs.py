"""sample.py's editing jobs (ddpm_jax/editing/jobs.py) on an untrained tiny digits run: every mode
end to end in process, one through sample.py itself, and the flag checks."""

import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

from configs import digits  # noqa: E402
from conftest import write_untrained_run  # noqa: E402
from ddpm_jax import checkpoint, config as config_lib  # noqa: E402
from ddpm_jax.editing import jobs as edit_jobs  # noqa: E402
from ddpm_jax.sampling import ModelApply  # noqa: E402

# End-to-end through the loop, the command line or a reference framework: see pyproject's
# `slow` marker.
pytestmark = pytest.mark.slow

TINY = {"data.image_size": 8, "model.attn_resolutions": (4,)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, config, model, params) of an untrained tiny digits run (step 0)."""
    config = digits.get_config("tiny")
    for key, value in TINY.items():
        section, field = key.split(".")
        config[section][field] = value
    workdir = str(tmp_path_factory.mktemp("run"))
    write_untrained_run(config, workdir)
    config, model, params = checkpoint.load_for_sampling(workdir, "ema")
    return workdir, config, model, params


def values(**changes):
    """sample.py's flag values with every editing flag unset, then `changes`."""
    base = dict(inpaint=None, mask=None, jump_length=2, resamplings=2, sdedit=None, strength=None,
                encode=None, interpolate=None, lambdas=3, at_step=None, ddim_latent=False,
                grid_cells=None, progressive=None, labels=None, guidance=None, num_samples=3)
    return types.SimpleNamespace(**{**base, **changes})


def digits_npz(tmp_path, num=3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, 8, 8, 1)).astype(np.uint8)
    path = tmp_path / "x.npz"
    np.savez(path, images=images)
    return str(path), images


def _run(mode, run, flag_values, steps=6, **option_changes):
    _, config, model, params = run
    options = config_lib.sampler_options(config, steps=steps, **option_changes)
    return edit_jobs.run(mode, flag_values, model_apply=ModelApply(model), params=params,
                         schedule=config_lib.schedule_from_config(config),
                         image_shape=config_lib.image_shape(config), options=options,
                         batch_size=2, key=jax.random.key(0))


def test_inpaint_keeps_the_known_half_of_every_image(tmp_path, run):
    path, images = digits_npz(tmp_path)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = _run("inpaint", run, values(inpaint=path, mask=str(tmp_path / "mask.png")),
                  sampler="ddpm")
    assert result.images.shape == images.shape and result.images.dtype == np.uint8
    np.testing.assert_array_equal(result.images[:, :4], images[:, :4])
    assert np.any(result.images[:, 4:] != images[:, 4:])
    assert result.grid.shape == (6, 8, 8, 1) and result.nrow == 6  # (masked input, result) pairs
    np.testing.assert_array_equal(result.grid[0, 4:], 128)
    with pytest.raises(ValueError, match="--sampler=ddpm"):
        _run("inpaint", run, values(inpaint=path, mask=str(tmp_path / "mask.png")), sampler="ddim")


def test_sdedit_encode_interpolate_and_progressive_write_their_outputs(tmp_path, run):
    path, images = digits_npz(tmp_path)
    edited = _run("sdedit", run, values(sdedit=path, strength=0.3), sampler="ddim")
    assert edited.images.shape == images.shape
    encoded = _run("encode", run, values(encode=path))
    assert encoded.extra["latents"].shape == images.shape and encoded.images.shape == images.shape
    for name, image in (("a.png", images[0]), ("b.png", images[1])):
        Image.fromarray(image[..., 0]).save(tmp_path / name)
    pair = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for method in (dict(at_step=3), dict(ddim_latent=True)):
        mixed = _run("interpolate", run, values(interpolate=pair, **method))
        assert mixed.images.shape == (3, 8, 8, 1) and mixed.nrow == 5
        np.testing.assert_array_equal(mixed.grid[0], images[0])
        np.testing.assert_array_equal(mixed.grid[-1], images[1])
    progressive = _run("progressive", run, values(progressive=2))
    assert progressive.extra["progressive"].shape == (3, 3, 8, 8, 1)
    np.testing.assert_array_equal(progressive.extra["progressive_timesteps"][-1], 0)
    # The last record is the final x0 prediction: the image itself.
    np.testing.assert_array_equal(progressive.extra["progressive"][:, -1], progressive.images)


def test_a_wrong_image_size_is_named_before_anything_compiles(tmp_path, run):
    path = tmp_path / "big.npz"
    np.savez(path, images=np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match=r"--sdedit=.*big\.npz.*8, 8, 1"):
        _run("sdedit", run, values(sdedit=str(path)))


@pytest.mark.parametrize("changes, message", [
    (dict(inpaint="x.png"), "--inpaint needs --mask"),
    (dict(inpaint="x.png", mask="m.png", sdedit="y.png"), "Pick one of --inpaint / --sdedit"),
    (dict(mask="m.png"), "--mask only applies to --inpaint"),
    (dict(sdedit="x.png", strength=0.0), r"--strength=0.0 must lie in \(0, 1\]"),
    (dict(strength=0.5), "--strength only applies to --sdedit"),
    (dict(interpolate=["a.png"]), "two files A,B"),
    (dict(interpolate=["a", "b"], at_step=5, ddim_latent=True), "pick one"),
    (dict(ddim_latent=True), "--ddim_latent only applies to --interpolate"),
    (dict(encode="x.png", labels="3"), "drop --labels"),
    (dict(grid_cells=4), "--grid_cells only applies"),
])
def test_conflicting_editing_flags_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        edit_jobs.check_flags(values(**changes))
    assert edit_jobs.check_flags(values()) is None


def test_sample_py_inpaints_from_the_command_line(tmp_path, run):
    path, images = digits_npz(tmp_path, num=2)
    np.savez(tmp_path / "mask.npz", mask=np.arange(64).reshape(8, 8) % 2 == 0)
    out = tmp_path / "fill.png"
    proc = subprocess.run(
            [sys.executable, str(REPO / "sample.py"), "--workdir", run[0], "--inpaint", path,
             "--mask", str(tmp_path / "mask.npz"), "--steps", "5", "--jump_length", "2",
             "--resamplings", "2", "--sampler", "ddpm", "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = np.load(tmp_path / "fill.npz")
    known = np.arange(64).reshape(8, 8) % 2 == 0
    np.testing.assert_array_equal(written["images"][:, known], images[:, known])
    assert written["mask"].shape == (2, 8, 8, 1) and out.stat().st_size > 0
