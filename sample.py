"""Draws samples from a trained or converted DDPM and writes a PNG grid and an .npz of uint8.

    python sample.py --workdir runs/digits --num_samples 64 --out samples.png
    python sample.py --workdir runs/digits --sampler dpm++ --steps 20 [--order 2] [--spacing logsnr]
    python sample.py --diffusers_dir PATH --num_samples 16 --batch_size 16 --out cifar.png
    python sample.py --workdir runs/digits_cond --labels balanced --guidance 1.0
    python sample.py --workdir runs/digits --classifier runs/digits-clf --labels 3,7 --classifier_scale 2
    python sample.py --workdir runs/digits --inpaint x.npz --mask m.png --steps 250 --out fill.png
    (--sdedit / --encode / --interpolate / --progressive: see ddpm_jax/editing/jobs.py)
    python sample.py --workdir runs/digits_cond --diffedit x.npz --from_label 3 --to_label 8
    (--blend / --pnp, editing by class: see ddpm_jax/editing/class_jobs.py)
    python sample.py --workdir runs/digits_cond --views identity,rot180 --labels 6,9
    (--style_ref: see ddpm_jax/editing/generation_jobs.py)
    python sample.py --workdir runs/digits_controlnet --control lowres.png [--control_scale 1]
    python sample.py --workdir runs/digits_sr --condition small.npz   (or --condition RUN: a cascade;
    see ddpm_jax/editing/control_jobs.py)

Unset sampler flags take the run's config.sampling (--workdir) or the paper's settings
(--diffusers_dir). The chain compiles once per (batch shape, steps); sample n is drawn from
fold_in(seed key, n), so the images depend neither on --batch_size nor on the device count.
"""

from __future__ import annotations

from absl import app, flags

from ddpm_jax import cli
from ddpm_jax.editing import control_jobs, generation_jobs
from ddpm_jax.editing import jobs as edit_jobs
from ddpm_jax.labels import check_label_text, check_labels_and_guidance, sample_labels

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir; its latest checkpoint is sampled.")
flags.DEFINE_string("diffusers_dir", None, "A diffusers UNet2DModel folder (config.json + "
                    "weights, or a pipeline folder with unet/), e.g. google/ddpm-cifar10-32; "
                    "sampled with the paper's schedule (linear 1e-4..0.02, T=1000, eps).")
flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "With --workdir: EMA or raw weights.")
flags.DEFINE_integer("num_samples", 64, "How many images to draw.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Images per compiled batch, a multiple of the device "
                     "count (default config.sampling.batch_size, or 64).", lower_bound=1)
flags.DEFINE_string("out", "samples.png", "Output PNG grid; the .npz (uint8 'images' [N, H, W, "
                    "C], with --labels int32 'labels' [N]) goes beside it.")
cli.define_sampler_flags(variance=True)
flags.DEFINE_string("labels", None, "The classes to draw: 'balanced' (sample n of class n mod "
                    "N) or a comma-separated list cycled over the samples ('3': only 3s). "
                    "Default: the null label (class-conditional runs) or none.")
cli.define_guidance_flags("--labels")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("nrow", None, "Grid images per row (default ceil(sqrt(N))).", lower_bound=1)
flags.DEFINE_integer("tile_px", 64, "Grid tiles are upscaled (nearest) to at least this many "
                     "pixels.", lower_bound=1)
flags.DEFINE_integer("max_grid_tiles", 100, "The grid shows the first N images.", lower_bound=1)
flags.mark_flags_as_mutual_exclusive(["workdir", "diffusers_dir"], required=True)
edit_jobs.define_flags()
generation_jobs.define_flags()  # --views (Visual Anagrams), --style_ref (StyleAligned)
control_jobs.define_flags()  # --control (ControlNet), --condition (super-resolution, cascades)


def _check_flags():
    """Every check that needs no weights, before anything loads: (parsed --labels, edit mode)."""
    cli.check_run_dir(FLAGS.workdir, "--workdir")
    cli.check_png_output(FLAGS.out, "--out")
    classes = check_label_text(FLAGS.labels, "--labels")
    mode = edit_jobs.check_flags(FLAGS)
    guided = edit_jobs.class_jobs.guided_classes(FLAGS, mode, classes)  # --to_label of a class edit
    check_labels_and_guidance(guided, FLAGS.guidance, labels_name="--labels",
                              guidance_name="--guidance", class_lists=True)
    cli.check_classifier_flags(FLAGS.classifier, FLAGS.classifier_scale, guided, FLAGS.guidance)
    return classes, mode


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        classes, mode = _check_flags()
        generation_mode = generation_jobs.check_flags(FLAGS, mode)  # --views / --style_ref, or None
        control_mode = control_jobs.check_flags(FLAGS, mode or generation_mode)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    cli.drop_closed_event_loop_noise()
    import jax

    from ddpm_jax import config as config_lib
    from ddpm_jax import images, runs
    try:  # loading, then NumPy only: bad values fail here, before any compile
        config, model, params = cli.load_model(FLAGS.workdir, FLAGS.diffusers_dir, FLAGS.weights)
        classifier = None if FLAGS.classifier is None else \
            runs.load_classifier(FLAGS.classifier, image_shape=config_lib.image_shape(config),
                                 timesteps=config.diffusion.timesteps)
        cli.check_var_type(FLAGS.var_type, config)
        labels = sample_labels(classes, getattr(classifier[0] if classifier else model,
                                                "num_classes", None),
                               FLAGS.num_samples, name="--labels")
        batch_size = cli.check_batch_size(FLAGS.batch_size or config.sampling.batch_size,
                                          jax.device_count(), "--batch_size")
        given = {k: v for k, v in cli.sampler_flag_values(FLAGS).items() if v is not None}
        context = edit_jobs.Context.from_config(
                config, model, params, flags=given, batch_size=batch_size, seed=FLAGS.seed,
                labels=labels, guidance=FLAGS.guidance, classifier=classifier,
                classifier_scale=FLAGS.classifier_scale)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:  # plain sampling, or an edit on batches of the input images; written atomically
        if control_mode is not None:
            return control_jobs.run_and_write(control_mode, FLAGS, context, config, model)
        if generation_mode is not None:
            return generation_jobs.run_and_write(generation_mode, FLAGS, context)
        edit_jobs.run_and_write(mode or "sample", FLAGS, context)
    except (ValueError, images.OutputError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
