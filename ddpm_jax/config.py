"""Start-up checks of an experiment config, and the config -> object builders.

`validate(config)` raises ValueError naming the field, its value and the fix, before anything
expensive runs. The builders (`model_from_config`, `schedule_from_config`, `image_shape`,
`optimizer_from_config`, `step_config`; `spec.SamplerSpec.from_config`) are the one place where
a config becomes library arguments: library code never reads a ConfigDict; only the command
lines and the loop do, through these. `upgrade` brings the stored config of an older run up to
date.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections

from ddpm_jax import control as control_lib
from ddpm_jax import latent as latent_lib
from ddpm_jax import training as training_lib
from ddpm_jax.diffusion import LOSS_TYPES, LOSS_WEIGHTS, MEAN_TYPES, VAR_TYPES
from ddpm_jax.labels import LABEL_MODES, check_labels_and_guidance
from ddpm_jax.models.classifier import NoisyClassifier
from ddpm_jax.models.unet import UNet, check_architecture
from ddpm_jax.plans import DPM_SOLVERS, SPACINGS
from ddpm_jax.schedule import SCHEDULES, Schedule
from ddpm_jax.spec import SAMPLERS, SamplerSpec, check_choice  # noqa: F401 (check_choice: re-export)

LEARNED_VAR_TYPES = ("learned", "learned_range")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SECTIONS = ("model", "diffusion", "data", "training", "sampling", "eval", "distill", "finetune",
            "lora", "control", "latent")
MODEL_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "out_channels",
                "num_classes", "remat", "resamp_with_conv", "num_groups", "kind")
MODEL_KINDS = ("unet", "classifier", latent_lib.KIND)


class ConfigError(ValueError):
    """A config value that cannot work on this run's setup (e.g. a batch that does not split over
    the devices): an expected mistake, reported in one line naming the field and the fix."""


class _Checker:
    """Checks the fields of one config section; every failure names `section.field`."""

    def __init__(self, config: Any, section: str):
        if section not in config:
            raise ValueError(f"config has no `{section}` section: start from configs/base.py get_config().")
        self.values: Mapping[str, Any] = config[section]
        self.section = section

    def get(self, field: str) -> Any:
        if field not in self.values:
            raise ValueError(f"config.{self.section} has no field `{field}`: add it (see configs/base.py).")
        return self.values[field]

    def fail(self, field: str, fix: str) -> ValueError:
        return ValueError(f"config.{self.section}.{field}={self.values[field]!r}: {fix}.")

    def choice(self, field: str, choices: Sequence[Any]) -> Any:
        return check_choice(f"config.{self.section}.{field}", self.get(field), choices, verb="use")

    def integer(self, field: str, minimum: int | None = None, optional: bool = False) -> int | None:
        value = self.get(field)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, "use an integer" + (" or None" if optional else ""))
        if minimum is not None and value < minimum:
            raise self.fail(field, f"use an integer >= {minimum}")
        return value

    def number(self, field: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               optional: bool = False) -> float | None:
        value = self.get(field)
        if value is None and optional:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(field, "use a number" + (" or None" if optional else ""))
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        if not math.isfinite(value):  # NaN passes every comparison below
            raise self.fail(field, f"use a finite value in {interval}")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise self.fail(field, f"use a value in {interval}")
        return float(value)

    def boolean(self, field: str) -> bool:
        value = self.get(field)
        if not isinstance(value, bool):
            raise self.fail(field, "use True or False")
        return value

    def int_tuple(self, field: str, minimum: int, nonempty: bool) -> tuple[int, ...]:
        value = self.get(field)
        if (not isinstance(value, (tuple, list)) or (nonempty and not value)
                or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in value)):
            raise self.fail(field, f"use a {'non-empty ' if nonempty else ''}tuple of integers >= {minimum}")
        return tuple(value)


def validate(config: Any) -> None:
    """Raises ValueError for the first bad value in an experiment config (see configs/base.py),
    section by section."""
    for section in SECTIONS:
        _Checker(config, section)
    _validate_data(_Checker(config, "data"))
    _validate_diffusion(_Checker(config, "diffusion"))
    latent_lib.validate(config)  # config.latent (autoencoder and latent runs): before the shapes
    _validate_model(_Checker(config, "model"), config)
    _validate_training(_Checker(config, "training"), config)
    _validate_sampling(_Checker(config, "sampling"), config)
    _validate_eval(_Checker(config, "eval"), config)
    _validate_distill(_Checker(config, "distill"), config)
    _validate_finetune(_Checker(config, "finetune"), _Checker(config, "lora"), config)
    control_lib.validate(_Checker(config, "control"), config)


def _validate_data(data: _Checker) -> None:
    from ddpm_jax import data as data_lib  # here, not at the top: it imports TFDS (seconds)

    dataset = data.get("dataset")
    if not (dataset in data_lib.NAMES or (isinstance(dataset, str) and dataset.startswith("tfds:"))):
        raise data.fail("dataset", f"use one of {data_lib.NAMES} or 'tfds:<name>'")
    data.integer("image_size", 1)
    data.integer("channels", 1)
    data.boolean("random_flip")
    if data.get("data_dir") is not None and not isinstance(data.get("data_dir"), str):
        raise data.fail("data_dir", "use a path string or None")
    data.int_tuple("exclude_labels", 0, nonempty=False)


def _validate_diffusion(diffusion: _Checker) -> None:
    diffusion.integer("timesteps", 1)
    diffusion.choice("schedule", SCHEDULES)
    beta_start = diffusion.number("beta_start", 0.0, 1.0, low_open=True, high_open=True)
    diffusion.number("beta_end", beta_start, 1.0, high_open=True)
    diffusion.choice("mean_type", MEAN_TYPES)
    var_type = diffusion.choice("var_type", VAR_TYPES)
    loss_type = diffusion.choice("loss_type", LOSS_TYPES)
    if loss_type == "mse" and var_type in LEARNED_VAR_TYPES:
        # The official code asserts this too: L_simple gives the variance output no gradient.
        raise diffusion.fail("var_type", "a learned variance needs loss_type='kl' or 'hybrid'; with "
                             "loss_type='mse' use var_type='fixedlarge' or 'fixedsmall'")
    if loss_type == "hybrid" and var_type not in LEARNED_VAR_TYPES:
        raise diffusion.fail("loss_type", f"'hybrid' trains a learned variance: set diffusion.var_type "
                             f"to one of {LEARNED_VAR_TYPES}, or use loss_type='mse'")


def _validate_model(model: _Checker, config: Any) -> None:
    unknown = sorted(set(model.values) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}: config.model holds exactly the UNet "
                         f"arguments {MODEL_FIELDS}.")
    ch = model.integer("ch", 1)
    ch_mult = model.int_tuple("ch_mult", 1, nonempty=True)
    model.integer("num_res_blocks", 1)
    attn_resolutions = model.int_tuple("attn_resolutions", 1, nonempty=False)
    model.number("dropout", 0.0, 1.0, high_open=True)
    out_channels = model.integer("out_channels", 1, optional=True)
    num_classes = model.integer("num_classes", 1, optional=True)
    kind = model.choice("kind", MODEL_KINDS)
    if kind == "classifier":
        if num_classes is None:
            raise model.fail("num_classes", "kind='classifier' predicts num_classes classes: set "
                             "it (10 for digits)")
        if out_channels is not None:
            raise model.fail("out_channels", "a classifier outputs num_classes logits: leave it None")
    model.boolean("remat")
    model.boolean("resamp_with_conv")
    num_groups = model.integer("num_groups", 1)
    check_architecture(image_shape(config)[0], ch, ch_mult, attn_resolutions, num_groups)
    var_type, channels = config.diffusion.var_type, image_shape(config)[-1]
    needed = 2 * channels if var_type in LEARNED_VAR_TYPES else channels
    if out_channels is not None and out_channels != needed:
        raise model.fail("out_channels", f"diffusion.var_type={var_type!r} with data.channels={channels} "
                         f"needs {needed} output channels: set it to {needed} or None")


def _validate_training(training: _Checker, config: Any) -> None:
    inf = float("inf")
    batch_size = training.integer("batch_size", 1)
    training.number("lr", 0.0, inf, low_open=True)
    training.integer("warmup_steps", 0)
    training.number("grad_clip", 0.0, inf, low_open=True, optional=True)
    training.number("ema_decay", 0.0, 1.0, high_open=True)
    training.boolean("ema_warmup")
    num_steps = training.integer("num_steps", 1)
    warmup = training.get("warmup_steps")
    if training.choice("lr_decay", training_lib.LR_DECAYS) != "none" and num_steps <= warmup:
        raise training.fail("lr_decay", f"a decay after the warmup needs training.num_steps="
                            f"{num_steps} > training.warmup_steps={warmup}: shorten the warmup "
                            "or use lr_decay='none'")
    loss_weight = training.choice("loss_weight", LOSS_WEIGHTS)
    training.number("min_snr_gamma", 0.0, inf, low_open=True)
    if loss_weight != "uniform" and (config.diffusion.loss_type == "kl"
                                     or config.diffusion.mean_type == "xprev"):
        raise training.fail("loss_weight", "it weighs the regression loss of eps / xstart / v "
                            "predictions; with diffusion.loss_type='kl' or mean_type='xprev' use "
                            "'uniform'")
    training.number("adam_eps", 0.0, inf, low_open=True)
    training.integer("seed")
    training.integer("keep_every", 1, optional=True)
    training.integer("grid_tile_px", 1)
    for field in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints",
                  "max_nonfinite_in_a_row", "steps_per_dispatch"):
        training.integer(field, 1)
    k, every = training.get("steps_per_dispatch"), training.get("checkpoint_every")
    if every % k or training.get("log_every") % k:
        raise training.fail("steps_per_dispatch", f"it must divide training.checkpoint_every={every} "
                            f"and training.log_every={training.get('log_every')}: pick a divisor of both")
    keep_every = training.get("keep_every")
    if keep_every is not None and keep_every % every:
        raise training.fail("keep_every", "it keeps the checkpoints at its multiples, so it must be "
                            f"a multiple of training.checkpoint_every={every}; or None to keep no "
                            "milestones")
    training.integer("num_sample_images", 0)
    training.number("label_dropout", 0.0, 1.0)
    microbatches = training.integer("microbatches", 1)
    if batch_size % microbatches:
        raise training.fail("microbatches", f"it must divide training.batch_size={batch_size} into "
                            "equal slices: pick a divisor of the batch, or 1 for no accumulation")
    training.choice("compute_dtype", tuple(COMPUTE_DTYPES))
    if config.model.kind == "classifier":
        for field, why in (("label_dropout", "labels are its targets"),
                           ("num_sample_images", "it draws no samples")):
            if training.get(field):
                raise training.fail(field, f"set it to 0 for model.kind='classifier' ({why})")


def _validate_sampling(sampling: _Checker, config: Any) -> None:
    """The field types here; what the sampler makes of them (orders, steps against T, eta,
    spacing) by building its SamplerSpec and plan, whose error is reported with the section."""
    sampling.choice("sampler", SAMPLERS)
    steps = sampling.get("steps")  # None: all T; an int S; or a respacing string such as 'ddim50'
    if steps is not None and not isinstance(steps, (int, str)) or isinstance(steps, bool):
        raise sampling.fail("steps", "use None, an int S, or e.g. 'ddim50'")
    sampling.integer("order", 1)
    sampling.number("eta", 0.0, 1.0)
    sampling.boolean("clip_denoised")
    sampling.number("threshold", 0.0, 1.0, low_open=True, high_open=True, optional=True)
    if sampling.get("var_type") is not None:
        sampling.choice("var_type", (None, "fixedlarge", "fixedsmall", config.diffusion.var_type))
    sampling.choice("spacing", SPACINGS)
    sampling.integer("batch_size", 1)
    sampler = sampling.get("sampler")
    try:
        # The order field is DPM-Solver++'s whichever sampler the config names (a --sampler
        # override may pick the solver): checked against the solver that would use it.
        SamplerSpec(sampler=sampler if sampler in DPM_SOLVERS else "dpm++",
                    order=sampling.get("order"))
        SamplerSpec.from_config(config).plan(schedule_from_config(config))
    except ValueError as error:
        raise ValueError(f"config.sampling (sampler {sampling.get('sampler')!r}): {error}") from None


def _validate_eval(evaluation: _Checker, config: Any) -> None:
    inf = float("inf")
    evaluation.integer("every_steps", 0)
    if not isinstance(evaluation.get("metrics"), str) or not evaluation.get("metrics"):
        raise evaluation.fail("metrics", "use a comma-separated string such as 'bpd,fid,is'")
    for field in ("feature_net", "inception_weights"):
        if evaluation.get(field) is not None and not isinstance(evaluation.get(field), str):
            raise evaluation.fail(field, "use a string or None")
    evaluation.integer("fid_num_samples", 1)
    evaluation.choice("fid_reference", ("train", "test"))
    evaluation.integer("fid_batch_size", 1)
    check_labels_and_guidance(evaluation.choice("labels", LABEL_MODES),
                              evaluation.number("guidance", 0.0, inf, optional=True),
                              config.model.num_classes, labels_name="config.eval.labels",
                              guidance_name="config.eval.guidance")
    if config.model.kind == "classifier" and evaluation.get("every_steps"):
        raise evaluation.fail("every_steps", "set it to 0 for model.kind='classifier' (evaluation "
                              "scores samples)")
    evaluation.choice("bpd_split", ("train", "test"))
    evaluation.integer("bpd_num_images", 1, optional=True)
    evaluation.integer("bpd_batch_size", 1)


def _validate_distill(distill: _Checker, config: Any) -> None:
    """The distillation section (`ddpm_jax.distill`); the teacher run itself is checked when the
    run starts (`runs.load_teacher`)."""
    from ddpm_jax import distill as distill_lib

    teacher = distill.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise distill.fail("teacher", "use the teacher run's work dir, or None for an ordinary run")
    distill.integer("teacher_step", 0, optional=True)
    steps = distill.get("teacher_steps")
    try:
        distill_lib.check_teacher_steps(steps, config.diffusion.timesteps,
                                        name="config.distill.teacher_steps")
    except ValueError as error:
        raise ValueError(str(error)) from None
    rounds = distill.integer("rounds", 1)
    distill.integer("first_round_steps", 1, optional=True)
    if steps % 2 ** rounds:
        raise distill.fail("rounds", f"teacher_steps={steps} halves only "
                           f"{(steps & -steps).bit_length() - 1} times into whole steps: use fewer "
                           "rounds or a teacher_steps with more factors of 2 (e.g. 64)")
    sampler = distill.choice("teacher_sampler", SAMPLERS)
    eta = distill.number("teacher_eta", 0.0, 1.0)
    if sampler in ("ddpm", "dpm++sde") or eta:
        raise distill.fail("teacher_sampler" if sampler != "ddim" else "teacher_eta",
                           "a stochastic teacher chain has no deterministic two-step map to "
                           "distil: use teacher_sampler='ddim' with teacher_eta=0")
    if sampler != "ddim":
        raise distill.fail("teacher_sampler", "a multistep solver's step depends on earlier "
                           "steps: distil its one-step form, teacher_sampler='ddim'")
    if teacher is None:
        return
    if config.model.kind != "unet":
        raise ValueError(f"config.model.kind={config.model.kind!r}: distillation trains a "
                         "denoiser student; use model.kind='unet' or distill.teacher=None.")
    if config.diffusion.mean_type not in distill_lib.STUDENT_MEAN_TYPES:
        raise ValueError(f"config.diffusion.mean_type={config.diffusion.mean_type!r}: a "
                         f"distillation student predicts one of {distill_lib.STUDENT_MEAN_TYPES} "
                         "('v', the paper's, is the default of configs/digits.py:distill).")


def _validate_finetune(finetune: _Checker, lora: _Checker, config: Any) -> None:
    """The fine-tuning sections (`ddpm_jax.finetune`); the base run and the images are checked
    when the run starts."""
    from ddpm_jax.adapters import LORA_GROUPS, METHODS

    base = finetune.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        raise finetune.fail("base", "use the base run's work dir, or None for an ordinary run")
    finetune.integer("base_step", 0, optional=True)
    method = finetune.choice("method", METHODS)
    images = finetune.get("images")
    if images is not None and not isinstance(images, str):
        raise finetune.fail("images", "use the path of a PNG grid or a uint8 .npz")
    finetune.integer("grid_cells", 1, optional=True)
    new_class = finetune.boolean("new_class")
    label = finetune.integer("label", 0, optional=True)
    finetune.number("prior_weight", 0.0, 1e6)
    finetune.integer("prior_samples", 0)
    finetune.number("row_lr_scale", 0.0, 1e6, low_open=True)
    finetune.boolean("row_ema_warmup")
    lora.integer("rank", 1)
    lora.number("alpha", 0.0, 1e6, low_open=True)
    targets = lora.get("targets")
    if (not isinstance(targets, (tuple, list)) or not targets
            or any(t not in LORA_GROUPS for t in targets)):
        raise lora.fail("targets", f"use a non-empty tuple of {tuple(LORA_GROUPS)}")
    if base is None:
        return
    if images is None:
        raise finetune.fail("images", "name the images to fine-tune on (a PNG grid with "
                            "finetune.grid_cells, or an .npz of uint8 'images')")
    if new_class and label is not None:
        raise finetune.fail("label", "new_class=True teaches a new class id; set "
                            "finetune.new_class=False to teach an existing class, or label=None")
    if method == "embedding" and not new_class and label is None:
        raise finetune.fail("method", "embedding trains one class's row: set new_class=True or "
                            "a label")
    if config.distill.teacher is not None:
        raise finetune.fail("base", "a run either distils (distill.teacher) or fine-tunes; "
                            "set one of them to None")
    if model_kind(config) != "unet":
        raise finetune.fail("base", "fine-tuning trains a denoiser; use model.kind='unet'")


# Fields added to configs/base.py after its first release, each with the value that runs made
# before it ran with (label_dropout: none existed, so 0.0, not today's default 0.1).
ADDED_FIELDS = {
    "model.kind": "unet", "training.ema_warmup": False, "training.grid_tile_px": 64,
    "training.label_dropout": 0.0, "training.loss_weight": "uniform", "training.lr_decay": "none",
    "training.microbatches": 1, "training.min_snr_gamma": 5.0, "sampling.spacing": "time",
    "sampling.order": 2, "sampling.threshold": None, "eval.every_steps": 0, "eval.labels": "none",
    "eval.guidance": None, "distill.teacher": None, "distill.teacher_step": None,
    "distill.teacher_steps": 64, "distill.teacher_sampler": "ddim", "distill.teacher_eta": 0.0,
    "distill.rounds": 1, "distill.first_round_steps": None, "data.exclude_labels": (),
    "finetune.base": None, "finetune.base_step": None, "finetune.method": "full", "finetune.images": None,
    "finetune.grid_cells": None, "finetune.new_class": True, "finetune.label": None,
    "finetune.prior_weight": 1.0, "finetune.prior_samples": 500,
    "finetune.row_lr_scale": 1.0, "finetune.row_ema_warmup": False, "lora.rank": 4,
    "lora.alpha": 4.0, "lora.targets": ("attn", "time", "conv"),
    "control.base": None, "control.base_step": None, "control.kind": "lowres",
    "control.factor": 2, "control.hint_channels": (16, 16), "control.condition": False,
    "control.condition_dropout": 0.1, "control.data_file": None, "control.channels": None,
    "latent.autoencoder": None,
    "latent.autoencoder_step": None, "latent.scale": None, "latent.factor": 2,
    "latent.channels": 2, "latent.kl_weight": 1e-6, "latent.reconstruction": "l1",
}
ADDED_SECTIONS = ("distill", "finetune", "lora", "control", "latent")  # sections added whole: an older config gets them from ADDED_FIELDS


def upgrade(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config stored with a run (plain JSON types), brought up to date: every field of
    ADDED_FIELDS it lacks gets the value its run was made with. The one place that knows how
    older configs differ; everything downstream reads today's fields."""
    config = ml_collections.ConfigDict(copy.deepcopy(dict(saved)))
    for path, value in ADDED_FIELDS.items():
        section, field = path.split(".")
        if section not in config and section in ADDED_SECTIONS:
            with config.unlocked():
                config[section] = {}
        if section in config and field not in config[section]:
            with config.unlocked():
                config[section][field] = value
    return config


def model_kind(config: Any) -> str:
    """config.model.kind: 'unet' (the denoiser), 'classifier' or 'autoencoder' (a first stage)."""
    return config.model.kind


def model_from_config(config: Any) -> UNet:
    """The UNet of a (validated) config: out_channels from data.channels and diffusion.var_type,
    dtype from training.compute_dtype; kind 'classifier': the NoisyClassifier with num_classes
    outputs."""
    kwargs = dict(config.model)
    kind = kwargs.pop("kind", "unet")
    if kind == latent_lib.KIND:
        return latent_lib.autoencoder(config, COMPUTE_DTYPES[config.training.compute_dtype])
    kwargs["ch_mult"] = tuple(kwargs["ch_mult"])
    kwargs["attn_resolutions"] = tuple(kwargs["attn_resolutions"])
    if kind == "classifier":
        classes = kwargs.pop("num_classes")
        return NoisyClassifier(**kwargs, classes=classes,
                               dtype=COMPUTE_DTYPES[config.training.compute_dtype])
    if kwargs.get("out_channels") is None:
        learned = config.diffusion.var_type in LEARNED_VAR_TYPES
        kwargs["out_channels"] = image_shape(config)[-1] * (2 if learned else 1)
    kwargs.update(control_lib.model_options(config))
    return UNet(**kwargs, dtype=COMPUTE_DTYPES[config.training.compute_dtype])


def schedule_from_config(config: Any) -> Schedule:
    """The beta schedule of config.diffusion (schedule, timesteps, beta_start, beta_end)."""
    d = config.diffusion
    return Schedule.create(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def image_shape(config: Any) -> tuple[int, int, int]:
    """(H, W, C) of the model's input: square data.image_size pixels, data.channels channels;
    on a latent run the latents' (`latent.latent_shape`)."""
    if latent_lib.is_latent(config):
        return latent_lib.latent_shape(config)
    return (config.data.image_size, config.data.image_size, config.data.channels)


def optimizer_from_config(config: Any) -> Any:
    """`training.make_optimizer` with config.training's grad_clip (None: off) and adam_eps."""
    return training_lib.make_optimizer(grad_clip=config.training.grad_clip or 0.0,
                                       adam_eps=config.training.adam_eps)


def step_config(config: Any, model: Any, teacher_mean_type: str = "eps",
                transform: Any = None) -> training_lib.StepConfig:
    """The settings of `training.train_step` for a config (hashable: a static jit argument).
    With config.distill.teacher the objective is "distill" on distill.teacher_steps, the
    teacher's output read as `teacher_mean_type` (its run's diffusion.mean_type) and its x0
    clipped as config.sampling.clip_denoised says. transform: a fine-tuning run's
    (`finetune.resolve`), None otherwise."""
    t, d = config.training, config.diffusion
    distilling = config.distill.teacher is not None
    lr_decay = t.lr_decay
    return training_lib.StepConfig(model=model, optimizer=optimizer_from_config(config), base_lr=t.lr,
                warmup_steps=t.warmup_steps, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
                # total_steps only shapes a decay: without one, a resume that extends
                # num_steps keeps the compiled step.
                lr_decay=lr_decay, total_steps=None if lr_decay == "none" else t.num_steps,
                loss_weight=t.loss_weight, min_snr_gamma=float(t.min_snr_gamma),
                mean_type=d.mean_type,
                var_type=d.var_type, loss_type=d.loss_type,
                use_labels=config.model.num_classes is not None, label_dropout=t.label_dropout,
                microbatches=t.microbatches,
                objective=("classify" if model_kind(config) == "classifier" else
                           "autoencoder" if model_kind(config) == latent_lib.KIND else
                           "distill" if distilling else "denoise"),
                kl_weight=float(config.latent.kl_weight),
                reconstruction=config.latent.reconstruction,
                teacher_steps=config.distill.teacher_steps if distilling else 0,
                teacher_mean_type=teacher_mean_type, teacher_clip=config.sampling.clip_denoised,
                transform=transform, control=control_lib.step_spec(config, model))
