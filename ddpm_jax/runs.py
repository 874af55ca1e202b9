"""Loading a run for sampling and evaluation: the parameters of one step of a run's checkpoints
(or a diffusers folder), its model rebuilt from the config stored with them (`config.upgrade`d),
and the guiding classifier of classifier guidance. A run that is still training may rotate a
step away while it loads: the newest one is then taken instead, and the log says so."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import checkpoint, latent, parallel, training
from ddpm_jax import config as config_lib

PyTree = Any


def load_for_sampling(workdir: str | None, weights: str = "ema", *, step: int | None = None,
                      sharding: jax.sharding.Sharding | None = None,
                      diffusers_dir: str | None = None
                      ) -> tuple[ml_collections.ConfigDict, Any, PyTree]:
    """(config, model, params) for sampling and evaluation: of a run's checkpoint in `workdir`,
    or of a diffusers UNet2DModel folder `diffusers_dir` (`convert.load_diffusers_run`: the
    paper's settings, its weights as they are). The one loader of the scripts.

    weights: "ema" (the paper evaluates the EMA) or "raw"; step: default the latest.
    Only the requested parameters are read, placed with `sharding` (default: replicated over
    every device). The model is rebuilt from the checkpoint's own config (`config.upgrade`d).
    """
    if (workdir is None) == (diffusers_dir is None):
        raise ValueError("Pass exactly one of a work dir and a diffusers_dir.")
    if diffusers_dir is not None:
        from ddpm_jax import convert  # reads PyTorch / safetensors files: only when asked
        return convert.load_diffusers_run(diffusers_dir)
    return load_step_for_sampling(workdir, weights, step=step, sharding=sharding)[1:]


ROTATION_RETRIES = 5  # newest steps rotated away while loading, in a row, before giving up


def load_step_for_sampling(workdir: str, weights: str = "ema", *, step: int | None = None,
                           sharding: jax.sharding.Sharding | None = None
                           ) -> tuple[int, ml_collections.ConfigDict, Any, PyTree]:
    """(step, config, model, params): `load_for_sampling` and the step it loaded. With step
    None, a newest step that a running trainer rotates away while it loads (its
    keep_checkpoints) is retried on the then-newest one, with a warning saying so."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: choose 'ema' (the EMA, used for the paper's "
                         "samples) or 'raw' (the trained parameters).")
    for _ in range(ROTATION_RETRIES):
        manager = checkpoint.make_manager(workdir, max_to_keep=1, read_only=True)
        chosen = step if step is not None else manager.latest_step()
        if chosen is None:
            raise FileNotFoundError(f"No checkpoint in {manager.directory}: train first "
                                    f"(python train.py --workdir {workdir}).")
        if chosen not in manager.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {manager.directory}; it "
                                    f"holds steps {list(manager.all_steps())}.")
        try:
            return (chosen, *_load_params(manager, chosen, weights, sharding, workdir))
        except checkpoint.CheckpointError:
            if (manager.directory / str(chosen)).exists():
                raise  # damaged, not rotated: the error says so
        rotated = (f"The checkpoint at step {chosen} in {manager.directory} was rotated away "
                   "while loading (a running trainer keeps only its newest checkpoints)")
        if step is not None:
            raise checkpoint.CheckpointError(f"{rotated}: pass a newer --step, or none for the newest.")
        logging.warning("%s; loading the newest one instead.", rotated)
    raise checkpoint.CheckpointError(f"The newest checkpoint in {checkpoint.checkpoint_dir(workdir)} was rotated away "
                          f"while loading {ROTATION_RETRIES} times in a row: the trainer saves "
                          "faster than this loads; copy a checkpoint to another --workdir, or "
                          "raise training.keep_checkpoints.")


def _load_params(manager: ocp.CheckpointManager, step: int, weights: str,
                 sharding: jax.sharding.Sharding | None, workdir: str
                 ) -> tuple[ml_collections.ConfigDict, Any, PyTree]:
    """(config, model, params) of `step`; closes the manager."""
    try:
        checksums = checkpoint.read_checksums(manager, step)
        saved = checkpoint.restore_config(manager, step, checksums)
    except checkpoint.CheckpointError:
        manager.close()
        raise
    warn_if_config_file_differs(workdir, saved, step)
    config = config_lib.upgrade(saved)
    model = config_lib.model_from_config(config)
    image_shape = config_lib.image_shape(config)
    shapes = jax.eval_shape(lambda rng: training.init_params(model, rng, image_shape),
                            jax.random.PRNGKey(0))
    if sharding is None:
        sharding = parallel.replicated(parallel.make_mesh())
    base = config.finetune.base or config.control.base
    if base is not None:  # its trainable tree merged into its base run's
        from ddpm_jax import control, finetune
        load_merged = finetune.load_merged if config.finetune.base else control.load_merged
        try:
            params = load_merged(config, manager, step, weights, sharding, checksums)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{workdir} starts from {base}, which cannot be "
                                             f"loaded: {e}") from None
        except Exception as e:
            raise checkpoint.unreadable(manager, step, f"the {weights} parameters", e) from e
        finally:
            manager.close()
        logging.info("Loaded the %s parameters of step %d from %s, merged into its base run %s.",
                     weights, step, manager.directory, base)
        return config, model, params
    try:
        params = checkpoint.restore_weights(manager, step, shapes, weights, sharding, checksums)
    except checkpoint.CheckpointError:
        raise
    except Exception as e:
        raise checkpoint.unreadable(manager, step, f"the {weights} parameters", e) from e
    finally:
        manager.close()
    logging.info("Loaded the %s parameters of step %d from %s.", weights, step, manager.directory)
    if latent.is_latent(config) and config_lib.model_kind(config) == "unet":
        try:  # a latent run samples through its autoencoder's decoder (latent.LatentUNet)
            model, params = latent.with_first_stage(config, model, params, sharding)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{workdir} is a latent run whose autoencoder "
                                             f"cannot be loaded: {e}") from None
    return config, model, params


def load_classifier(workdir: str, *, image_shape: tuple[int, int, int], timesteps: int,
                    flag: str = "--classifier") -> tuple[Any, PyTree]:
    """(guidance.ClassifierApply, EMA params) of a noise-conditional classifier run (model.kind
    'classifier') that can guide a model of images `image_shape` (H, W, C) diffused over
    `timesteps` steps. ValueError with one line naming `flag` otherwise. The one loader of a
    guiding classifier."""
    from ddpm_jax.guidance import ClassifierApply

    where = f"{flag}={workdir}"
    if not os.path.isdir(workdir):
        raise ValueError(f"{where} does not exist; train one with train.py --config "
                         "configs/digits.py:classifier.")
    try:
        config, model, params = load_for_sampling(workdir, "ema")
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise ValueError(f"{where}: {' '.join(str(e).split())}") from None
    if config_lib.model_kind(config) != "classifier":
        raise ValueError(f"{where} is a denoiser run (model.kind='unet'), not a classifier; "
                         "train one with --config configs/digits.py:classifier.")
    if config_lib.image_shape(config) != tuple(image_shape):
        raise ValueError(f"{where} takes {config_lib.image_shape(config)} images, the model "
                         f"makes {tuple(image_shape)}; train the classifier on the model's data "
                         "and size.")
    if config.diffusion.timesteps != timesteps:
        raise ValueError(f"{where} was trained on T={config.diffusion.timesteps} timesteps, the "
                         f"model on T={timesteps}.")
    return ClassifierApply(model), params


# What a student shares with its teacher: the network (dropout and remat change no parameter)
# and the noise schedule; the mean type may differ (the student's output is read its own way).
TEACHER_MODEL_FIELDS = tuple(f for f in config_lib.MODEL_FIELDS if f not in ("dropout", "remat"))
TEACHER_DIFFUSION_FIELDS = ("timesteps", "schedule", "beta_start", "beta_end")


def field_differences(theirs: ml_collections.ConfigDict, ours: ml_collections.ConfigDict,
                      section: str, fields: tuple[str, ...], who: str,
                      this: str = "this run") -> list[str]:
    """'section.field: <who> a, <this> b' for each of `fields` of config `section` where the
    other run's config (`theirs`) and this one (`ours`) differ; tuples and lists compare equal."""
    return [f"{section}.{f}: {who} {theirs[section][f]!r}, {this} {ours[section][f]!r}"
            for f in fields if _plain(theirs[section][f]) != _plain(ours[section][f])]


def load_base_run(workdir: str, config: ml_collections.ConfigDict, *, flag: str,
                  step: int | None = None, sharding: jax.sharding.Sharding | None = None,
                  same_mean_type: bool = False
                  ) -> tuple[int, ml_collections.ConfigDict, PyTree]:
    """(step, config, EMA params) of a trained denoiser run that another run starts from (a
    distillation's teacher, a fine-tuning's base); ValueError with one line naming `flag` when
    there is no run there, it is a classifier, or it has another schedule, image shape (or,
    with same_mean_type, another mean and variance type) than `config`."""
    where = f"{flag}={workdir}"
    if not os.path.isdir(workdir):
        raise ValueError(f"{where} does not exist: name a trained run's work dir.")
    try:
        chosen, base, _, params = load_step_for_sampling(workdir, "ema", step=step,
                                                         sharding=sharding)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise ValueError(f"{where}: {' '.join(str(e).split())}") from None
    if config_lib.model_kind(base) != "unet":
        raise ValueError(f"{where} is a classifier run (model.kind="
                         f"{config_lib.model_kind(base)!r}), not a denoiser: name a run "
                         "trained with model.kind='unet'.")
    fields = TEACHER_DIFFUSION_FIELDS + (("mean_type", "var_type") if same_mean_type else ())
    diffs = (field_differences(base, config, "diffusion", fields, "base")
             + field_differences(base, config, "data", ("image_size", "channels"), "base"))
    if diffs:
        raise ValueError(f"{where} has another schedule or image shape than this run, which "
                         f"starts from its weights ({'; '.join(diffs)}): use the base run's "
                         "diffusion and data settings.")
    return chosen, base, params


def load_teacher(workdir: str, config: ml_collections.ConfigDict, *, step: int | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> tuple[int, str, PyTree]:
    """(step, mean_type, EMA params) of the teacher run in `workdir` for the distillation run
    `config` (config.distill.teacher); ValueError with one line naming `distill.teacher` when it
    cannot teach this student: no run there, a classifier, another network, schedule or image
    shape, or a mean type without an x0 reading (xprev)."""
    from ddpm_jax import distill

    where = f"config.distill.teacher={workdir}"
    chosen, teacher, params = load_base_run(workdir, config, flag="config.distill.teacher",
                                            step=step, sharding=sharding)
    diffs = field_differences(teacher, config, "model", TEACHER_MODEL_FIELDS, "teacher",
                              this="student")
    if diffs:
        raise ValueError(f"{where} has another network or schedule than the student, which "
                         f"starts from its weights ({'; '.join(diffs)}): use the teacher's "
                         "config with only diffusion.mean_type, training and distill changed.")
    if teacher.diffusion.mean_type not in distill.STUDENT_MEAN_TYPES:
        raise ValueError(f"{where} predicts mean_type={teacher.diffusion.mean_type!r}, which "
                         f"has no one-step x0 reading: distil a run of {distill.STUDENT_MEAN_TYPES}.")
    return chosen, teacher.diffusion.mean_type, params


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


CONFIG_FILE = "config.json"  # the work dir's copy of the resolved config, for people to read


def warn_if_config_file_differs(workdir: str, config: Mapping[str, Any], step: int) -> bool:
    """Logs a warning (and returns True) when workdir/config.json (a copy train.py writes for
    reading) holds other values than the config saved in the checkpoint of `step`, which is
    the one used: a hand edit there changes nothing, and is named instead of ignored."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            on_disk = checkpoint.flatten(json.load(f))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError) as e:
        logging.warning("%s is unreadable (%s); not used: the checkpoint's own config is.", path,
                        type(e).__name__)
        return True
    saved = checkpoint.flatten(checkpoint.config_to_dict(config))
    diffs = [f"{key}: checkpoint {json.dumps(saved.get(key))}, config.json "
             f"{json.dumps(on_disk.get(key))}" for key in sorted(set(saved) | set(on_disk))
             if saved.get(key) != on_disk.get(key)]
    if diffs:
        logging.warning("%s differs from the config saved with the checkpoint of step %d (%s%s); "
                        "the checkpoint's config is used (config.json is only a copy for "
                        "reading): to use other values, train a new run with them.", path, step,
                        "; ".join(diffs[:5]), f"; {len(diffs) - 5} more" if len(diffs) > 5 else "")
    return bool(diffs)
