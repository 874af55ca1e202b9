"""Draws samples from a trained or converted DDPM and writes a PNG grid and an .npz of uint8.

    python sample.py --workdir runs/digits --num_samples 64 --out samples.png
    python sample.py --workdir runs/digits --weights=raw --sampler ddim --steps 50
    python sample.py --workdir runs/digits --sampler dpm++ --steps 20 [--order 2] [--spacing logsnr]
    python sample.py --diffusers_dir PATH --num_samples 16 --batch_size 16 --out cifar.png
    python sample.py --workdir runs/digits_cond --labels all --guidance 1.0   # num_classes runs

Unset sampler flags take the run's config.sampling (--workdir) or the paper's settings
(--diffusers_dir). The chain is compiled once per (batch shape, steps) and reused for every
batch; sample n is drawn from fold_in(seed key, n), so the images do not depend on
--batch_size or on the number of devices. With several devices the batch is sharded over the
training mesh's "data" axis.
"""

from __future__ import annotations

import math
import os
from typing import Any

from absl import app, flags, logging

from ddpm_jax.cli import check_output_path, drop_closed_event_loop_noise
from ddpm_jax.diffusion import VAR_TYPES
from ddpm_jax.plans import MAX_SOLVER_ORDER, SPACINGS
from ddpm_jax.sampling import SAMPLERS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir; its latest checkpoint is sampled.")
flags.DEFINE_string("diffusers_dir", None, "A diffusers UNet2DModel folder (config.json + "
                    "weights, or a pipeline folder with unet/), e.g. google/ddpm-cifar10-32; "
                    "sampled with the paper's schedule (linear 1e-4..0.02, T=1000, eps).")
flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "With --workdir: EMA or raw weights.")
flags.DEFINE_integer("num_samples", 64, "How many images to draw.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Images per compiled batch, a multiple of the device "
                     "count (default config.sampling.batch_size, or 64).", lower_bound=1)
flags.DEFINE_string("out", "samples.png", "Output PNG grid; the .npz (key 'images', uint8 "
                    "[N, H, W, C]; with --labels also 'labels', int32 [N]) goes beside it with "
                    "the suffix .npz.")
flags.DEFINE_enum("sampler", None, list(SAMPLERS), "ddpm: ancestral; ddim: Song et al.; "
                  "dpm++: DPM-Solver++ multistep, deterministic, near-converged in 15-25 steps "
                  "(default config.sampling.sampler, or ddpm).")
flags.DEFINE_string("steps", None, "Reverse steps: an int S (evenly spaced, t=0 and t=T-1 "
                    "kept), 'ddimS' (stride range(0, T, c)) or 'S1,S2,...' (default "
                    "config.sampling.steps, or all T).")
flags.DEFINE_enum("spacing", None, list(SPACINGS), "Which timesteps --steps keeps: time "
                  "(as --steps says) or logsnr (S steps uniform in log-SNR; --steps an int). "
                  "Default config.sampling.spacing, or time.")
flags.DEFINE_integer("order", None, "DPM-Solver++ order with --sampler=dpm++ (default "
                     "config.sampling.order, or 2; 1 is DDIM with eta 0).", lower_bound=1,
                     upper_bound=MAX_SOLVER_ORDER)
flags.DEFINE_float("threshold", None, "Dynamic thresholding of each x0 prediction at this "
                   "percentile (Imagen: 0.995) instead of the [-1, 1] clip (default "
                   "config.sampling.threshold, or off).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1]: 0 deterministic, 1 DDPM's beta~ variance "
                   "(default config.sampling.eta, or 0).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("var_type", None, list(VAR_TYPES), "Reverse variance of --sampler=ddpm "
                  "(default: the run's; for --diffusers_dir fixedlarge below 64px, else "
                  "fixedsmall, as the official scripts).")
flags.DEFINE_boolean("clip_denoised", None, "Clip each x0 prediction to [-1, 1] (default "
                     "config.sampling.clip_denoised, or true).")
flags.DEFINE_string("labels", None, "Class-conditional runs (model.num_classes): the classes "
                    "to draw, 'all' (sample n is class n mod num_classes) or a comma-separated "
                    "list cycled over the samples ('3' draws only 3s). Default: the null label, "
                    "i.e. the unconditional model that label dropout trained.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w >= 0 with --labels: "
                   "(1 + w) eps(x, y) - w eps(x, null); two model calls per step.",
                   lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("nrow", None, "Images per row of the grid (default ceil(sqrt(N))).",
                     lower_bound=1)
flags.DEFINE_integer("tile_px", 64, "Each grid tile is upscaled (nearest) to at least this many "
                     "pixels; 1 keeps the native size.", lower_bound=1)
flags.DEFINE_integer("max_grid_tiles", 100, "The grid shows the first N images; every image "
                     "goes to the .npz.", lower_bound=1)
flags.mark_flags_as_mutual_exclusive(["workdir", "diffusers_dir"], required=True)


def _check_flags() -> None:
    """The checks that need no weights, before anything is loaded."""
    if FLAGS.workdir is not None:
        if not os.path.isdir(FLAGS.workdir):
            raise app.UsageError(f"--workdir={FLAGS.workdir} does not exist; train into it with "
                                 "train.py first, or pass --diffusers_dir for released weights.")
        if not os.listdir(FLAGS.workdir):
            raise app.UsageError(f"--workdir={FLAGS.workdir} is empty: it holds no checkpoint to "
                                 "sample; train into it with train.py first.")
    if not FLAGS.out.endswith(".png"):
        raise app.UsageError(f"--out={FLAGS.out} must end in .png (the .npz goes beside it).")
    try:  # before any weights load or compile: a bad --out must not cost the sampling
        for path in (FLAGS.out, FLAGS.out[:-len(".png")] + ".npz"):
            check_output_path(path, "--out")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.guidance is not None and FLAGS.labels is None:
        raise app.UsageError("--guidance needs --labels: the classes to guide towards.")
    if FLAGS.labels is not None and FLAGS.labels.strip() != "all":
        try:
            _parse_labels(FLAGS.labels)
        except ValueError as e:
            raise app.UsageError(f"--labels={FLAGS.labels}: {e}") from None


def _parse_labels(text: str) -> list[int]:
    """'3,1,4' -> [3, 1, 4] (no range check: that needs the model)."""
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError("write 'all' or comma-separated class numbers, e.g. '0,1,2'.") from None
    if min(labels) < 0:
        raise ValueError("class numbers are >= 0.")
    return labels


def _sample_labels(num_classes: int | None) -> Any:
    """The class of each of the --num_samples images ([N] int), or None without --labels."""
    if FLAGS.labels is None:
        return None
    if num_classes is None:
        raise app.UsageError(f"--labels={FLAGS.labels}: this model is unconditional "
                             "(model.num_classes unset); drop --labels and --guidance.")
    import numpy as np
    text = FLAGS.labels.strip()
    classes = list(range(num_classes)) if text == "all" else _parse_labels(text)
    if max(classes) >= num_classes:
        raise app.UsageError(f"--labels={FLAGS.labels}: this model has classes 0..{num_classes - 1}.")
    return np.resize(np.asarray(classes, dtype=np.int32), FLAGS.num_samples)


def _load() -> tuple[Any, Any, dict[str, Any], dict[str, Any], tuple[int, int, int]]:
    """(model, params, diffusion settings, sampling defaults, image shape (H, W, C))."""
    if FLAGS.workdir is not None:
        from ddpm_jax import checkpoint
        try:
            config, model, params = checkpoint.load_for_sampling(FLAGS.workdir,
                                                                 weights=FLAGS.weights)
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise app.UsageError(f"--workdir={FLAGS.workdir}: {e}") from None
        diffusion = dict(config.diffusion)
        defaults = dict(config.sampling)
        if defaults.get("var_type") is None:
            defaults["var_type"] = diffusion["var_type"]
        size, channels = config.data.image_size, config.data.channels
    else:
        from ddpm_jax.convert import load_diffusers_unet, read_diffusers_config
        try:
            unet_config = read_diffusers_config(FLAGS.diffusers_dir)
            model, params = load_diffusers_unet(FLAGS.diffusers_dir)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--diffusers_dir={FLAGS.diffusers_dir}: {e}") from None
        size = unet_config["sample_size"]
        size = size if isinstance(size, int) else size[0]
        channels = unet_config["in_channels"]
        diffusion = dict(schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         mean_type="eps")
        # The official sampling scripts: fixedlarge for CIFAR-10, fixedsmall for 256px.
        defaults = dict(sampler="ddpm", steps=None, eta=0.0, clip_denoised=True, batch_size=64,
                        var_type="fixedlarge" if size < 64 else "fixedsmall")
    defaults = dict(dict(spacing="time", order=2, threshold=None), **defaults)  # older configs
    return model, params, diffusion, defaults, (size, size, channels)


def _resolve(defaults: dict[str, Any]) -> dict[str, Any]:
    """Flags over the defaults; eta only where the sampler is DDIM, order only for DPM-Solver++."""
    from ddpm_jax.cli import parse_steps
    chosen = dict(sampler=FLAGS.sampler, steps=parse_steps(FLAGS.steps), eta=FLAGS.eta,
                  spacing=FLAGS.spacing, order=FLAGS.order, threshold=FLAGS.threshold,
                  var_type=FLAGS.var_type, clip_denoised=FLAGS.clip_denoised,
                  batch_size=FLAGS.batch_size)
    options = {k: defaults.get(k) if v is None else v for k, v in chosen.items()}
    if options["sampler"] != "ddim":
        if FLAGS.eta:
            raise app.UsageError(f"--eta={FLAGS.eta} only applies to --sampler=ddim.")
        options["eta"] = 0.0
    if options["sampler"] != "dpm++":
        if FLAGS.order is not None:
            raise app.UsageError(f"--order={FLAGS.order} only applies to --sampler=dpm++.")
        options["order"] = None
    return options


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    _check_flags()
    drop_closed_event_loop_noise()

    import jax
    import numpy as np

    from ddpm_jax.images import save_image_grid
    from ddpm_jax.sampling import ModelApply, draw_images, make_sampler
    from ddpm_jax.schedule import Schedule

    model, params, diffusion, defaults, image_shape = _load()
    options = _resolve(defaults)
    labels = _sample_labels(getattr(model, "num_classes", None))
    schedule = Schedule.create(diffusion["schedule"], diffusion["timesteps"],
                               beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"])
    num_devices = jax.device_count()
    if options["batch_size"] % num_devices:
        raise app.UsageError(f"--batch_size={options['batch_size']} must be a multiple of the "
                             f"{num_devices} devices.")
    # No bigger a batch than the samples need (rounded up to whole devices).
    batch_size = min(options["batch_size"], math.ceil(FLAGS.num_samples / num_devices) * num_devices)
    mesh = None
    if num_devices > 1:
        from ddpm_jax.parallel import make_mesh
        mesh = make_mesh()
    try:  # NumPy only: bad values fail here, before any compile.
        sampler = make_sampler(ModelApply(model), schedule, (batch_size, *image_shape),
                               sampler=options["sampler"], steps=options["steps"],
                               eta=options["eta"], spacing=options["spacing"],
                               order=options["order"], threshold=options["threshold"],
                               mean_type=diffusion["mean_type"],
                               var_type=options["var_type"],
                               clip_denoised=options["clip_denoised"], guidance=FLAGS.guidance,
                               mesh=mesh)
    except ValueError as e:
        raise app.UsageError(f"Bad sampling option (--sampler / --steps / --spacing / --order / "
                             f"--eta / --threshold / --var_type): {e}") from None
    logging.info("Sampling %d images of %s: %s, %d steps, %s, batch %d%s.", FLAGS.num_samples,
                 image_shape, options["sampler"], sampler.plan.num_steps,
                 {"ddim": f"eta={options['eta']}", "dpm++": f"order {options['order']}"}.get(
                         options["sampler"], options["var_type"]) + f", {options['spacing']} spacing",
                 batch_size, "" if labels is None else
                 f", labels {FLAGS.labels}" + (f", guidance {FLAGS.guidance}"
                                               if FLAGS.guidance is not None else ""))
    images = draw_images(sampler, params, jax.random.key(FLAGS.seed), FLAGS.num_samples,
                         labels=labels, desc="batches")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        save_image_grid(images, FLAGS.out, nrow=FLAGS.nrow, tile_px=FLAGS.tile_px,
                        max_tiles=FLAGS.max_grid_tiles)
        npz_path = FLAGS.out[:-len(".png")] + ".npz"
        np.savez(npz_path, images=images, **({} if labels is None else {"labels": labels}))
        logging.info("Wrote %s and %s: uint8 %s.", FLAGS.out, npz_path, images.shape)


if __name__ == "__main__":
    app.run(main)
