"""Draws samples from a trained or converted DDPM and writes a PNG grid and an .npz of uint8.

    python sample.py --workdir runs/digits --num_samples 64 --out samples.png
    python sample.py --workdir runs/digits --weights=raw --sampler ddim --steps 50
    python sample.py --workdir runs/digits --sampler dpm++ --steps 20 [--order 2] [--spacing logsnr]
    python sample.py --diffusers_dir PATH --num_samples 16 --batch_size 16 --out cifar.png
    python sample.py --workdir runs/digits_cond --labels balanced --guidance 1.0  # num_classes runs
    python sample.py --workdir runs/digits --classifier runs/digits-clf --labels 3,7 --classifier_scale 2
    python sample.py --workdir runs/digits --inpaint x.npz --mask m.png --steps 250 --out fill.png
    python sample.py --workdir runs/digits --sdedit x.png --strength 0.5 --sampler ddim --steps 50
    python sample.py --workdir runs/digits --encode x.npz --steps 100 --out recon.png
    python sample.py --workdir runs/digits --interpolate a.png,b.png --lambdas 9 [--ddim_latent]
    python sample.py --workdir runs/digits --progressive 100 --num_samples 8

The editing jobs (ddpm_jax/edit_jobs.py) write a grid of (input, output) pairs and the outputs
to the .npz ('images'; --encode adds 'latents', --progressive adds 'progressive').

Unset sampler flags take the run's config.sampling (--workdir) or the paper's settings
(--diffusers_dir). The chain is compiled once per (batch shape, steps) and reused for every
batch; sample n is drawn from fold_in(seed key, n), so the images do not depend on
--batch_size or on the number of devices. With several devices the batch is sharded over the
training mesh's "data" axis.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags, logging

from ddpm_jax import edit_jobs
from ddpm_jax.cli import (check_classifier_flags, check_output_path, check_solver_flags, drop_closed_event_loop_noise,
                          parse_steps)
from ddpm_jax.diffusion import VAR_TYPES
from ddpm_jax.labels import check_label_text, check_labels_and_guidance, sample_labels
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
                  "Default config.sampling.spacing with the config's sampler, else time.")
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
                    "to draw, 'balanced' (sample n is class n mod num_classes; 'all' is a "
                    "deprecated alias) or a comma-separated list cycled over the samples ('3' "
                    "draws only 3s). Default ('none'): the null label, i.e. the unconditional "
                    "model that label dropout trained. With --classifier: the classes the "
                    "classifier guides towards (any model).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w >= 0 with --labels: "
                   "(1 + w) eps(x, y) - w eps(x, null); two model calls per step.",
                   lower_bound=0.0)
flags.DEFINE_string("classifier", None, "Classifier guidance: the work dir of a noise-"
                    "conditional classifier run (configs/digits.py:classifier); needs --labels.")
flags.DEFINE_float("classifier_scale", None, "Classifier guidance scale s >= 0 (default 1 with "
                   "--classifier): mu + s Sigma grad log p(y|x_t) (ancestral), eps - s "
                   "sqrt(1 - abar) grad log p(y|x_t) (ddim, dpm++).", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("nrow", None, "Images per row of the grid (default ceil(sqrt(N))).",
                     lower_bound=1)
flags.DEFINE_integer("tile_px", 64, "Each grid tile is upscaled (nearest) to at least this many "
                     "pixels; 1 keeps the native size.", lower_bound=1)
flags.DEFINE_integer("max_grid_tiles", 100, "The grid shows the first N images; every image "
                     "goes to the .npz.", lower_bound=1)
flags.mark_flags_as_mutual_exclusive(["workdir", "diffusers_dir"], required=True)
edit_jobs.define_flags()


def _check_flags() -> tuple[Any, str | None]:
    """The checks that need no weights, before anything is loaded; returns the parsed --labels
    and the editing mode (None: plain sampling)."""
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
        classes = check_label_text(FLAGS.labels, "--labels")
        check_labels_and_guidance(classes, FLAGS.guidance, labels_name="--labels",
                                  guidance_name="--guidance", class_lists=True)
        mode = edit_jobs.check_flags(FLAGS)
        check_classifier_flags(FLAGS.classifier, FLAGS.classifier_scale, classes,
                               FLAGS.guidance)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return classes, mode


def _load_classifier(config: Any) -> tuple[Any, Any]:
    """(ClassifierApply, params) of --classifier, checked against the model's config."""
    from ddpm_jax import checkpoint
    from ddpm_jax.sampling import ClassifierApply
    try:
        _, model, params = checkpoint.load_classifier(FLAGS.classifier, for_config=config)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        raise app.UsageError(" ".join(str(e).split("\n"))) from None
    return ClassifierApply(model), params


def _load() -> tuple[Any, Any, Any]:
    """(config, model, params) of --workdir's checkpoint or of --diffusers_dir."""
    if FLAGS.workdir is not None:
        from ddpm_jax import checkpoint
        try:
            return checkpoint.load_for_sampling(FLAGS.workdir, weights=FLAGS.weights)
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise app.UsageError(f"--workdir={FLAGS.workdir}: {e}") from None
    from ddpm_jax import convert
    try:
        return convert.load_for_sampling(FLAGS.diffusers_dir)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--diffusers_dir={FLAGS.diffusers_dir}: {e}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    classes, mode = _check_flags()
    drop_closed_event_loop_noise()

    import jax

    from ddpm_jax import config as config_lib
    from ddpm_jax.images import save_samples
    from ddpm_jax.parallel import make_mesh, round_up_to_devices
    from ddpm_jax.sampling import ModelApply, draw_images, make_sampler

    config, model, params = _load()
    classifier, classifier_params = (None, None) if FLAGS.classifier is None else \
        _load_classifier(config)
    num_devices = jax.device_count()
    batch_size = FLAGS.batch_size or config.sampling.batch_size
    try:  # flags over the run's config.sampling (or the paper's settings)
        options = config_lib.sampler_options(
                config, sampler=FLAGS.sampler, steps=parse_steps(FLAGS.steps), eta=FLAGS.eta,
                spacing=FLAGS.spacing, order=FLAGS.order, threshold=FLAGS.threshold,
                var_type=FLAGS.var_type, clip_denoised=FLAGS.clip_denoised)
        check_solver_flags(options["sampler"], FLAGS.eta, FLAGS.order)
        labels = sample_labels(classes, getattr(model, "num_classes", None) if classifier is None
                               else classifier.num_classes, FLAGS.num_samples, name="--labels")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if options["sampler"] != "ddim":  # a DDIM config's eta, when a flag picks another sampler
        options["eta"] = 0.0
    if batch_size % num_devices:
        raise app.UsageError(f"--batch_size={batch_size} must be a multiple of the "
                             f"{num_devices} devices.")
    # No bigger a batch than the samples need (rounded up to whole devices).
    edit_batch = batch_size  # editing jobs batch their input images, not --num_samples
    batch_size = min(batch_size, round_up_to_devices(FLAGS.num_samples, num_devices))
    try:  # NumPy only: bad values fail here, before any compile.
        sampler = make_sampler(ModelApply(model), config_lib.schedule_from_config(config),
                               (batch_size, *config_lib.image_shape(config)), **options,
                               guidance=FLAGS.guidance, classifier=classifier,
                               classifier_scale=(0.0 if classifier is None else
                                                 1.0 if FLAGS.classifier_scale is None
                                                 else FLAGS.classifier_scale),
                               mesh=make_mesh() if num_devices > 1 else None)
    except ValueError as e:
        raise app.UsageError(f"Bad sampling option (--sampler / --steps / --spacing / --order / "
                             f"--eta / --threshold / --var_type): {e}") from None
    logging.info("Sampling %d images of %s: %s, %d steps, %s, batch %d%s.", FLAGS.num_samples,
                 config_lib.image_shape(config), options["sampler"], sampler.plan.num_steps,
                 {"ddim": f"eta={options['eta']}", "dpm++": f"order {options['order']}"}.get(
                         options["sampler"], options["var_type"]) + f", {options['spacing']} spacing",
                 batch_size, "" if labels is None else
                 f", labels {FLAGS.labels}" + (f", guidance {FLAGS.guidance}"
                                               if FLAGS.guidance is not None else "")
                 + ("" if classifier is None else f", classifier {FLAGS.classifier} scale "
                    f"{sampler.classifier_scale:g}"))
    if mode is not None:
        if jax.process_count() > 1:
            raise app.UsageError(f"--{mode} runs on one host; start sample.py on one process.")
        try:
            edit_jobs.run_and_write(mode, FLAGS, model=model, params=params, config=config,
                                    options=options, batch_size=edit_batch)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        return
    images = draw_images(sampler, params, jax.random.key(FLAGS.seed), FLAGS.num_samples,
                         labels=labels, desc="batches", classifier_params=classifier_params)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        npz_path = save_samples(images, FLAGS.out, labels, nrow=FLAGS.nrow,
                                tile_px=FLAGS.tile_px, max_tiles=FLAGS.max_grid_tiles)
        logging.info("Wrote %s and %s: uint8 %s.", FLAGS.out, npz_path, images.shape)



if __name__ == "__main__":
    app.run(main)
