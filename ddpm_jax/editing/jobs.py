"""sample.py's jobs: plain sampling and the editing commands (their flags, their checks, and
the jobs that run `editing` on batches of images read by `editing.inputs`). Each job returns
what sample.py writes: the output images, a grid to look at, and any extra arrays for the .npz.

    --inpaint IMAGES --mask MASK [--jump_length 10 --resamplings 10]   RePaint
    --sdedit IMAGES --strength 0.5                                      SDEdit, any --sampler
    --encode IMAGES                                                     DDIM inversion + decoding
    --interpolate A,B --lambdas 9 [--at_step 500 | --ddim_latent]       DDPM Fig. 8 / DDIM slerp
    --progressive K                                                     x0 predictions every K steps
    --diffedit / --blend / --pnp                                        by class: see `class_jobs`

Each job picks the chain it runs from the run's `SamplerSpec` and the sampler flags given on
the command line (`job_spec`): RePaint runs ancestral steps (by default on RePaint's 250
respaced steps), inversion and DDIM-latent interpolation run DDIM with eta 0, unclipped; the
others run the run's sampler with the flags applied. A flag a job cannot honour is refused in
one line, and each job's log line says what it ran.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from ddpm_jax import latent
from ddpm_jax.editing import chain as editing, class_jobs, inputs as edit_io
from ddpm_jax.images import save_samples, to_model_range, to_uint8
from ddpm_jax.parallel import gather_to_host, map_batches, round_up_to_devices
from ddpm_jax.sampling import ModelApply, Sampler, draw_images, make_sampler
from ddpm_jax.spec import SamplerSpec

MODES = ("inpaint", "sdedit", "encode", "interpolate", "progressive") + class_jobs.CLASS_MODES
REPAINT_STEPS = 250  # RePaint's respaced chain (Lugmayr et al. 2022: T = 250, j = 10, r = 10)


def define_flags() -> None:
    """The editing flags of sample.py (absl, module-global like sample.py's own)."""
    flags.DEFINE_string("inpaint", None, "RePaint: complete the unknown pixels of IMAGES (a PNG, "
                        "a grid PNG with --grid_cells, or an .npz of uint8 [N, H, W, C]); needs "
                        "--mask and --sampler=ddpm (respaced --steps allowed).")
    flags.DEFINE_string("mask", None, "With --inpaint / --blend: a PNG or .npz of [H, W(, 1)] or "
                        "[N, H, W, 1]; nonzero = known pixel.")
    flags.DEFINE_integer("jump_length", 10, "RePaint's jump length j (steps re-noised per "
                         "resampling).", lower_bound=1)
    flags.DEFINE_integer("resamplings", 10, "RePaint's r: passes over every j-step segment "
                         "(1: no resampling).", lower_bound=1)
    flags.DEFINE_string("sdedit", None, "SDEdit: re-draw IMAGES from q(x_t0 | image), "
                        "t0 = --strength * T, with the chosen --sampler.")
    flags.DEFINE_float("strength", None, "With --sdedit / --diffedit / --blend: the share of the chain re-run, in "
                       "(0, 1] (default 0.5).")
    flags.DEFINE_string("encode", None, "DDIM inversion of IMAGES (eta 0, --steps): writes the "
                        "latents ('latents' in the .npz) and the decoded reconstructions.")
    flags.DEFINE_list("interpolate", None, "A,B: two image files (the first image of each); "
                      "decodes --lambdas mixtures.")
    flags.DEFINE_integer("lambdas", 9, "With --interpolate: how many mixtures, lambda evenly in "
                         "[0, 1].", lower_bound=2)
    flags.DEFINE_integer("at_step", None, "With --interpolate: mix q(x_t | A) and q(x_t | B) at "
                         "this 0-based t with shared noise (the DDPM paper's; default 500 of "
                         "1000, scaled to T) and decode with --sampler.")
    flags.DEFINE_boolean("ddim_latent", False, "With --interpolate: slerp the DDIM-inverted "
                         "latents instead, decoded by DDIM (eta 0).")
    flags.DEFINE_integer("grid_cells", None, "IMAGES given as a grid PNG of this many tiles "
                         "(as sample.py writes them).", lower_bound=1)
    flags.DEFINE_integer("progressive", None, "Plain sampling that also writes the x0 "
                        "predictions every K steps, one row per sample (the DDPM paper's "
                        "Fig. 6); 'progressive' [N, K, H, W, C] in the .npz.", lower_bound=1)
    class_jobs.define_flags()


def check_flags(values: Any) -> str | None:
    """The editing mode the flags ask for (None: plain sampling); ValueError (one line) for
    flags that conflict or would do nothing. Needs no weights."""
    chosen = {"inpaint": values.inpaint, "sdedit": values.sdedit, "encode": values.encode,
              "interpolate": values.interpolate, "progressive": values.progressive,
              **{name: getattr(values, name, None) for name in class_jobs.CLASS_MODES}}
    modes = [name for name, value in chosen.items() if value is not None]
    if len(modes) > 1:
        raise ValueError(f"Pick one of --{' / --'.join(modes)}; they are separate jobs.")
    mode = modes[0] if modes else None
    lonely = [("mask", ("inpaint", "blend")), ("strength", ("sdedit", "diffedit", "blend")),
              ("at_step", ("interpolate",))]
    for flag, owners in lonely:
        if getattr(values, flag) is not None and mode not in owners:
            raise ValueError(f"--{flag} only applies to --{' / --'.join(owners)}.")
    if values.ddim_latent and mode != "interpolate":
        raise ValueError("--ddim_latent only applies to --interpolate.")
    if mode == "inpaint" and values.mask is None:
        raise ValueError("--inpaint needs --mask (nonzero = known pixel).")
    if values.strength is not None and not 0.0 < values.strength <= 1.0:
        raise ValueError(f"--strength={values.strength} must lie in (0, 1] (the share of the "
                         "chain re-run; 1: from noise).")
    if mode == "interpolate":
        if len(values.interpolate) != 2:
            raise ValueError(f"--interpolate takes two files A,B; got {values.interpolate}.")
        if values.at_step is not None and values.ddim_latent:
            raise ValueError("--at_step and --ddim_latent are two methods; pick one.")
    class_jobs.check_flags(values, mode)
    if mode not in (None, "progressive") + class_jobs.CLASS_MODES and (
            values.labels not in (None, "none") or values.guidance is not None):
        raise ValueError(f"--{mode} runs the unconditional model; drop --labels / --guidance.")
    if values.grid_cells is not None and mode in (None, "progressive"):
        raise ValueError("--grid_cells only applies to the image inputs of the edits (--inpaint, "
                         "--sdedit, --encode, --interpolate, --diffedit, --blend, --pnp).")
    return mode


@dataclasses.dataclass
class Result:
    """What a job made: images uint8 [N, H, W, C] (the .npz's 'images'), grid uint8 [M, H, W, C]
    tiles with nrow per row, and extra arrays for the .npz."""

    images: np.ndarray
    grid: np.ndarray
    nrow: int
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every job runs on. run_spec: the run's chain (`SamplerSpec.from_config`, no flags);
    flags: the sampler flags given on the command line (`cli.sampler_flag_values`, unset ones
    dropped); spec: the run's chain with the flags (`SamplerSpec.from_config(config, **flags)`,
    default run_spec.with_overrides(**flags)); labels [N] / guidance / classifier
    (ClassifierApply, params) / classifier_scale: the class options of plain sampling and of
    --progressive."""

    model_apply: Any
    params: Any
    schedule: Any
    image_shape: tuple[int, int, int]
    batch_size: int
    key: jax.Array
    run_spec: SamplerSpec
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)
    spec: SamplerSpec | None = None
    mesh: Any = None
    labels: np.ndarray | None = None
    guidance: float | None = None
    classifier: tuple[Any, Any] | None = None
    classifier_scale: float | None = None

    @classmethod
    def from_config(cls, config: Any, model: Any, params: Any, *, flags: dict[str, Any],
                    batch_size: int, seed: int, **classes: Any) -> Context:
        """The run of `config` (its model and params, as loaded), with the sampler `flags`
        given and `classes` (labels, guidance, classifier, classifier_scale)."""
        from ddpm_jax import config as config_lib
        from ddpm_jax.parallel import make_mesh
        return cls(model_apply=ModelApply(model), params=params,
                   schedule=config_lib.schedule_from_config(config),
                   image_shape=config_lib.image_shape(config), batch_size=batch_size,
                   key=jax.random.key(seed), run_spec=SamplerSpec.from_config(config),
                   flags=flags, spec=SamplerSpec.from_config(config, **flags),
                   mesh=make_mesh() if jax.device_count() > 1 else None, **classes)

    def batch_mesh(self, batch: int) -> Any:
        """The mesh when `batch` rows split over it, else None (one device)."""
        return self.mesh if self.mesh is not None and batch % self.mesh.size == 0 else None


def _refuse(mode: str, flags_given: dict[str, Any], unused: tuple[str, ...], why: str) -> None:
    """ValueError (one line) naming the given flags of `unused` that job `mode` cannot honour."""
    bad = [f"--{name}" for name in unused if name in flags_given
           and not (name == "eta" and flags_given[name] == 0.0)]
    if bad:
        raise ValueError(f"--{mode} {why}, so {' / '.join(bad)} would do nothing: drop it.")


def job_spec(mode: str, context: Context, *, ddim_latent: bool = False) -> SamplerSpec:
    """The chain job `mode` runs: from the run's spec and the sampler flags given (see the
    module docstring). ValueError (one line) for a flag the job cannot honour."""
    run_spec, flags_given = context.run_spec, context.flags
    num_timesteps = context.schedule.num_timesteps
    if mode == "inpaint":
        if flags_given.get("sampler", "ddpm") != "ddpm":
            raise ValueError(f"--inpaint runs RePaint's ancestral steps; use --sampler=ddpm, not "
                             f"{flags_given['sampler']} (or leave --sampler out).")
        _refuse(mode, flags_given, ("eta", "order", "threshold", "corrector_snr",
                                    "corrector_steps"), "runs RePaint's ancestral steps "
                "with the [-1, 1] clip")
        return SamplerSpec(sampler="ddpm",
                           steps=flags_given.get("steps", min(REPAINT_STEPS, num_timesteps)),
                           spacing=flags_given.get("spacing", "time"),
                           mean_type=run_spec.mean_type,
                           var_type=flags_given.get("var_type", run_spec.var_type),
                           clip_denoised=flags_given.get("clip_denoised", run_spec.clip_denoised))
    if mode in ("encode", "pnp") or (mode == "interpolate" and ddim_latent):
        flag = "--interpolate --ddim_latent" if mode == "interpolate" else f"--{mode}"
        if flags_given.get("sampler", "ddim") != "ddim":
            raise ValueError(f"{flag} runs DDIM inversion and DDIM decoding (eta 0); use "
                             f"--sampler=ddim, not {flags_given['sampler']} (or leave it out).")
        _refuse(mode, flags_given, ("eta", "order", "threshold", "var_type", "clip_denoised",
                                    "corrector_snr", "corrector_steps"),
                "inverts and decodes with deterministic, unclipped DDIM")
        steps = run_spec.with_overrides(**{k: flags_given.get(k) for k in ("steps", "spacing")})
        return SamplerSpec(sampler="ddim", steps=steps.steps, spacing=steps.spacing,
                           mean_type=run_spec.mean_type, var_type=run_spec.var_type,
                           clip_denoised=False)
    return context.spec or run_spec.with_overrides(**flags_given)


def run(mode: str, values: Any, context: Context) -> Result:
    """Runs the editing job `mode` with sample.py's flag `values` on `context`. Bad inputs
    raise ValueError before compiling."""
    spec = job_spec(mode, context, ddim_latent=bool(getattr(values, "ddim_latent", False)))
    latent.check_edit(latent_model(context), mode)
    if mode in ("sample", "progressive", "interpolate"):
        return JOBS[mode](values, context, spec)
    images = edit_io.load_images(getattr(values, mode), flag=f"--{mode}",
                                 image_shape=pixel_shape(context), grid_cells=values.grid_cells)
    return JOBS[mode](values, context, spec, images)


def _pairs(first: np.ndarray, second: np.ndarray, per_row: int = 5) -> tuple[np.ndarray, int]:
    """Interleaves [N, ...] pairs (first_n, second_n) as grid tiles; nrow = 2 * per_row."""
    tiles = np.stack([first, second], axis=1).reshape((-1,) + first.shape[1:])
    return tiles, 2 * min(per_row, first.shape[0])


def latent_model(context: Context) -> latent.LatentUNet | None:
    """A latent run's model (the UNet with its autoencoder), else None."""
    model = getattr(context.model_apply, "model", None)
    return model if isinstance(model, latent.LatentUNet) else None


def pixel_shape(context: Context) -> tuple[int, int, int]:
    """The images' (H, W, C): the model's input, or on a latent run its decoder's output."""
    model = latent_model(context)
    if model is None:
        return context.image_shape
    h, w, _ = context.image_shape
    f = model.autoencoder.factor
    return (h * f, w * f, model.autoencoder.image_channels)


def chain_mask(context: Context, known: np.ndarray) -> np.ndarray:
    """A pixel mask [N, H, W, 1] (True = known) on the chain's grid: itself on a pixel run; on
    a latent run, known only where the whole f x f block is (`latent.downsample_mask`).
    ValueError (one line) when that keeps nothing of an image whose pixel mask kept something."""
    model = latent_model(context)
    if model is None:
        return known
    f = model.autoencoder.factor
    kept = latent.downsample_mask(known, f)
    lost = np.flatnonzero(~kept.reshape(len(kept), -1).any(axis=1)
                          & known.reshape(len(known), -1).any(axis=1))
    if lost.size:
        raise ValueError(f"--mask keeps no whole {f}x{f} block of image {int(lost[0])}: on a "
                         f"latent run a latent position is kept only where its whole block "
                         f"is, so nothing would be kept; keep aligned {f}x{f} blocks.")
    return kept


def pixel_mask(context: Context, mask: np.ndarray) -> np.ndarray:
    """A chain-grid mask [N, h, w, 1] on the images' pixels: a latent run's masks live on its
    latent grid (each position covers its f x f block); a pixel run's are the pixels'."""
    model = latent_model(context)
    return mask if model is None else latent.upsample_mask(mask, model.autoencoder.factor)


def model_input(context: Context, images: np.ndarray) -> Any:
    """uint8 images -> the chain's x0: [-1, 1] pixels, or a latent run's scaled latents."""
    if latent_model(context) is not None:
        return latent.to_latents(latent_model(context), context.params, images)
    return to_model_range(images)


def _sampler(context: Context, spec: SamplerSpec, batch: int, **options: Any) -> Sampler:
    return make_sampler(context.model_apply, context.schedule, (batch,) + context.image_shape,
                        spec, mesh=context.batch_mesh(batch), **options)


def _inpaint(values: Any, context: Context, spec: SamplerSpec, images: np.ndarray) -> Result:
    mask = edit_io.load_mask(values.mask, image_shape=pixel_shape(context),
                             num_images=images.shape[0])
    model = latent_model(context)
    # A latent run completes its latents (known where a whole f x f block is) and decodes them.
    known = chain_mask(context, mask)
    plan = spec.plan(context.schedule)
    moves = editing.repaint_moves(plan.num_steps, values.jump_length, values.resamplings)
    batch = min(context.batch_size, images.shape[0])
    logging.info("RePaint: %d images, %s, j=%d, r=%d: %d network calls per image.",
                 images.shape[0], spec.describe(plan.num_steps), values.jump_length,
                 values.resamplings, int(moves["reverse"].sum()))
    out = map_batches(lambda n, x, m: editing.repaint(
            context.model_apply, context.params, plan, moves, context.key, model_input(context, x),
            m, example_offset=n, mean_type=spec.mean_type, var_type=spec.var_type,
            clip_denoised=spec.clip_denoised, mesh=context.batch_mesh(batch)),
            [images, known], batch, desc="inpainting")
    if model is not None:
        out = np.asarray(latent.to_images(model, context.params, jnp.asarray(out)))
    shown = np.where(np.broadcast_to(mask, images.shape), images, 128).astype(np.uint8)
    return Result(to_uint8(out), *_pairs(shown, to_uint8(out)), extra=dict(mask=mask))


def _sdedit(values: Any, context: Context, spec: SamplerSpec, images: np.ndarray) -> Result:
    strength = 0.5 if values.strength is None else values.strength
    batch = min(context.batch_size, images.shape[0])
    sampler = _sampler(context, spec, batch,
                       start_t=editing.sdedit_start_t(context.schedule.num_timesteps, strength))
    logging.info("SDEdit: %d images, strength %.3g, from t0=%d: %s.", images.shape[0], strength,
                 int(sampler.plan.timesteps[-1]), spec.describe(sampler.plan.num_steps))
    out = map_batches(lambda n, x: sampler(context.params, context.key, n,
                                           init=model_input(context, x),
                                           start="q_x0")["images"], [images], batch, desc="sdedit")
    return Result(to_uint8(out), *_pairs(images, to_uint8(out)))


def _encode(values: Any, context: Context, spec: SamplerSpec, images: np.ndarray) -> Result:
    batch = min(context.batch_size, images.shape[0])
    decoder = _sampler(context, spec, batch)
    logging.info("DDIM inversion of %d images: %s, unclipped.", images.shape[0],
                 spec.describe(decoder.plan.num_steps))
    # On a latent run the chain inverts the images' scaled latents; decoding ends in pixels.
    latents = map_batches(lambda n, x: editing.ddim_encode(
            context.model_apply, context.params, decoder.plan, model_input(context, x),
            mean_type=spec.mean_type, var_type=spec.var_type), [images], batch, desc="encoding")
    back = map_batches(lambda n, z: decoder(context.params, context.key, n, init=jnp.asarray(z),
                                            start="x_t")["images"], [latents], batch,
                       desc="decoding")
    error = to_uint8(back).astype(np.float64) - images
    logging.info("DDIM inversion, %d steps: reconstruction RMSE %.2f, max %d (pixel levels "
                 "0..255).", decoder.plan.num_steps, np.sqrt(np.mean(error**2)),
                 np.abs(error).max())
    return Result(to_uint8(back), *_pairs(images, to_uint8(back)),
                  extra=dict(latents=latents.astype(np.float32)))


def _interpolate(values: Any, context: Context, spec: SamplerSpec) -> Result:
    a, b = (edit_io.load_images(path, flag="--interpolate", image_shape=pixel_shape(context),
                                grid_cells=values.grid_cells)[0] for path in values.interpolate)
    lambdas = np.linspace(0.0, 1.0, values.lambdas)
    batch = values.lambdas
    shape = (batch,) + context.image_shape  # the chain's: a latent run's latents
    pair = model_input(context, np.stack([a, b]))  # the chain's x0 of a and b
    if values.ddim_latent:
        decoder = make_sampler(context.model_apply, context.schedule, shape, spec)
        both = editing.ddim_encode(context.model_apply, context.params, decoder.plan,
                                   pair, mean_type=spec.mean_type,
                                   var_type=spec.var_type)
        start = editing.slerp(both[0], both[1], lambdas)
        logging.info("Interpolation: slerp of DDIM latents, %s, unclipped.",
                     spec.describe(decoder.plan.num_steps))
        out = decoder(context.params, context.key, init=start, start="x_t")["images"]
    else:
        T = context.schedule.num_timesteps
        at_step = values.at_step if values.at_step is not None else T // 2
        if not 0 <= at_step < T:
            raise ValueError(f"--at_step={at_step} must lie in 0..{T - 1}.")
        noise = jax.random.normal(jax.random.fold_in(context.key, 1 << 30), shape[1:],
                                  jnp.float32)
        abar = np.cumprod(1.0 - np.asarray(context.schedule.betas, np.float64))[at_step]
        start = editing.q_interpolate(float(np.sqrt(abar)), pair[0], pair[1], noise, lambdas)
        sampler = make_sampler(context.model_apply, context.schedule, shape, spec,
                               start_t=at_step)
        logging.info("Interpolation at t=%d with shared noise: %s.", at_step,
                     spec.describe(sampler.plan.num_steps))
        # Every lambda draws the same noise (row index 0), as in the paper's figure.
        out = sampler(context.params, context.key, init=start, start="x_t",
                      rows=np.zeros(batch, np.int32))["images"]
    out = to_uint8(gather_to_host(out))
    return Result(out, np.concatenate([a[None], out, b[None]]), batch + 2,
                  extra=dict(lambdas=lambdas.astype(np.float32)))


def _sample(values: Any, context: Context, spec: SamplerSpec) -> Result:
    """Plain sampling: --num_samples images with the labels and guidance asked for (every
    process takes part; the batch is split over the mesh)."""
    from ddpm_jax import memory
    from ddpm_jax.cli import describe_guidance
    num = values.num_samples
    batch = min(context.batch_size, round_up_to_devices(num, jax.device_count()))
    memory.check_sampling_batch(context.model_apply.model, context.image_shape, batch, num)
    clf, clf_params = context.classifier or (None, None)
    sampler = _sampler(context, spec, batch, guidance=context.guidance, classifier=clf,
                       classifier_scale=context.classifier_scale)
    logging.info("Sampling %d images of %s: %s, batch %d%s.", num, context.image_shape,
                 spec.describe(sampler.plan.num_steps), batch,
                 describe_guidance(values.labels, context.guidance, values.classifier,
                                   sampler.classifier_scale))
    images = draw_images(sampler, context.params, context.key, num, labels=context.labels,
                         desc="batches", classifier_params=clf_params)
    extra = {} if context.labels is None else dict(labels=context.labels)
    return Result(images, images, values.nrow, extra=extra)


def _progressive(values: Any, context: Context, spec: SamplerSpec) -> Result:
    """Plain sampling that also records x0 every K steps, with the run's labels, classifier-free
    or classifier guidance as `sample.py` would apply them."""
    num = values.num_samples
    batch = min(context.batch_size, num)
    clf, clf_params = context.classifier or (None, None)
    sampler = _sampler(context, spec, batch, return_every=values.progressive,
                       guidance=context.guidance, classifier=clf,
                       classifier_scale=context.classifier_scale)
    logging.info("Sampling %d images with x0 every %d steps: %s.", num, values.progressive,
                 spec.describe(sampler.plan.num_steps))
    labels = context.labels

    def one_batch(n: int, rows: np.ndarray) -> dict[str, jax.Array]:
        result = sampler(context.params, context.key, n, None if labels is None else rows,
                         classifier_params=clf_params)
        # [K, B, ...] -> [B, K, ...]: the batch first, as map_batches concatenates it.
        return dict(images=result["images"], steps=jnp.swapaxes(result["pred_x0"], 0, 1))

    out = map_batches(one_batch, [np.zeros(num, np.int32) if labels is None else labels], batch,
                      desc="sampling")
    steps = to_uint8(out["steps"])  # [N, K, H, W, C]
    shown = steps[:max(1, 100 // steps.shape[1])]
    extra = dict(progressive=steps, progressive_timesteps=sampler.timesteps)
    if labels is not None:
        extra["labels"] = labels
    return Result(to_uint8(out["images"]), shown.reshape((-1,) + steps.shape[2:]), steps.shape[1],
                  extra=extra)


JOBS = dict(sample=_sample, inpaint=_inpaint, sdedit=_sdedit, encode=_encode, interpolate=_interpolate,
            progressive=_progressive, **class_jobs.JOBS)


def run_and_write(mode: str, values: Any, context: Context) -> None:
    """sample.py's one path: `run` job `mode` ("sample" or an edit), then (process 0) the grid
    at values.out and the .npz beside it ('images' plus the job's extra arrays)."""
    if jax.process_count() > 1 and mode != "sample":
        raise ValueError(f"--{mode} runs on one host; start sample.py on one process.")
    result = run(mode, values, context)
    if jax.process_index() == 0:
        write_result(result, values)


def write_result(result: Result, values: Any) -> None:
    """The grid at values.out and the .npz beside it ('images' plus the job's extra arrays),
    written atomically, the .npz last; every sample.py job ends here."""
    os.makedirs(os.path.dirname(os.path.abspath(values.out)), exist_ok=True)
    npz_path = save_samples(result.images, values.out, grid_images=result.grid, extra=result.extra,
                            nrow=values.nrow or result.nrow, tile_px=values.tile_px,
                            max_tiles=values.max_grid_tiles)
    logging.info("Wrote %s and %s: uint8 %s.", values.out, npz_path, result.images.shape)
