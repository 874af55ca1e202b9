"""sample.py's editing-by-class commands (`editing.by_class`, `editing.pnp`): their flags,
checks and jobs, declared as `jobs` declares the other edits.

    --diffedit IMAGES --from_label a --to_label b [--strength 0.5 --mask_threshold 0.5]   DiffEdit
    --blend IMAGES --mask MASK --to_label b [--strength 0.5]            Blended diffusion
    --pnp IMAGES --to_label b [--feature_t 0.8 --attn_t 0.5 --feature_level 1]   Plug-and-Play

A class-conditional run edits with its own labels (--guidance w: classifier-free guidance of
the target); an unconditional run needs --classifier (classifier guidance, --classifier_scale).
--mask follows --inpaint's convention: nonzero = known pixel, kept. The grid shows, per image,
the input, the mask where one is used (white = changed) and the result; the .npz holds
'images' (the results), 'inputs', 'masks' (bool, True = changed), 'labels' (the targets) and
'from_labels' (DiffEdit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import flags, logging

from ddpm_jax.editing import by_class, inputs as edit_io, pnp as pnp_lib
from ddpm_jax.images import to_uint8
from ddpm_jax.parallel import map_batches

CLASS_MODES = ("diffedit", "blend", "pnp")


def define_flags() -> None:
    """The editing-by-class flags of sample.py (absl, module-global)."""
    flags.DEFINE_string("diffedit", None, "DiffEdit: change IMAGES from --from_label to "
                        "--to_label inside the mask where the two classes' noise predictions "
                        "differ; any --sampler.")
    flags.DEFINE_string("blend", None, "Blended diffusion: redraw the unknown pixels of IMAGES "
                        "(--mask, nonzero = kept) towards --to_label; any --sampler.")
    flags.DEFINE_string("pnp", None, "Plug-and-Play: draw --to_label with the structure of "
                        "IMAGES (their decoder features and attention injected; DDIM, eta 0).")
    flags.DEFINE_integer("from_label", None, "With --diffedit: the class the images show.")
    flags.DEFINE_float("mask_threshold", None, "With --diffedit: change the pixels whose "
                       "normalised prediction difference is at least this (default 0.5, the "
                       "paper's; lower: a larger region).")
    flags.DEFINE_integer("to_label", None, "With --diffedit / --blend / --pnp: the class to edit "
                         "towards.")
    flags.DEFINE_float("feature_t", None, "With --pnp: decoder features are injected while "
                       "t >= (1 - feature_t) T (default 0.8, the paper's tau_f).")
    flags.DEFINE_float("attn_t", None, "With --pnp: attention queries and keys are injected "
                       "while t >= (1 - attn_t) T (default 0.5, the paper's tau_A).")
    flags.DEFINE_integer("feature_level", None, "With --pnp: the decoder level whose residual "
                         "blocks' outputs are injected (default 1; 0 = full resolution).",
                         lower_bound=0)


def check_flags(values: Any, mode: str | None) -> None:
    """ValueError (one line) for class-edit flags that are missing, misplaced or out of range.
    `values` may lack the flags sample.py alone defines (unset)."""
    values = _Flags(values)
    own = dict(from_label=("diffedit",), mask_threshold=("diffedit",), to_label=CLASS_MODES,
               feature_t=("pnp",), attn_t=("pnp",), feature_level=("pnp",))
    for flag, modes in own.items():
        if getattr(values, flag) is not None and mode not in modes:
            raise ValueError(f"--{flag} only applies to --{' / --'.join(modes)}.")
    if mode not in CLASS_MODES:
        return
    if values.to_label is None:
        raise ValueError(f"--{mode} needs --to_label (the class to edit towards).")
    if mode == "diffedit":
        if values.from_label is None:
            raise ValueError("--diffedit needs --from_label (the class the images show).")
        if values.from_label == values.to_label:
            raise ValueError(f"--from_label and --to_label are both {values.to_label}: nothing "
                             "to edit; name two classes.")
    if mode == "blend" and values.mask is None:
        raise ValueError("--blend needs --mask (nonzero = known pixel, kept).")
    for flag in ("feature_t", "attn_t", "mask_threshold"):
        share = getattr(values, flag)
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"--{flag}={share}: use a share of the steps in [0, 1].")
    if values.labels is not None:
        raise ValueError(f"--{mode} takes its classes from --to_label; drop --labels.")
    if mode == "pnp" and values.classifier is not None:
        raise ValueError("--pnp needs a class-conditional run (its guide rows decode the null "
                         "label); drop --classifier.")


class _Flags:
    """Flag values with every missing class-edit flag read as unset (None)."""

    def __init__(self, values: Any):
        self._values = values

    def __getattr__(self, name: str) -> Any:
        return getattr(self._values, name, None)


def guided_classes(values: Any, mode: str | None, classes: Any) -> Any:
    """What sample.py's guidance checks see as the classes asked for: [--to_label] for a class
    edit, else the parsed --labels."""
    return [values.to_label] if mode in CLASS_MODES else classes


def _classes(context: Any) -> dict[str, Any]:
    clf, clf_params = context.classifier or (None, None)
    return dict(guidance=context.guidance, classifier=clf, classifier_params=clf_params,
                classifier_scale=context.classifier_scale)


def _tiles(*columns: np.ndarray) -> tuple[np.ndarray, int]:
    """Per image one grid row of its columns (uint8 [N, H, W, C] each); at most 25 rows."""
    tiles = np.stack(columns, axis=1)[:25]
    return tiles.reshape((-1,) + columns[0].shape[1:]), len(columns)


def _shown(changed: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.where(changed, 255, 0).astype(np.uint8), like.shape)


def _diffedit(values: Any, context: Any, spec: Any, images: np.ndarray) -> Any:
    from ddpm_jax.editing.jobs import Result, model_input, pixel_mask
    strength = 0.5 if values.strength is None else values.strength
    batch = min(context.batch_size, images.shape[0])
    options = _classes(context)
    threshold = by_class.MASK_THRESHOLD if values.mask_threshold is None else values.mask_threshold
    logging.info("DiffEdit: %d images, class %d -> %d, strength %.3g, mask threshold %.3g: DDIM "
                 "encoding, decoding with %s.", images.shape[0], values.from_label,
                 values.to_label, strength, threshold, spec.describe())

    def one_batch(n: int, x: np.ndarray) -> dict[str, Any]:
        x = model_input(context, x)  # a latent run: its scaled latents, the mask on their grid
        soft = by_class.diffedit_mask(context.model_apply, context.params, context.schedule, x,
                                      values.from_label, values.to_label, context.key,
                                      strength=strength, mean_type=spec.mean_type,
                                      classifier=options["classifier"],
                                      classifier_params=options["classifier_params"])
        edit = by_class.edit_region(soft, threshold)
        out = by_class.diffedit(context.model_apply, context.params, context.schedule, spec, x,
                                edit, values.from_label, values.to_label, context.key,
                                strength=strength, example_offset=n, **options)
        return dict(images=out["images"], masks=edit, soft=soft)

    out = map_batches(one_batch, [images], batch, desc="diffedit")
    result = to_uint8(out["images"])
    masks = pixel_mask(context, np.asarray(out["masks"], bool))
    soft = pixel_mask(context, np.asarray(out["soft"], np.float32))
    labels = np.full(len(images), values.to_label, np.int32)
    return Result(result, *_tiles(images, _shown(masks, images), result),
                  extra=dict(inputs=images, masks=masks, soft_masks=soft,
                             labels=labels, from_labels=np.full_like(labels, values.from_label)))


def _blend(values: Any, context: Any, spec: Any, images: np.ndarray) -> Any:
    from ddpm_jax.editing.jobs import Result, chain_mask, model_input, pixel_mask, pixel_shape
    strength = 0.5 if values.strength is None else values.strength
    known = edit_io.load_mask(values.mask, image_shape=pixel_shape(context),
                              num_images=images.shape[0])
    known = chain_mask(context, known)  # a latent run: whole f x f blocks
    batch = min(context.batch_size, images.shape[0])
    options = _classes(context)
    logging.info("Blended diffusion: %d images towards class %d, strength %.3g: %s.",
                 images.shape[0], values.to_label, strength, spec.describe())
    out = map_batches(lambda n, x, m: by_class.blended(
            context.model_apply, context.params, context.schedule, spec, model_input(context, x),
            m, values.to_label, context.key, strength=strength, example_offset=n, **options),
            [images, known], batch, desc="blend")
    result = to_uint8(out)
    changed = ~pixel_mask(context, known)
    return Result(result, *_tiles(images, _shown(changed, images), result),
                  extra=dict(inputs=images, masks=changed,
                             labels=np.full(len(images), values.to_label, np.int32)))


def _pnp(values: Any, context: Any, spec: Any, images: np.ndarray) -> Any:
    from ddpm_jax.editing.jobs import Result, model_input
    if context.classifier is not None:
        raise ValueError("--pnp needs a class-conditional run; drop --classifier.")
    shares = dict(feature_share=pnp_lib.FEATURE_SHARE if values.feature_t is None else
                  values.feature_t,
                  attn_share=pnp_lib.ATTN_SHARE if values.attn_t is None else values.attn_t,
                  feature_level=1 if values.feature_level is None else values.feature_level)
    batch = min(context.batch_size, images.shape[0])
    logging.info("Plug-and-Play: %d guides towards class %d, %s, %s.", images.shape[0],
                 values.to_label, shares, spec.describe())
    out = map_batches(lambda n, x: pnp_lib.pnp(
            context.model_apply.model, context.params, context.schedule, spec, model_input(context, x),
            values.to_label, context.key, guidance=context.guidance, example_offset=n, **shares),
            [images], batch, desc="pnp")
    result = to_uint8(out["images"])
    return Result(result, *_tiles(images, to_uint8(out["guides"]), result),
                  extra=dict(inputs=images, guides=to_uint8(out["guides"]),
                             latents=out["latents"].astype(np.float32),
                             labels=np.full(len(images), values.to_label, np.int32)))


JOBS = dict(diffedit=_diffedit, blend=_blend, pnp=_pnp)
