"""sample.py's control jobs (docs/control.md): sampling a ControlNet run under control images,
and an image-conditioned run (super-resolution) on condition images or on the samples of a
first-stage run (a cascade).

    --control IMAGES [--control_scale 1.0]      a ControlNet run (config.control.base)
    --condition IMAGES [--condition_guidance g] an image-conditioned run (config.control.condition)
    --condition RUN                              a cascade: RUN's samples are the conditions
    --control_source                             apply the run's transform to IMAGES first

IMAGES (PNG, grid PNG with --grid_cells, or uint8 .npz): for control.kind='lowres' images at the
low resolution (H/k) or at full size (their k x k block means are taken); for 'edges' the
edge maps themselves (--control_source: images whose edges are taken); for 'mask' images (the
top half is kept); for 'data' (controls given with the training data) the control images
themselves, with the run's control.channels channels (--control_source is refused: there is no
transform). With --labels / --guidance (class-conditional runs) the class guidance runs
with the control kept; with --condition_guidance g the step also runs the null control
(InstructPix2Pix's two scales, s_I = 1 + g). The grid shows each control beside its result;
the .npz holds 'images' (the results) and 'controls' (uint8 [N, H, W, C_c], in [-1, 1] mapped
to 0..255).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from ddpm_jax import control
from ddpm_jax.editing import inputs as edit_io
from ddpm_jax.editing.jobs import Context, Result, write_result
from ddpm_jax.images import to_model_range, to_uint8
from ddpm_jax.sampling import make_sampler

MODES = ("control", "condition")


def define_flags() -> None:
    """The flags of sample.py's control jobs (absl, module-global)."""
    flags.DEFINE_string("control", None, "ControlNet: sample a ControlNet run under these "
                        "control images (PNG, grid PNG with --grid_cells, uint8 .npz), one "
                        "sample per image.")
    flags.DEFINE_string("condition", None, "Image-conditioned run (super-resolution): these "
                        "condition images, or a run dir whose samples are the conditions (a "
                        "cascade).")
    flags.DEFINE_float("control_scale", 1.0, "With --control: the control branch's scale (0: "
                       "the base model exactly).")
    flags.DEFINE_float("condition_guidance", None, "With --control / --condition: guidance g on "
                       "the control image (each step also runs the null control; s_I = 1 + g).")
    flags.DEFINE_boolean("control_source", False, "With --control / --condition: IMAGES are "
                         "source images; the run's transform (edges, mask) makes the controls.")


def check_flags(values: Any, edit_mode: str | None) -> str | None:
    """The control job the flags ask for ('control', 'condition' or None); ValueError (one line)
    for flags that conflict or would do nothing. Needs no weights."""
    chosen = [m for m in MODES if getattr(values, m) is not None]
    if len(chosen) > 1:
        raise ValueError("Pick one of --control / --condition: --control samples a ControlNet "
                         "run, --condition an image-conditioned run.")
    mode = chosen[0] if chosen else None
    if mode is not None and edit_mode is not None:
        raise ValueError(f"Pick one of --{mode} / --{edit_mode}; they are separate jobs.")
    if mode != "control" and values.control_scale != 1.0:
        raise ValueError("--control_scale only applies to --control.")
    if mode is None and (values.condition_guidance is not None or values.control_source):
        raise ValueError("--condition_guidance / --control_source only apply to --control / "
                         "--condition.")
    if values.condition_guidance is not None and values.condition_guidance < 0:
        raise ValueError(f"--condition_guidance={values.condition_guidance} must be >= 0.")
    if mode is not None and values.classifier is not None:
        raise ValueError(f"--{mode} takes classifier-free guidance (--guidance), not --classifier.")
    return mode


def check_run(mode: str | None, config: Any) -> None:
    """ValueError (one line) when the run cannot take the job's images: --control on a run
    without a control branch, --condition on a run without a condition input, or a plain
    sample of either that needs them."""
    if mode == "control" and not control.is_controlnet(config):
        hint = (" (it is image-conditioned: use --condition)" if control.is_conditioned(config)
                else "")
        raise ValueError("--control needs a ControlNet run (trained with "
                         f"--config.control.base=RUN); this run has no control branch{hint}.")
    if mode == "condition" and not control.is_conditioned(config):
        raise ValueError("--condition needs an image-conditioned run (configs/digits.py:sr); "
                         "this run takes no condition image"
                         + (" (it is a ControlNet: use --control)." if control.is_controlnet(config)
                            else "."))


def _to_controls(images: np.ndarray, config: Any, image_shape: tuple[int, int, int],
                 source: bool) -> np.ndarray:
    """float32 [N, H, W, C_c] control images in [-1, 1] of uint8 inputs (see the module doc)."""
    kind, factor = config.control.kind, config.control.factor
    x = to_model_range(images.astype(np.float32))
    if kind == "data":
        if source:
            raise ValueError("--control_source: this run's controls were given with its data "
                             "(control.kind='data'), there is no transform to apply; give the "
                             "control images themselves.")
        return x
    if kind == "lowres" and x.shape[1] != image_shape[0]:
        return np.asarray(control.upsample(jnp.asarray(x), factor))
    if kind == "lowres" or kind == "mask" or source:
        return np.asarray(control.make_control(kind, jnp.asarray(x), factor))
    return x


def load_controls(path: str, config: Any, image_shape: tuple[int, int, int], *, flag: str,
                  grid_cells: int | None, source: bool) -> np.ndarray:
    """The control images of `path` for a run of `config` (see `_to_controls`)."""
    h, w, c = image_shape
    k = config.control.factor
    if config.control.kind == "lowres":
        try:
            small = edit_io.load_images(path, image_shape=(h // k, w // k, c),
                                        grid_cells=grid_cells, flag=flag)
            return _to_controls(small, config, image_shape, source)
        except ValueError:
            pass  # not low-res: read at full size, with that error if it fails too
    if config.control.kind == "data" and not source:
        c = control.channels_of(config)  # the given controls' own channels
    images = edit_io.load_images(path, image_shape=(h, w, c), grid_cells=grid_cells, flag=flag)
    return _to_controls(images, config, image_shape, source)


def first_stage(run: str, config: Any, image_shape: tuple[int, int, int], values: Any) -> np.ndarray:
    """A cascade's conditions: values.num_samples samples of the run in `run` (its own sampler,
    key seed + 1), at H/k (or H) pixels, as control images."""
    from ddpm_jax import cli, config as config_lib
    from ddpm_jax.sampling import ModelApply, draw_images
    from ddpm_jax.spec import SamplerSpec

    first_config, model, params = cli.load_model(run, None, "ema")
    shape = config_lib.image_shape(first_config)
    k = config.control.factor
    if shape not in ((image_shape[0] // k, image_shape[1] // k, image_shape[2]), image_shape):
        raise ValueError(f"--condition={run} makes {shape} images; this run's conditions are "
                         f"{image_shape[0] // k}x{image_shape[1] // k}x{image_shape[2]}.")
    batch = min(first_config.sampling.batch_size, values.num_samples)
    sampler = make_sampler(ModelApply(model), config_lib.schedule_from_config(first_config),
                           (batch, *shape), SamplerSpec.from_config(first_config))
    import jax
    logging.info("Cascade: drawing %d images from %s.", values.num_samples, run)
    images = draw_images(sampler, params, jax.random.PRNGKey(values.seed + 1), values.num_samples,
                         desc="first stage")
    return _to_controls(images, config, image_shape, False)


def run_and_write(mode: str, values: Any, context: Context, config: Any, model: Any) -> None:
    """Runs the job and writes the grid (control beside result) and the .npz."""
    check_run(mode, config)
    if os.path.isdir(values.condition or ""):
        controls = first_stage(values.condition, config, context.image_shape, values)
    else:
        path = values.control if mode == "control" else values.condition
        controls = load_controls(path, config, context.image_shape, flag=f"--{mode}",
                                 grid_cells=values.grid_cells, source=values.control_source)
        controls = np.resize(controls, (values.num_samples, *controls.shape[1:])) \
            if len(controls) < values.num_samples else controls
    g = values.condition_guidance
    apply_fn = control.ControlApply(model, control.branch_from_config(config, model)
                                    if mode == "control" else None, condition_guidance=g is not None)
    batch = min(context.batch_size, len(controls))
    sampler = make_sampler(apply_fn, context.schedule, (batch, *context.image_shape),
                           context.spec, guidance=context.guidance)
    labels = None if context.labels is None else context.labels[:len(controls)]
    per_row = control.rows(controls, labels=labels,
                           scale=values.control_scale if mode == "control" else None,
                           condition_guidance=g)
    logging.info("--%s: %d images, %s%s%s.", mode, len(controls),
                 context.spec.describe(sampler.plan.num_steps),
                 f", control scale {values.control_scale}" if mode == "control" else "",
                 "" if g is None else f", guidance {g} on the control image")
    images = control.draw(sampler, context.params, context.key, per_row, desc="batches")
    shown = to_uint8(controls)
    c = images.shape[-1]
    tiles = shown[..., :c] if shown.shape[-1] >= c else np.repeat(shown, c, axis=-1)
    grid = np.stack([tiles, images], axis=1).reshape(-1, *images.shape[1:])
    extra = dict(controls=shown)
    if labels is not None:
        extra["labels"] = labels
    write_result(Result(images, grid, 2 * max(1, int(np.sqrt(len(images) / 2))), extra=extra),
                 values)
