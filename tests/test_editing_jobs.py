"""sample.py's editing jobs (ddpm_jax/editing/jobs.py) on an untrained tiny digits run: every mode
end to end in process, one through sample.py itself, and the flag checks."""

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

from configs import digits  # noqa: E402
from conftest import perturbed_on_host, write_untrained_run  # noqa: E402
from ddpm_jax import config as config_lib, runs  # noqa: E402
from ddpm_jax.editing import jobs as edit_jobs  # noqa: E402
from ddpm_jax.guidance import ClassifierApply  # noqa: E402
from ddpm_jax.models.classifier import NoisyClassifier  # noqa: E402
from ddpm_jax.sampling import ModelApply, draw_images, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

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
    config, model, params = runs.load_for_sampling(workdir, "ema")
    return workdir, config, model, params


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """(workdir, config, model, params) of a tiny class-conditional digits run (10 classes)
    whose weights are perturbed, so that labels and guidance change its output."""
    config = digits.get_config("tiny")
    for key, value in TINY.items():
        section, field = key.split(".")
        config[section][field] = value
    config.model.num_classes = 10
    workdir = str(tmp_path_factory.mktemp("cond"))
    write_untrained_run(config, workdir, perturb=0.02)
    config, model, params = runs.load_for_sampling(workdir, "ema")
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


def context(run, *, batch_size=2, extra=None, **flags):
    """The jobs' Context on the run, with `flags` as the sampler flags given on the command
    line; extra: more Context fields (labels, guidance, classifier...)."""
    _, config, model, params = run
    return edit_jobs.Context(model_apply=ModelApply(model), params=params,
                             schedule=config_lib.schedule_from_config(config),
                             image_shape=config_lib.image_shape(config), batch_size=batch_size,
                             key=jax.random.key(0), run_spec=SamplerSpec.from_config(config),
                             flags=flags, spec=SamplerSpec.from_config(config, **flags),
                             **(extra or {}))


def _run(mode, run, flag_values, steps=6, **flags):
    return edit_jobs.run(mode, flag_values, context(run, steps=steps, **flags))


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


# ------------------------------------------------- every option honoured or refused, in one line

def _plain(run, labels, **options):
    """draw_images of the run's chain at 6 steps: what plain sampling makes of these options."""
    _, config, model, params = run
    classifier_params = options.pop("classifier_params", None)
    sampler = make_sampler(ModelApply(model), config_lib.schedule_from_config(config),
                           (2, 8, 8, 1), SamplerSpec.from_config(config, steps=6), **options)
    return draw_images(sampler, params, jax.random.key(0), len(labels), labels=labels,
                       progress=False, classifier_params=classifier_params)


def test_progressive_honours_labels_and_both_guidances(cond_run):
    """--progressive with --labels / --guidance / --classifier draws what plain sampling with
    them draws (it used to ignore them and sample unconditionally)."""
    labels = np.array([3, 9, 3], np.int32)
    classifier = NoisyClassifier(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                 num_groups=8, classes=10)
    x = jnp.zeros((2, 8, 8, 1))
    clf_params = perturbed_on_host(jax.jit(lambda key: classifier.init(
            key, x, jnp.zeros(2, jnp.int32), train=False)["params"])(jax.random.key(3)), 4)

    def progressive(**extra):
        return edit_jobs.run("progressive", values(progressive=2),
                             context(cond_run, steps=6, extra=extra))

    plain = progressive(labels=labels)
    np.testing.assert_array_equal(plain.images, _plain(cond_run, labels))
    np.testing.assert_array_equal(plain.extra["labels"], labels)
    other = progressive(labels=np.array([9, 3, 9], np.int32))
    assert np.any(other.images[0] != plain.images[0])
    guided = progressive(labels=labels, guidance=2.0)
    np.testing.assert_array_equal(guided.images, _plain(cond_run, labels, guidance=2.0))
    assert np.any(guided.images != plain.images)
    steered = progressive(labels=labels, classifier=(ClassifierApply(classifier), clf_params),
                          classifier_scale=100.0)
    np.testing.assert_array_equal(steered.images, _plain(
            cond_run, labels, classifier=ClassifierApply(classifier), classifier_scale=100.0,
            classifier_params=clf_params))
    assert np.any(steered.images != plain.images)


@pytest.mark.parametrize("mode, flags, message", [
    ("encode", dict(eta=0.7), "--encode inverts and decodes with deterministic, unclipped DDIM, "
     "so --eta would do nothing: drop it."),
    ("encode", dict(sampler="ddpm"), "--encode runs DDIM inversion and DDIM decoding (eta 0); use "
     "--sampler=ddim, not ddpm (or leave it out)."),
    ("encode", dict(threshold=0.5), "so --threshold would do nothing: drop it."),
    ("encode", dict(var_type="fixedsmall"), "so --var_type would do nothing: drop it."),
    ("encode", dict(clip_denoised=True), "so --clip_denoised would do nothing: drop it."),
    ("inpaint", dict(sampler="ddim"), "--inpaint runs RePaint's ancestral steps; use "
     "--sampler=ddpm, not ddim (or leave --sampler out)."),
    ("inpaint", dict(threshold=0.9), "--inpaint runs RePaint's ancestral steps with the [-1, 1] "
     "clip, so --threshold would do nothing: drop it."),
    ("inpaint", dict(sampler="ddpm", eta=0.5), "eta=0.5 only applies to sampler 'ddim'"),
])
def test_an_option_a_job_cannot_honour_is_refused(tmp_path, run, mode, flags, message):
    path, _ = digits_npz(tmp_path)
    flag_values = values(**{mode: path}, mask=path if mode == "inpaint" else None)
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(mode, run, flag_values, **flags)


def test_interpolation_in_the_ddim_latent_refuses_ddim_only_options(tmp_path, run):
    with pytest.raises(ValueError, match=re.escape("--interpolate --ddim_latent runs DDIM "
                                                   "inversion and DDIM decoding")):
        _run("interpolate", run, values(interpolate=["a", "b"], ddim_latent=True),
             sampler="dpm++")


def test_each_job_picks_a_chain_it_supports():
    """Without sampler flags RePaint runs ancestral steps on its 250 respaced steps and the
    inversion runs DDIM with eta 0, unclipped, whatever the run samples with; the flags a job
    can use reach it."""
    run_spec = SamplerSpec(sampler="dpm++sde", steps=20, spacing="logsnr", var_type="fixedsmall")

    def spec(mode, **flags):
        ctx = edit_jobs.Context(model_apply=None, params=None,
                                schedule=types.SimpleNamespace(num_timesteps=1000),
                                image_shape=(8, 8, 1), batch_size=2, key=None,
                                run_spec=run_spec, flags=flags)
        return edit_jobs.job_spec(mode, ctx)

    assert spec("inpaint") == SamplerSpec(sampler="ddpm", steps=250, spacing="time",
                                          var_type="fixedsmall")
    assert spec("inpaint", steps=100, spacing="logsnr", clip_denoised=False) == SamplerSpec(
            sampler="ddpm", steps=100, spacing="logsnr", var_type="fixedsmall",
            clip_denoised=False)
    assert spec("encode") == SamplerSpec(sampler="ddim", steps=20, spacing="logsnr",
                                         var_type="fixedsmall", clip_denoised=False)
    assert spec("encode", steps=50).steps == 50
    assert spec("sdedit") == run_spec
    assert spec("sdedit", sampler="ddim", eta=0.5) == SamplerSpec(
            sampler="ddim", steps=20, eta=0.5, var_type="fixedsmall")


def test_encode_honours_its_steps(tmp_path, cond_run):
    path, _ = digits_npz(tmp_path)
    few, more = (_run("encode", cond_run, values(encode=path), steps=steps) for steps in (3, 6))
    assert np.abs(few.extra["latents"] - more.extra["latents"]).max() > 1e-3


def test_the_log_line_says_what_the_job_ran(tmp_path, run, caplog):
    path, _ = digits_npz(tmp_path)
    mask = tmp_path / "mask.npz"
    np.savez(mask, mask=np.arange(64).reshape(8, 8) < 32)
    with caplog.at_level(logging.INFO):
        _run("inpaint", run, values(inpaint=path, mask=str(mask), jump_length=1, resamplings=1),
             steps=4)
        _run("sdedit", run, values(sdedit=path, strength=0.5), sampler="dpm++", order=1)
    text = caplog.text
    assert "RePaint: 3 images, ddpm, 4 steps, fixedlarge variance, time spacing, j=1, r=1" in text
    assert "SDEdit: 3 images, strength 0.5, from t0=499: dpm++, 4 steps, order 1, time spacing" \
        in text


def test_sample_py_progressive_draws_the_requested_classes(tmp_path, cond_run):
    """The case as a user met it: --progressive with --labels 9 and with --labels 3 wrote the
    same images; now each writes its class's samples, and the .npz says which."""
    written = []
    for label in ("9", "3"):
        out = tmp_path / f"p{label}.png"
        proc = subprocess.run(
                [sys.executable, str(REPO / "sample.py"), "--workdir", cond_run[0],
                 "--progressive", "3", "--labels", label, "--guidance", "2", "--steps", "6",
                 "--num_samples", "2", "--out", str(out)],
                capture_output=True, text=True, timeout=300,
                env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        written.append(np.load(tmp_path / f"p{label}.npz"))
    assert np.any(written[0]["images"] != written[1]["images"])
    np.testing.assert_array_equal(written[0]["labels"], [9, 9])
