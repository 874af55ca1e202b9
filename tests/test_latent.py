"""Latent diffusion (ddpm_jax/latent.py): LDM's scale factor, the chain on latents with the
decode in the same program, the autoencoder objective of the train step, the resume contract
of the batch encoding, and the one-line refusals (the first stage's own shapes and KL term:
tests/test_autoencoder.py)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import checkpoint, latent, sampling, training
from ddpm_jax import config as config_lib
from ddpm_jax.models.autoencoder import Autoencoder, autoencoder_loss
from ddpm_jax.models.unet import UNet
from ddpm_jax.spec import spec_and_options

AE = Autoencoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2, image_channels=1,
                 num_groups=4)
UNET = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,), dropout=0.0,
            out_channels=2, num_classes=3, num_groups=4)


@pytest.fixture(scope="module")
def nets():
    """(LatentUNet, joined params, pixel images [4, 8, 8, 1]): random weights, the UNet's
    perturbed so that its zero-initialised output layer does not predict eps = 0."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)

    @jax.jit  # one compilation for both networks
    def init(x):
        ae = AE.init({"params": jax.random.key(0)}, x, jax.random.key(1))["params"]
        unet = UNET.init({"params": jax.random.key(2)}, jnp.zeros((1, 4, 4, 2)),
                         jnp.zeros((1,), jnp.int32), train=False)["params"]
        return {"unet": unet, "autoencoder": ae}
    params = init(x)
    params["moments"] = jax.jit(lambda p, x: AE.apply({"params": p}, x, method="encode"))(
            params["autoencoder"], x)  # q(z | x): (mean, log_variance), for the references
    # A fixed perturbation on the host (a random one per leaf compiles for seconds).
    params["unet"] = jax.tree.map(lambda p: p + 0.05 * np.sin(np.arange(p.size) + 1.0).reshape(
            p.shape).astype(np.float32), params["unet"])
    moments = params.pop("moments")
    return latent.LatentUNet(unet=UNET, autoencoder=AE, scale=1.7), params, x, moments


def _config(**changes):
    config = digits.get_config("latent_tiny")
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def test_the_scale_is_one_over_the_std_of_the_first_batchs_latents_and_is_pinned(nets,
                                                                                  monkeypatch):
    _, params, x, moments = nets
    monkeypatch.setattr(latent, "load_autoencoder", lambda config, step, sharding: (
            7, AE, params["autoencoder"]))
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    config = _config(**{"training.seed": 5})
    pinned, stage = latent.setup(config, None, lambda: {"image": x}, mesh)
    # Independently: z = mean + std * N(0, 1) from PRNGKey(seed), its std over every element.
    mean, log_var = moments
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(5), mean.shape), np.float64)
    z = np.asarray(mean, np.float64) + np.exp(0.5 * np.asarray(log_var, np.float64)) * noise
    np.testing.assert_allclose(stage.scale, 1.0 / z.std(), rtol=1e-5)
    assert (pinned.latent.scale, pinned.latent.autoencoder_step) == (stage.scale, 7)
    assert config.latent.scale is None  # the caller's config is left as it was
    # A resume keeps the checkpoint's pinned scale and step: the first batch is not read.
    saved = dict(latent=dict(scale=0.25, autoencoder_step=3))
    resumed, stage = latent.setup(config, saved, lambda: pytest.fail("read a batch"), mesh)
    assert (resumed.latent.scale, stage.scale) == (0.25, 0.25)
    with pytest.raises(ValueError, match=r"standard deviation is 0.0: .* set config.latent.scale"):
        latent.latent_scale(np.zeros((2, 3)))


def test_a_latent_chain_is_the_pixel_chain_on_latents_then_decoded(nets):
    # Ancestral steps with classifier-free guidance: a stochastic chain whose every step runs
    # the model twice (the chain is the one every sampler shares; the decode follows its scan).
    model, params, _, _ = nets
    options, guidance = dict(sampler="ddpm", steps=3, clip_denoised=False), 1.5
    from ddpm_jax.schedule import Schedule
    schedule = Schedule.create("linear", 50)
    labels = np.array([0, 1, 2, 0])
    out = sampling.make_sampler(sampling.ModelApply(model), schedule, (4, 4, 4, 2),
                                guidance=guidance, **spec_and_options(**options))(
            params, jax.random.key(9), labels=labels)
    plain = sampling.make_sampler(sampling.ModelApply(UNET), schedule, (4, 4, 4, 2),
                                  guidance=guidance, **spec_and_options(**options))(
            params["unet"], jax.random.key(9), labels=labels)["images"]
    np.testing.assert_array_equal(np.asarray(out["latents"]), np.asarray(plain))
    assert out["images"].shape == (4, 8, 8, 1)
    # The decode: z / scale through the decoder, clipped to the pixel range.
    by_hand = jax.jit(lambda p, z: AE.apply({"params": p}, z / 1.7, method="decode"))(
            params["autoencoder"], plain)
    np.testing.assert_allclose(np.asarray(out["images"]), np.clip(np.asarray(by_hand), -1, 1),
                               atol=1e-6)
    # Classifier guidance: a noise-conditional classifier of the latents steers the latent
    # chain exactly as it steers the UNet's chain on latents.
    from ddpm_jax.guidance import ClassifierApply
    from ddpm_jax.models.classifier import NoisyClassifier
    classifier = NoisyClassifier(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                 num_groups=4, classes=3)
    clf_params = jax.jit(lambda key: classifier.init(key, jnp.zeros((1, 4, 4, 2)),
                                                     jnp.zeros(1, jnp.int32), train=False))(
            jax.random.key(5))["params"]
    steer = dict(classifier=ClassifierApply(classifier), classifier_scale=50.0)
    options = spec_and_options(sampler="ddim", steps=3, clip_denoised=False)
    steered = sampling.make_sampler(sampling.ModelApply(model), schedule, (4, 4, 4, 2), **steer,
                                    **options)(params, jax.random.key(9), labels=labels,
                                               classifier_params=clf_params)
    plain = sampling.make_sampler(sampling.ModelApply(UNET), schedule, (4, 4, 4, 2), **steer,
                                  **options)(params["unet"], jax.random.key(9), labels=labels,
                                             classifier_params=clf_params)["images"]
    np.testing.assert_array_equal(np.asarray(steered["latents"]), np.asarray(plain))
    unsteered = sampling.make_sampler(sampling.ModelApply(UNET), schedule, (4, 4, 4, 2),
                                      **options)(params["unet"], jax.random.key(9),
                                                 labels=labels)["images"]
    assert np.abs(np.asarray(unsteered) - np.asarray(plain)).max() > 1e-4  # it steered


def test_the_autoencoder_objective_is_the_loss_on_the_steps_own_draw(nets):
    _, params, x, _ = nets
    config = digits.get_config("autoencoder_tiny")
    model = config_lib.model_from_config(config)
    settings = config_lib.step_config(config, model)
    assert settings.objective == "autoencoder" and model.factor == config.latent.factor
    zero = jnp.zeros((), jnp.int32)
    state = training.TrainState(step=zero, params=params["autoencoder"],
                                opt_state=settings.optimizer.init(params["autoencoder"]),
                                ema_params=params["autoencoder"], rng=jax.random.PRNGKey(0),
                                nonfinite_in_a_row=zero, nonfinite_total=zero)
    _, metrics = jax.jit(training.train_step, static_argnums=3)(
            state, {"image": x}, config_lib.schedule_from_config(config), settings)
    key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[2]
    loss, terms = jax.jit(lambda p: autoencoder_loss(x, AE.apply({"params": p}, x, key),
                                                     kl_weight=config.latent.kl_weight))(
            params["autoencoder"])
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), float(terms["kl"]), rtol=1e-5)


def test_batch_latents_depend_only_on_seed_and_step_so_a_resume_redraws_them(nets):
    _, params, x, moments = nets
    stage = latent.FirstStage(AE, params["autoencoder"], step=4, scale=0.5, seed=3)
    other = copy.deepcopy(stage)  # a resumed process: a new object, the same pinned values
    a, b = stage.encode({"image": x, "label": jnp.arange(4)}, 11), other.encode({"image": x}, 11)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    np.testing.assert_array_equal(np.asarray(a["label"]), np.arange(4))
    mean, log_var = (np.asarray(m, np.float64) for m in moments)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 11),
                                         mean.shape), np.float64)
    np.testing.assert_allclose(np.asarray(a["image"]), 0.5 * (mean + np.exp(0.5 * log_var) * noise),
                               atol=1e-5)
    assert not np.array_equal(np.asarray(stage.encode({"image": x}, 12)["image"]),
                              np.asarray(a["image"]))


def test_bad_first_stages_and_bits_per_dim_are_refused_in_one_line(tmp_path, nets):
    # One autoencoder run of 16px images, saved at step 2 of its 4 (convolutions take any size:
    # the fixture's weights serve).
    ae16 = digits.get_config("autoencoder_tiny")
    ae16.data.image_size = 16
    weights = nets[1]["autoencoder"]
    zero = jnp.zeros((), jnp.int32)
    state = training.TrainState(step=zero + 2, params=weights, opt_state=(), ema_params=weights,
                                rng=jax.random.PRNGKey(0), nonfinite_in_a_row=zero,
                                nonfinite_total=zero)
    manager = checkpoint.make_manager(str(tmp_path / "ae16"), max_to_keep=1)
    checkpoint.save(manager, 2, state, ae16)
    manager.wait_until_finished()
    manager.close()
    for path, step, pattern in (
            ("ae16", None, r"is not a finished run \(its newest checkpoint is step 2 of 4\): let "
                           r"it finish, or pin a step with --config.latent.autoencoder_step"),
            ("ae16", 2, r"trained for other images or latents than this run \(data.image_size: "
                        r"autoencoder 16, this run 8\): name an autoencoder"),
            ("missing", None, r"does not exist: train one with train.py --config "
                              r"configs/digits.py:autoencoder")):
        with pytest.raises(ValueError, match=pattern) as error:
            latent.load_autoencoder(_config(**{"latent.autoencoder": str(tmp_path / path)}),
                                    step=step)
        assert "\n" not in str(error.value)
    for metrics in (["fid", "bpd"], ["ode_bpd"]):
        with pytest.raises(ValueError, match=r"--metrics: .*bpd is refused on a latent run: its "
                                             r"chain's likelihood is that of the autoencoder's"):
            latent.check_metrics(_config(), metrics)
    latent.check_metrics(digits.get_config("tiny"), ["bpd"])  # a pixel run: allowed
    for changes, pattern in (
            ({"eval.every_steps": 5, "eval.metrics": "bpd,fid"}, r"config.eval.metrics: bpd is refused"),
            ({"sampling.clip_denoised": True}, r"clip_denoised=True: latents are not bounded"),
            ({"latent.factor": 3}, r"config.latent.factor=3: .* use a power of 2")):
        with pytest.raises(ValueError, match=pattern):
            config_lib.validate(_config(**changes))
    wrong = digits.get_config("autoencoder_tiny")
    wrong.latent.factor = 4
    with pytest.raises(ValueError, match=r"model.ch_mult=\(1, 2\) halves the image 2x: set "
                                         r"latent.factor=2"):
        config_lib.validate(wrong)


def test_a_latent_runs_model_takes_latents_and_old_configs_upgrade_to_pixel_runs():
    config = _config()
    config_lib.validate(config)
    assert config_lib.image_shape(config) == (4, 4, 2)
    assert config_lib.model_from_config(config).out_channels == 2
    saved = checkpoint.config_to_dict(digits.get_config("tiny"))
    del saved["latent"]
    upgraded = config_lib.upgrade(saved)
    assert upgraded.latent.autoencoder is None and not latent.is_latent(upgraded)


def test_masks_reach_the_latent_grid_known_only_where_a_whole_block_is_and_edits_are_checked(nets):
    rng = np.random.default_rng(4)
    mask = rng.uniform(size=(2, 8, 8, 1)) < 0.8
    expected = np.ones((2, 4, 4, 1), bool)
    for i in range(4):
        for j in range(4):  # a float64-free reference: the loop over each 2x2 block
            expected[:, i, j, 0] = mask[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0].all(axis=(1, 2))
    np.testing.assert_array_equal(latent.downsample_mask(mask, 2), expected)
    model, _, _, _ = nets
    for mode in latent.LATENT_EDITS:
        latent.check_edit(model, mode)
    with pytest.raises(ValueError, match=r"--style_ref is not available on a latent run: "
                                         r"StyleAligned's .* pixel runs only; use a pixel run"):
        latent.check_edit(model, "style")
    latent.check_edit(UNET, "views")  # a pixel run: every job


def _decoded(params, z):
    """z / scale through the fixture's decoder, clipped: the decode a latent chain ends with."""
    return np.clip(np.asarray(jax.jit(lambda p, z: AE.apply({"params": p}, z / 1.7,
                                                            method="decode"))(params, z)), -1, 1)


def test_by_class_edits_on_a_latent_run_are_the_pixel_edits_on_its_latents_then_decoded(nets):
    # Blended diffusion (the known latents re-drawn after every step) and Plug-and-Play (the
    # UNet's decoder features injected through the seam) on the LatentUNet equal the same
    # edits of its UNet on the same latents, decoded by hand; the same key, so bit for bit
    # before the decode.
    from ddpm_jax.editing import by_class, pnp
    from ddpm_jax.schedule import Schedule
    from ddpm_jax.spec import SamplerSpec
    model, params, _, _ = nets
    schedule = Schedule.create("linear", 50)
    z = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 4, 2)), jnp.float32)
    known = np.zeros((2, 4, 4, 1), bool)
    known[:, :2] = True
    spec = SamplerSpec(sampler="ddim", steps=4, clip_denoised=False)
    out = by_class.blended(sampling.ModelApply(model), params, schedule, spec, z, known, 1,
                           jax.random.key(3), strength=0.6, guidance=1.0)
    plain = by_class.blended(sampling.ModelApply(UNET), params["unet"], schedule, spec, z, known,
                             1, jax.random.key(3), strength=0.6, guidance=1.0)
    assert out.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(out), _decoded(params["autoencoder"], plain), atol=1e-6)
    edited = pnp.pnp(model, params, schedule, spec, z, 2, jax.random.key(4), feature_level=1,
                     feature_share=1.0, attn_share=0.5)
    by_unet = pnp.pnp(UNET, params["unet"], schedule, spec, z, 2, jax.random.key(4),
                      feature_level=1, feature_share=1.0, attn_share=0.5)
    np.testing.assert_array_equal(np.asarray(edited["latents"]), np.asarray(by_unet["latents"]))
    for name in ("images", "guides"):
        np.testing.assert_allclose(np.asarray(edited[name]),
                                   _decoded(params["autoencoder"], by_unet[name]), atol=1e-6)
    # The injection acted: the targets differ from what their label alone draws.
    alone = pnp.pnp(UNET, params["unet"], schedule, spec, z, 2, jax.random.key(4),
                    feature_level=1, feature_share=0.0, attn_share=0.0)
    assert np.abs(np.asarray(alone["images"]) - np.asarray(by_unet["images"])).max() > 1e-3


def _job_flags(**changes):
    """sample.py's editing flag values, all unset, then `changes`."""
    import types
    base = dict(inpaint=None, mask=None, jump_length=2, resamplings=2, sdedit=None,
                strength=None, encode=None, interpolate=None, lambdas=3, at_step=None,
                ddim_latent=False, grid_cells=None, progressive=None, labels=None,
                guidance=None, num_samples=2, classifier=None, diffedit=None, blend=None,
                pnp=None, from_label=None, to_label=None, feature_t=None, mask_threshold=None,
                attn_t=None, feature_level=None)
    return types.SimpleNamespace(**{**base, **changes})


@pytest.mark.slow
def test_a_latent_run_resumes_bit_for_bit_and_its_edits_take_pixels_in_and_out(tmp_path,
                                                                              digits_data_dir):
    import os
    import shutil

    from conftest import write_untrained_run
    from PIL import Image

    from ddpm_jax import loop, runs
    from ddpm_jax.editing import jobs as edit_jobs

    # A first stage at step 0 (perturbed weights), pinned: a finished run is not needed then.
    write_untrained_run(digits.get_config("autoencoder_tiny"), str(tmp_path / "ae"), perturb=0.05)

    def config():
        return _config(**{"latent.autoencoder": str(tmp_path / "ae"), "latent.autoencoder_step": 0,
                          "model.num_classes": 10, "training.label_dropout": 0.1,
                          "training.num_steps": 4, "training.checkpoint_every": 2,
                          "training.num_sample_images": 0, "data.data_dir": digits_data_dir})
    straight = loop.train_and_evaluate(config(), str(tmp_path / "straight"))
    # The same run resumed from its step-2 checkpoint (as if it had died before saving step 4):
    # the scale pinned in the checkpoint and the batches' latents drawn again by step.
    workdir = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", workdir)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))
    resumed = loop.train_and_evaluate(config(), workdir)
    assert int(resumed.step) == 4
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)

    # sample.py's jobs on it: pixel images in, the chain on latents, pixel images out (each
    # edit's chain against the UNet's own on latents: the tests above).
    saved, model, params = runs.load_for_sampling(workdir)
    assert isinstance(model, latent.LatentUNet) and saved.latent.scale is not None
    context = edit_jobs.Context.from_config(saved, model, params, flags=dict(steps=4),
                                            batch_size=2, seed=0, guidance=1.0)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
    np.savez(tmp_path / "x.npz", images=images)
    x = str(tmp_path / "x.npz")
    encoded = edit_jobs.run("encode", _job_flags(encode=x), context)
    assert encoded.images.shape == (2, 8, 8, 1) and encoded.extra["latents"].shape == (2, 4, 4, 2)
    for name, image in (("a.png", images[0]), ("b.png", images[1])):
        Image.fromarray(image[..., 0]).save(tmp_path / name)
    mixed = edit_jobs.run("interpolate", _job_flags(
            interpolate=[str(tmp_path / "a.png"), str(tmp_path / "b.png")], ddim_latent=True),
            context)
    assert mixed.images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(mixed.grid[0], images[0])
    # Masks: to the latent grid (known only where a whole 2x2 block is) and back to the pixels.
    top = np.zeros((2, 8, 8, 1), bool)
    top[:, :3] = True  # rows 0-2: only latent row 0 is kept whole
    kept = edit_jobs.chain_mask(context, top)
    assert kept.shape == (2, 4, 4, 1) and kept[:, 0].all() and not kept[:, 1:].any()
    shown = edit_jobs.pixel_mask(context, kept)
    np.testing.assert_array_equal(shown[:, :2], True)
    assert not shown[:, 2:].any()
    # One line each: a mask that keeps no whole block; an anagram of latents.
    checker = np.indices((8, 8)).sum(axis=0) % 2 * 255
    Image.fromarray(checker.astype(np.uint8)).save(tmp_path / "checker.png")
    with pytest.raises(ValueError, match=r"--mask keeps no whole 2x2 block of image 0: on a "
                                         r"latent run a latent position is kept only where"):
        edit_jobs.run("blend", _job_flags(blend=x, mask=str(tmp_path / "checker.png"),
                                          to_label=3), context)
    with pytest.raises(ValueError, match=r"--views is not available on a latent run: a view of "
                                         r"the latents .* is not that view of the decoded image"):
        latent.check_edit(model, "views")
