"""The config -> object builders, the one choice check, and the labels / guidance rule."""

import logging

import numpy as np
import pytest

from configs import digits
from ddpm_jax import config as config_lib
from ddpm_jax import labels, training
from ddpm_jax.parallel import round_up_to_devices
from ddpm_jax.schedule import Schedule


def _tiny():
    return digits.get_config("tiny")


@pytest.mark.parametrize("schedule,timesteps,beta_start,beta_end", [
    ("linear", 10, 1e-4, 0.02), ("cosine", 7, 1e-4, 0.02), ("linear", 1000, 3e-4, 0.05)])
def test_schedule_from_config_is_schedule_create_of_the_diffusion_fields(
        schedule, timesteps, beta_start, beta_end):
    config = _tiny()
    d = config.diffusion
    d.schedule, d.timesteps, d.beta_start, d.beta_end = schedule, timesteps, beta_start, beta_end
    built = config_lib.schedule_from_config(config)
    expected = Schedule.create(schedule, timesteps, beta_start=beta_start, beta_end=beta_end)
    assert built.num_timesteps == timesteps
    for name in ("betas", "alphas_cumprod", "posterior_variance"):
        np.testing.assert_array_equal(np.asarray(getattr(built, name)),
                                      np.asarray(getattr(expected, name)))


def test_image_shape_is_square_size_by_channels():
    config = _tiny()
    config.data.image_size, config.data.channels = 12, 3
    assert config_lib.image_shape(config) == (12, 12, 3)


@pytest.mark.parametrize("n,devices,expected", [
    (1, 1, 1), (5, 1, 5), (5, 4, 8), (8, 4, 8), (9, 8, 16), (1, 8, 8), (16, 3, 18)])
def test_round_up_to_devices_is_the_smallest_multiple_not_below_n(n, devices, expected):
    assert round_up_to_devices(n, devices) == expected
    assert expected % devices == 0 and expected >= n > expected - devices


def test_optimizer_from_config_takes_grad_clip_and_adam_eps():
    config = _tiny()
    config.training.grad_clip, config.training.adam_eps = 0.5, 1e-6
    # make_optimizer is memoised: the same arguments give the same object.
    assert config_lib.optimizer_from_config(config) is training.make_optimizer(grad_clip=0.5,
                                                                                adam_eps=1e-6)
    config.training.grad_clip = None  # no clipping
    assert config_lib.optimizer_from_config(config) is training.make_optimizer(grad_clip=0.0,
                                                                                adam_eps=1e-6)


def test_step_config_carries_the_training_and_diffusion_fields():
    config = _tiny()
    config.model.num_classes, config.training.label_dropout = 10, 0.1
    model = config_lib.model_from_config(config)
    settings = config_lib.step_config(config, model)
    t, d = config.training, config.diffusion
    assert settings == training.StepConfig(
            model=model, optimizer=config_lib.optimizer_from_config(config), base_lr=t.lr,
            warmup_steps=t.warmup_steps, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
            mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type, use_labels=True,
            label_dropout=0.1, microbatches=t.microbatches, objective="denoise",
            lr_decay="none", total_steps=None, loss_weight="uniform", min_snr_gamma=5.0)
    hash(settings)  # a static jit argument: hashable
    config.model.num_classes = None
    assert config_lib.step_config(config, model).use_labels is False
    t.lr_decay, t.loss_weight, t.min_snr_gamma = "cosine", "min_snr", 2.5
    got = config_lib.step_config(config, model)
    assert (got.lr_decay, got.loss_weight, got.min_snr_gamma) == ("cosine", "min_snr", 2.5)
    assert got.total_steps == t.num_steps   # only a decay needs the run's length
    saved = config.to_dict()
    for field in ("lr_decay", "loss_weight", "min_snr_gamma"):  # a run's config from before them
        del saved["training"][field]
    got = config_lib.step_config(config_lib.upgrade(saved), model)
    assert (got.lr_decay, got.loss_weight, got.min_snr_gamma) == ("none", "uniform", 5.0)
    config.model.kind, config.model.num_classes = "classifier", 10
    assert config_lib.step_config(config, model).objective == "classify"


def test_check_choice_names_the_field_and_the_choices():
    assert config_lib.check_choice("spacing", "time", ("time", "logsnr")) == "time"
    with pytest.raises(ValueError, match=r"^spacing='karras': choose one of \('time', 'logsnr'\)\.$"):
        config_lib.check_choice("spacing", "karras", ("time", "logsnr"))
    with pytest.raises(ValueError, match=r"^config.sampling.spacing='karras': use one of"):
        config_lib.check_choice("config.sampling.spacing", "karras", ("time",), verb="use")


@pytest.mark.parametrize("labels_, guidance, num_classes, names, message", [
    ("none", -1.0, 10, ("labels", "guidance"), r"^guidance=-1.0: use a finite number >= 0 and <= 1000 \(0: no guidance"),
    ("none", 1.5, 10, ("config.eval.labels", "config.eval.guidance"),
     r"^config\.eval\.guidance=1\.5 needs config\.eval\.labels: guidance steers each sample "
     r"towards its class, so set config\.eval\.labels='balanced' \(class n mod N\), or leave "
     r"config\.eval\.guidance unset\.$"),
    (None, 1.0, labels.UNKNOWN, ("--labels", "--guidance"), r"^--guidance=1.0 needs --labels: "),
    ("balanced", None, None, ("--labels", "--guidance"),
     r"^--labels='balanced' needs a class-conditional model, and this model is unconditional .*"
     r"use --labels='none'\.$"),
])
def test_the_labels_and_guidance_rule_names_the_fields_as_given(labels_, guidance, num_classes,
                                                                names, message):
    with pytest.raises(ValueError, match=message):
        labels.check_labels_and_guidance(labels_, guidance, num_classes, labels_name=names[0],
                                         guidance_name=names[1])


@pytest.mark.parametrize("labels_, guidance, num_classes", [
    ("none", None, None), (None, None, None), ("balanced", 0.0, 10), ("balanced", None, 3),
    ("balanced", 2.0, labels.UNKNOWN), ("3,7", 1.0, 10)])
def test_the_labels_and_guidance_rule_passes_valid_combinations(labels_, guidance, num_classes):
    labels.check_labels_and_guidance(labels_, guidance, num_classes)


def test_validate_applies_the_rule_to_config_eval():
    config = _tiny()
    config.model.num_classes, config.eval.labels, config.eval.guidance = 10, "balanced", 1.5
    config_lib.validate(config)
    config.eval.labels = "none"
    with pytest.raises(ValueError, match="config.eval.guidance=1.5 needs config.eval.labels"):
        config_lib.validate(config)


def test_sample_labels_expand_balanced_lists_and_the_deprecated_all(caplog):
    assert labels.sample_labels(labels.check_label_text(None), 10, 4) is None
    assert labels.sample_labels(labels.check_label_text(" none "), 10, 4) is None
    np.testing.assert_array_equal(labels.sample_labels("balanced", 3, 7), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(labels.sample_labels(labels.check_label_text("3,7"), 10, 5),
                                  [3, 7, 3, 7, 3])
    with caplog.at_level(logging.WARNING):
        assert labels.check_label_text("all", "--labels") == "balanced"
    assert "--labels=all is deprecated: write --labels=balanced" in caplog.text
    with pytest.raises(ValueError, match=r"^--labels=3,x: write 'balanced', 'none' or comma-sep"):
        labels.check_label_text("3,x", "--labels")
    with pytest.raises(ValueError, match=r"^--labels=10: this model has classes 0\.\.9\.$"):
        labels.sample_labels([10], 10, 2, name="--labels")
    with pytest.raises(ValueError, match="this model is unconditional"):
        labels.sample_labels([1], None, 2, name="--labels")


def test_validate_holds_the_loops_config_only_checks():
    config = _tiny()
    config.training.checkpoint_every, config.training.log_every = 6, 4
    config.training.steps_per_dispatch = 3
    with pytest.raises(ValueError, match=r"^config.training.steps_per_dispatch=3: it must divide "
                                         r"training.checkpoint_every=6 and training.log_every=4"):
        config_lib.validate(config)
    config.training.steps_per_dispatch = 2
    config_lib.validate(config)
    config.training.keep_every = 9
    with pytest.raises(ValueError, match=r"^config.training.keep_every=9: it keeps the checkpoints "
                                         r"at its multiples, so it must be a multiple of "
                                         r"training.checkpoint_every=6"):
        config_lib.validate(config)
    config.training.keep_every = 12
    config_lib.validate(config)


def test_evaluate_options_follow_the_same_spacing_rule():
    from ddpm_jax.evaluate import EvalOptions

    config = _tiny()
    config.sampling.sampler, config.sampling.spacing, config.sampling.steps = "dpm++", "logsnr", 20
    assert EvalOptions.from_config(config).sampler.spacing == "logsnr"
    assert EvalOptions.from_config(config, sampler=dict(sampler="ddim")).sampler.spacing == "time"
    assert EvalOptions.from_config(
            config, sampler=dict(sampler="ddim", spacing="logsnr")).sampler.spacing == "logsnr"


@pytest.mark.parametrize("name, variant", [
    *[(name, variant) for name in ("cifar10", "celebahq", "lsun_bedroom", "lsun_cat",
                                   "lsun_church", "digits") for variant in (None, "tiny")],
    *[("digits", variant) for variant in ("16px", "classifier", "classifier_tiny", "cond",
                                          "cond_tiny", "cond_without9", "finetune",
                                          "finetune_tiny", "autoencoder", "autoencoder_tiny",
                                          "autoencoder16", "latent", "latent_tiny",
                                          "latent16")]])
def test_every_shipped_config_and_variant_validates(name, variant):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config_lib.validate(config)
    if variant in ("cond", "cond_tiny"):
        # The one class-conditional digits config: labels 0..9, label dropout for guidance,
        # the rest of the default run unchanged.
        default = importlib.import_module("configs.digits").get_config(
            "tiny" if variant.endswith("tiny") else None)
        assert config.model.num_classes == 10 and config.training.label_dropout == 0.1
        assert config.eval.labels == "balanced"
        config.model.num_classes, config.eval.labels = None, "none"
        assert config.to_dict() == default.to_dict()
