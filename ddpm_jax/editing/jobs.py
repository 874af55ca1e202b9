"""sample.py's editing commands: their flags, their checks, and the jobs that run `editing` on
batches of images read by `editing.inputs`. Each job returns what sample.py writes: the output images,
a grid to look at, and any extra arrays for the .npz.

    --inpaint IMAGES --mask MASK [--jump_length 10 --resamplings 10]   RePaint
    --sdedit IMAGES --strength 0.5                                      SDEdit, any --sampler
    --encode IMAGES                                                     DDIM inversion + decoding
    --interpolate A,B --lambdas 9 [--at_step 500 | --ddim_latent]       DDPM Fig. 8 / DDIM slerp
    --progressive K                                                     x0 predictions every K steps
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from ddpm_jax.editing import chain as editing, inputs as edit_io
from ddpm_jax.images import to_uint8
from ddpm_jax.parallel import gather_to_host
from ddpm_jax.plans import make_plan
from ddpm_jax.sampling import make_sampler

MODES = ("inpaint", "sdedit", "encode", "interpolate", "progressive")


def define_flags() -> None:
    """The editing flags of sample.py (absl, module-global like sample.py's own)."""
    flags.DEFINE_string("inpaint", None, "RePaint: complete the unknown pixels of IMAGES (a PNG, "
                        "a grid PNG with --grid_cells, or an .npz of uint8 [N, H, W, C]); needs "
                        "--mask and --sampler=ddpm (respaced --steps allowed).")
    flags.DEFINE_string("mask", None, "With --inpaint: a PNG or .npz of [H, W(, 1)] or "
                        "[N, H, W, 1]; nonzero = known pixel.")
    flags.DEFINE_integer("jump_length", 10, "RePaint's jump length j (steps re-noised per "
                         "resampling).", lower_bound=1)
    flags.DEFINE_integer("resamplings", 10, "RePaint's r: passes over every j-step segment "
                         "(1: no resampling).", lower_bound=1)
    flags.DEFINE_string("sdedit", None, "SDEdit: re-draw IMAGES from q(x_t0 | image), "
                        "t0 = --strength * T, with the chosen --sampler.")
    flags.DEFINE_float("strength", None, "With --sdedit: the share of the chain re-run, in "
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


def check_flags(values: Any) -> str | None:
    """The editing mode the flags ask for (None: plain sampling); ValueError (one line) for
    flags that conflict or would do nothing. Needs no weights."""
    chosen = {"inpaint": values.inpaint, "sdedit": values.sdedit, "encode": values.encode,
              "interpolate": values.interpolate, "progressive": values.progressive}
    modes = [name for name, value in chosen.items() if value is not None]
    if len(modes) > 1:
        raise ValueError(f"Pick one of --{' / --'.join(modes)}; they are separate jobs.")
    mode = modes[0] if modes else None
    lonely = [("mask", "inpaint"), ("strength", "sdedit"), ("at_step", "interpolate")]
    for flag, owner in lonely:
        if getattr(values, flag) is not None and mode != owner:
            raise ValueError(f"--{flag} only applies to --{owner}.")
    if values.ddim_latent and mode != "interpolate":
        raise ValueError("--ddim_latent only applies to --interpolate.")
    if mode == "inpaint" and values.mask is None:
        raise ValueError("--inpaint needs --mask (nonzero = known pixel).")
    if mode == "sdedit" and values.strength is not None and not 0.0 < values.strength <= 1.0:
        raise ValueError(f"--strength={values.strength} must lie in (0, 1] (the share of the "
                         "chain re-run; 1: from noise).")
    if mode == "interpolate":
        if len(values.interpolate) != 2:
            raise ValueError(f"--interpolate takes two files A,B; got {values.interpolate}.")
        if values.at_step is not None and values.ddim_latent:
            raise ValueError("--at_step and --ddim_latent are two methods; pick one.")
    if mode not in (None, "progressive") and (values.labels not in (None, "none")
                                              or values.guidance is not None):
        raise ValueError(f"--{mode} runs the unconditional model; drop --labels / --guidance.")
    if values.grid_cells is not None and mode not in ("inpaint", "sdedit", "encode", "interpolate"):
        raise ValueError("--grid_cells only applies to the image inputs of --inpaint / --sdedit / "
                         "--encode / --interpolate.")
    return mode


@dataclasses.dataclass
class Result:
    """What a job made: images uint8 [N, H, W, C] (the .npz's 'images'), grid uint8 [M, H, W, C]
    tiles with nrow per row, and extra arrays for the .npz."""

    images: np.ndarray
    grid: np.ndarray
    nrow: int
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _in_batches(fn: Callable[..., Any], arrays: list[np.ndarray], batch: int, desc: str) -> np.ndarray:
    """fn(offset, *chunks) on consecutive batches of the arrays (the last padded by repeating
    its last row); the outputs on the host, concatenated, padding dropped."""
    total = arrays[0].shape[0]
    out = []
    for start in tqdm(range(0, total, batch), desc=desc, disable=jax.process_index() != 0):
        chunks = [a[start:start + batch] for a in arrays]
        pad = batch - chunks[0].shape[0]
        chunks = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) if pad else c for c in chunks]
        out.append(np.asarray(gather_to_host(fn(start, *chunks)))[:batch - pad])
    return np.concatenate(out)


def _pairs(first: np.ndarray, second: np.ndarray, per_row: int = 5) -> tuple[np.ndarray, int]:
    """Interleaves [N, ...] pairs (first_n, second_n) as grid tiles; nrow = 2 * per_row."""
    tiles = np.stack([first, second], axis=1).reshape((-1,) + first.shape[1:])
    return tiles, 2 * min(per_row, first.shape[0])


def _to_model(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def run(mode: str, values: Any, *, model_apply: Any, params: Any, schedule: Any,
        image_shape: tuple[int, int, int], options: dict[str, Any], batch_size: int,
        key: jax.Array, mesh: Any = None) -> Result:
    """Runs the editing job `mode` with sample.py's flag `values` and the run's sampler
    `options` (config_lib.sampler_options). Bad inputs raise ValueError before compiling."""
    read = dict(image_shape=image_shape, grid_cells=values.grid_cells)
    T = schedule.num_timesteps
    if mode == "progressive":
        return _progressive(values, model_apply, params, schedule, image_shape, options,
                            batch_size, key, mesh)
    if mode == "interpolate":
        a, b = (edit_io.load_images(path, flag="--interpolate", **read)[0]
                for path in values.interpolate)
        return _interpolate(values, model_apply, params, schedule, options, key, a, b)
    path = getattr(values, mode)
    images = edit_io.load_images(path, flag=f"--{mode}", **read)
    batch = min(batch_size, images.shape[0])
    shape = (batch,) + tuple(image_shape)
    use_mesh = mesh if mesh is not None and batch % mesh.size == 0 else None
    if mode == "inpaint":
        if options["sampler"] != "ddpm":
            raise ValueError(f"--inpaint runs RePaint's ancestral steps; use --sampler=ddpm, not "
                             f"{options['sampler']}.")
        mask = edit_io.load_mask(values.mask, image_shape=image_shape, num_images=images.shape[0])
        plan = make_plan(schedule, steps=options["steps"], spacing=options["spacing"])
        moves = editing.repaint_moves(plan.num_steps, values.jump_length, values.resamplings)
        logging.info("RePaint: %d images, %d steps, j=%d, r=%d: %d network calls per image.",
                     images.shape[0], plan.num_steps, values.jump_length, values.resamplings,
                     int(moves["reverse"].sum()))
        out = _in_batches(lambda n, x, m: editing.repaint(
                model_apply, params, plan, moves, key, _to_model(x), m, example_offset=n,
                mean_type=options["mean_type"], var_type=options["var_type"],
                clip_denoised=options["clip_denoised"], mesh=use_mesh),
                [images, mask], batch, "inpainting")
        shown = np.where(np.broadcast_to(mask, images.shape), images, 128).astype(np.uint8)
        return Result(to_uint8(out), *_pairs(shown, to_uint8(out)), extra=dict(mask=mask))
    if mode == "sdedit":
        strength = 0.5 if values.strength is None else values.strength
        sampler = make_sampler(model_apply, schedule, shape, **options, mesh=use_mesh,
                               start_t=editing.sdedit_start_t(T, strength))
        logging.info("SDEdit: strength %.3g, from t0=%d, %d steps.", strength,
                     int(sampler.plan.timesteps[-1]), sampler.plan.num_steps)
        out = _in_batches(lambda n, x: sampler(params, key, n, init=_to_model(x), start="q_x0")[
                "images"], [images], batch, "sdedit")
        return Result(to_uint8(out), *_pairs(images, to_uint8(out)))
    # encode
    decoder = _ddim_decoder(model_apply, schedule, shape, options, use_mesh)
    latents = _in_batches(lambda n, x: editing.ddim_encode(
            model_apply, params, decoder.plan, _to_model(x), mean_type=options["mean_type"],
            var_type=options["var_type"]), [images], batch, "encoding")
    back = _in_batches(lambda n, z: decoder(params, key, n, init=jnp.asarray(z), start="x_t")[
            "images"], [latents], batch, "decoding")
    error = to_uint8(back).astype(np.float64) - images
    logging.info("DDIM inversion, %d steps: reconstruction RMSE %.2f, max %d (pixel levels "
                 "0..255).", decoder.plan.num_steps, np.sqrt(np.mean(error**2)),
                 np.abs(error).max())
    return Result(to_uint8(back), *_pairs(images, to_uint8(back)),
                  extra=dict(latents=latents.astype(np.float32)))


def _ddim_decoder(model_apply: Any, schedule: Any, shape: tuple[int, ...],
                  options: dict[str, Any], mesh: Any) -> Any:
    """The eta = 0 DDIM chain on the run's --steps / --spacing, unclipped (inversion's pair)."""
    return make_sampler(model_apply, schedule, shape, sampler="ddim", eta=0.0,
                        steps=options["steps"], spacing=options["spacing"],
                        mean_type=options["mean_type"], var_type=options["var_type"],
                        clip_denoised=False, mesh=mesh)


def _interpolate(values: Any, model_apply: Any, params: Any, schedule: Any,
                 options: dict[str, Any], key: jax.Array, a: np.ndarray, b: np.ndarray) -> Result:
    lambdas = np.linspace(0.0, 1.0, values.lambdas)
    shape = (values.lambdas,) + a.shape
    if values.ddim_latent:
        decoder = _ddim_decoder(model_apply, schedule, shape, options, None)
        both = editing.ddim_encode(model_apply, params, decoder.plan,
                                   _to_model(np.stack([a, b])), mean_type=options["mean_type"],
                                   var_type=options["var_type"])
        start = editing.slerp(both[0], both[1], lambdas)
        out = decoder(params, key, init=start, start="x_t")["images"]
    else:
        T = schedule.num_timesteps
        at_step = values.at_step if values.at_step is not None else T // 2
        if not 0 <= at_step < T:
            raise ValueError(f"--at_step={at_step} must lie in 0..{T - 1}.")
        noise = jax.random.normal(jax.random.fold_in(key, 1 << 30), a.shape, jnp.float32)
        scale = float(np.sqrt(np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[at_step]))
        start = editing.q_interpolate(scale, _to_model(a), _to_model(b), noise, lambdas)
        sampler = make_sampler(model_apply, schedule, shape, **options, start_t=at_step)
        # Every lambda draws the same noise (row index 0), as in the paper's figure.
        out = sampler(params, key, init=start, start="x_t",
                      rows=np.zeros(values.lambdas, np.int32))["images"]
    out = to_uint8(gather_to_host(out))
    return Result(out, np.concatenate([a[None], out, b[None]]), values.lambdas + 2,
                  extra=dict(lambdas=lambdas.astype(np.float32)))


def _progressive(values: Any, model_apply: Any, params: Any, schedule: Any,
                 image_shape: tuple[int, int, int], options: dict[str, Any], batch_size: int,
                 key: jax.Array, mesh: Any) -> Result:
    num = values.num_samples
    batch = min(batch_size, num)
    use_mesh = mesh if mesh is not None and batch % mesh.size == 0 else None
    sampler = make_sampler(model_apply, schedule, (batch,) + tuple(image_shape), **options,
                           return_every=values.progressive, mesh=use_mesh)
    records = []
    finals = _in_batches(lambda n, _: _keep(records, sampler(params, key, n)), [np.zeros(num)],
                         batch, "sampling")
    steps = np.concatenate([np.asarray(gather_to_host(r)) for r in records], axis=1)[:, :num]
    steps = np.swapaxes(to_uint8(steps), 0, 1)  # [N, K, H, W, C]
    shown = steps[:max(1, 100 // steps.shape[1])]
    return Result(to_uint8(finals), shown.reshape((-1,) + steps.shape[2:]), steps.shape[1],
                  extra=dict(progressive=steps, progressive_timesteps=sampler.timesteps))


def _keep(records: list, result: dict) -> jax.Array:
    records.append(result["pred_x0"])
    return result["images"]


def run_and_write(mode: str, values: Any, *, model: Any, params: Any, config: Any,
                  options: dict[str, Any], batch_size: int) -> None:
    """sample.py's editing path: `run` on the run's model, then the grid at values.out and the
    .npz beside it ('images' plus the job's extra arrays)."""
    if jax.process_count() > 1:
        raise ValueError(f"--{mode} runs on one host; start sample.py on one process.")
    from ddpm_jax import config as config_lib
    from ddpm_jax.images import save_samples
    from ddpm_jax.parallel import make_mesh
    from ddpm_jax.sampling import ModelApply

    result = run(mode, values, model_apply=ModelApply(model), params=params,
                 schedule=config_lib.schedule_from_config(config),
                 image_shape=config_lib.image_shape(config), options=options,
                 batch_size=batch_size, key=jax.random.key(values.seed),
                 mesh=make_mesh() if jax.device_count() > 1 else None)
    npz_path = save_samples(result.images, values.out, grid_images=result.grid, extra=result.extra,
                            nrow=values.nrow or result.nrow, tile_px=values.tile_px,
                            max_tiles=values.max_grid_tiles)  # atomic, the .npz last
    logging.info("Wrote %s and %s: uint8 %s.", values.out, npz_path, result.images.shape)
