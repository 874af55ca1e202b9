"""sample.py's generation-by-class jobs: Visual Anagrams (--views) and StyleAligned
(--style_ref), with their flags and checks; they run on `editing.jobs.Context` and return an
`editing.jobs.Result`, written as every sample.py job is.

    --views identity,rot180 --labels 6,9       one image per sample that reads as 6 upright and
                                               9 rotated; labels: one class per view, several
                                               groups cycled over the samples (6,9,1,7)
    --style_ref IMAGE [--style_layers up]      the samples share IMAGE's attention statistics
        [--nostyle_adain]                      (DDIM with eta 0; the reference is inverted)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import flags, logging

from ddpm_jax.editing import inputs as edit_io, views as views_lib
from ddpm_jax.editing.jobs import Context, Result, write_result
from ddpm_jax.labels import check_label_text
from ddpm_jax.models.style_aligned import LAYER_GROUPS, attention_sites
from ddpm_jax.sampling import draw_images, make_sampler
from ddpm_jax.spec import SamplerSpec

MODES = ("views", "style")


def define_flags() -> None:
    """The flags of sample.py's generation-by-class jobs (absl, module-global)."""
    flags.DEFINE_list("views", None, "Visual Anagrams: denoise each sample under these views at "
                      f"once ({', '.join(views_lib.VIEWS)}, permutationS), one class of "
                      "--labels per view (a multiple of the view count: groups cycled over "
                      "the samples). The grid shows each sample under each view.")
    flags.DEFINE_string("style_ref", None, "StyleAligned: the samples share the attention "
                        "statistics of this image (PNG or .npz; its first image), which is "
                        "DDIM-inverted and runs as row 0 of every batch; DDIM with eta 0.")
    flags.DEFINE_list("style_layers", None, f"With --style_ref: {', '.join(LAYER_GROUPS)} "
                      "(default all) or attention block names such as up_1_attn_0.")
    flags.DEFINE_boolean("style_adain", True, "With --style_ref: AdaIN the queries and keys "
                         "to the reference's statistics (StyleAligned's; off: share keys and "
                         "values only).")
    flags.DEFINE_float("style_shift", 0.0, "With --style_ref: added to the attention logits of "
                       "the reference's keys (log of the weight the reference gets; 0: "
                       "StyleAligned as written; 1-3 strengthen the style).")


def check_flags(values: Any, edit_mode: str | None) -> str | None:
    """The job the flags ask for ('views', 'style' or None); ValueError (one line) for flags
    that conflict or would do nothing. Needs no weights."""
    mode = ("views" if values.views is not None else None) or \
        ("style" if values.style_ref is not None else None)
    if values.views is not None and values.style_ref is not None:
        raise ValueError("Pick one of --views / --style_ref; they are separate jobs.")
    if mode is not None and edit_mode is not None:
        raise ValueError(f"Pick one of --{mode if mode == 'views' else 'style_ref'} / "
                         f"--{edit_mode}; they are separate jobs.")
    if mode != "style" and (values.style_layers is not None or not values.style_adain
                            or values.style_shift):
        raise ValueError("--style_layers / --style_adain / --style_shift only apply to "
                         "--style_ref.")
    if mode is None:
        return None
    if values.classifier is not None:
        raise ValueError(f"--{'views' if mode == 'views' else 'style_ref'} takes classifier-free "
                         "guidance (--guidance), not --classifier.")
    if mode == "views":
        classes = check_label_text(values.labels, "--labels")
        if not isinstance(classes, list):
            raise ValueError("--views needs --labels with one class per view, e.g. --views "
                             "identity,rot180 --labels 6,9.")
        if len(classes) % len(values.views):
            raise ValueError(f"--labels has {len(classes)} classes for {len(values.views)} "
                             f"views: give one class per view (or groups of "
                             f"{len(values.views)}, cycled over the samples).")
    return mode


def _view_groups(values: Any, num_views: int) -> np.ndarray:
    """[G, V] classes: --labels read in groups of one class per view."""
    return np.asarray(check_label_text(values.labels, "--labels"), np.int32).reshape(-1, num_views)


def _views(values: Any, context: Context) -> Result:
    views = views_lib.make_views(values.views, context.image_shape)
    model = views_lib.ViewsApply(context.model_apply, views)
    groups = _view_groups(values, len(views))
    if groups.max() >= model.num_classes:
        raise ValueError(f"--labels: this model has classes 0..{model.num_classes - 1}.")
    num = values.num_samples
    per_sample = groups[np.arange(num) % len(groups)]                    # [N, V]
    spec = context.spec or context.run_spec
    batch = min(context.batch_size, num)
    sampler = make_sampler(model, context.schedule, (batch,) + context.image_shape, spec,
                           guidance=context.guidance)
    logging.info("Visual Anagrams: %d images under views %s with classes %s: %s, %d model rows "
                 "per step%s.", num, ",".join(v.name for v in views),
                 ";".join(",".join(map(str, g)) for g in groups),
                 spec.describe(sampler.plan.num_steps), batch * len(views),
                 "" if context.guidance is None else f", guidance {context.guidance:g}")
    images = draw_images(sampler, context.params, context.key, num,
                         labels=views_lib.pack_labels(per_sample, model.num_classes),
                         desc="anagrams")
    return Result(images, views_lib.view_tiles(images, views), len(views) * min(4, num),
                  extra=dict(view_labels=per_sample,
                             views=np.asarray([v.name for v in views])))


def _style(values: Any, context: Context) -> Result:
    from ddpm_jax.editing.style import style_aligned_samples
    reference = edit_io.load_images(values.style_ref, flag="--style_ref",
                                    image_shape=context.image_shape)[0]
    given = context.flags
    if given.get("sampler", "ddim") != "ddim":
        raise ValueError(f"--style_ref decodes the reference's DDIM inversion; use "
                         f"--sampler=ddim, not {given['sampler']} (or leave it out).")
    steps = context.run_spec.with_overrides(**{k: given.get(k) for k in ("steps", "spacing")})
    spec = SamplerSpec(sampler="ddim", steps=steps.steps, spacing=steps.spacing,
                       mean_type=context.run_spec.mean_type,
                       var_type=context.run_spec.var_type, clip_denoised=False)
    sites = attention_sites(context.params, values.style_layers[0]
                            if values.style_layers and len(values.style_layers) == 1 and
                            values.style_layers[0] in LAYER_GROUPS else
                            (values.style_layers or "all"))
    logging.info("StyleAligned: %d images sharing %s's attention at %s (AdaIN %s, shift %g): "
                 "%s.", values.num_samples, values.style_ref, ",".join(sites),
                 "on" if values.style_adain else "off", values.style_shift, spec.describe())
    out = style_aligned_samples(context.model_apply, context.params, context.schedule, spec,
                                reference, context.labels, context.key,
                                num_samples=values.num_samples,
                                batch_size=max(2, context.batch_size), sites=sites,
                                use_adain=values.style_adain,
                                reference_shift=values.style_shift, guidance=context.guidance,
                                progress=True)
    grid = np.concatenate([reference[None], out["reconstruction"][None], out["images"]])
    extra = dict(reference=reference, reconstruction=out["reconstruction"])
    if context.labels is not None:
        extra["labels"] = context.labels
    return Result(out["images"], grid, values.nrow or 10, extra=extra)


JOBS = dict(views=_views, style=_style)


def run(mode: str, values: Any, context: Context) -> Result:
    """Runs job `mode` ('views' or 'style') with sample.py's flag values on `context`;
    ValueError (one line) on a latent run, where neither is available (`latent.check_edit`)."""
    from ddpm_jax import latent
    latent.check_edit(getattr(context.model_apply, "model", None), mode)
    return JOBS[mode](values, context)


def run_and_write(mode: str, values: Any, context: Context) -> None:
    """Runs job `mode`, then writes the grid at values.out and the .npz beside it
    (`editing.jobs.write_result`)."""
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"--{'views' if mode == 'views' else 'style_ref'} runs on one host; "
                         "start sample.py on one process.")
    write_result(run(mode, values, context), values)
