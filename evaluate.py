"""Evaluates a trained DDPM: bits/dim, FID / IS / KID with the protocol printed and saved.

    python evaluate.py --workdir runs/digits --metrics bpd,fid,is --num_samples 1000
    python evaluate.py --workdir runs/digits --metrics bpd,ode_bpd --bpd_num_images 100

Unset flags take the run's config.eval / config.sampling; see ddpm_jax/evaluate.py for the
protocol of each measurement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from ddpm_jax import cli, features, sampling
from ddpm_jax.evaluate import METRICS, sample_metrics
from ddpm_jax.labels import LABEL_MODES, check_labels_and_guidance

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir; its latest checkpoint (or --step) "
                    "is evaluated and the report goes to WORKDIR/eval.", required=True)
flags.DEFINE_list("metrics", "bpd,fid,is", f"Comma-separated, from {','.join(METRICS)}.")
flags.DEFINE_integer("num_samples", None, "Generated images for FID / IS / KID "
                     "(default config.eval.fid_num_samples).", lower_bound=2)
cli.define_sampler_flags(variance=False)
cli.define_ode_flags()
flags.DEFINE_integer("batch_size", None, "Images per sampler call (default "
                     "config.eval.fid_batch_size).", lower_bound=1)
flags.DEFINE_enum("split", None, ["train", "test"], "Split for bits/dim (default "
                  "config.eval.bpd_split).")
flags.DEFINE_integer("bpd_num_images", None, "First N images of the split (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("bpd_batch_size", None, "Images per bits/dim call (default "
                     "config.eval.bpd_batch_size).", lower_bound=1)
flags.DEFINE_enum("reference_split", None, ["train", "test"], "Reference statistics for "
                  "FID / KID (default config.eval.fid_reference; the paper uses train).")
flags.DEFINE_enum("feature_net", None, list(features.FEATURE_NETS), "digits: the project's "
                  "digits classifier (digits-FID / digits-IS); inception: the FID "
                  "InceptionV3 (needs --inception_weights). Default: digits for the "
                  "digits data, else inception.")
flags.DEFINE_string("inception_weights", None, "Local pt_inception-2015-12-05-6726825d.pth "
                    "(pytorch-fid's release) or its .npz export.")
flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "EMA (as the paper) or raw parameters.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("labels", None, list(LABEL_MODES), "Class-conditional models: "
                  "none draws with the null label (unconditional); balanced gives sample n "
                  "class n mod N (default config.eval.labels).")
cli.define_guidance_flags("--labels=balanced")
flags.DEFINE_integer("seed", None, "PRNG seed (default config.training.seed).")
flags.DEFINE_string("cache_dir", None, "Classifier weights and reference statistics "
                    "(default $DDPM_JAX_CACHE or ~/.cache/ddpm_jax).")
flags.DEFINE_boolean("save_samples", True, "Also write the samples (.npz and a PNG grid).")
flags.DEFINE_boolean("progress", True, "Progress bars.")
# --metrics zero_shot: the diffusion classifier's accuracy on --split (ddpm_jax/zero_shot.py).
flags.DEFINE_integer("zero_shot_samples", None, "With --metrics zero_shot: (t, eps) pairs per "
                     "image, shared by every class (default 64).", lower_bound=1)
flags.DEFINE_integer("zero_shot_images", None, "With --metrics zero_shot: the first N images "
                     "of --split (default: all).", lower_bound=1)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {list(argv[1:])}; every option is a --flag.")
    try:  # before any checkpoint loads or anything compiles
        cli.check_output_path(os.path.join(FLAGS.workdir, "eval"), "--workdir", directory=True)
        if FLAGS.cache_dir is not None:
            cli.check_output_path(FLAGS.cache_dir, "--cache_dir", directory=True)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    import jax

    from ddpm_jax import checkpoint, evaluate, images, latent, memory, parallel, runs  # orbax: after the flags
    from ddpm_jax import config as config_lib
    cli.drop_closed_event_loop_noise()
    try:  # none, an incompatible or corrupt checkpoint: one line, as sample.py
        step, config, model, params = runs.load_step_for_sampling(
                FLAGS.workdir, weights=FLAGS.weights, step=FLAGS.step)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise app.UsageError(f"--workdir={FLAGS.workdir}: " + " ".join(str(e).split("\n"))) from None
    try:  # NumPy only: a bad option stops here, before anything compiles
        cli.check_denoiser(config, "--workdir", FLAGS.workdir)
        latent.check_metrics(config, FLAGS.metrics)  # bits/dim: pixels only
        options = evaluate.EvalOptions.from_config(
                config, metrics=tuple(FLAGS.metrics), num_samples=FLAGS.num_samples,
                sampler=cli.sampler_flag_values(FLAGS), sample_batch_size=FLAGS.batch_size,
                bpd_split=FLAGS.split,
                bpd_num_images=FLAGS.bpd_num_images, bpd_batch_size=FLAGS.bpd_batch_size,
                reference_split=FLAGS.reference_split, feature_net=FLAGS.feature_net,
                inception_weights=FLAGS.inception_weights, seed=FLAGS.seed,
                cache_dir=FLAGS.cache_dir, save_samples=FLAGS.save_samples, labels=FLAGS.labels,
                guidance=FLAGS.guidance, classifier=FLAGS.classifier,
                classifier_scale=FLAGS.classifier_scale, ode_solver=FLAGS.ode_solver,
                ode_trace=FLAGS.ode_trace, ode_tolerance=FLAGS.ode_tolerance,
                ode_steps=FLAGS.ode_steps, ode_dequantization=FLAGS.ode_dequantization,
                zero_shot_samples=FLAGS.zero_shot_samples,
                zero_shot_images=FLAGS.zero_shot_images)
        if options.classifier is None:
            check_labels_and_guidance(options.labels, options.guidance, model.num_classes,
                                      labels_name="--labels", guidance_name="--guidance")
        options.sampler.plan(config_lib.schedule_from_config(config))
        if "zero_shot" in options.metrics and model.num_classes is None:
            raise ValueError("--metrics zero_shot: the diffusion classifier needs a "
                             "class-conditional run (model.num_classes set); this one is "
                             "unconditional.")
        if "zero_shot" in options.metrics and config.diffusion.mean_type != "eps":
            raise ValueError(f"--metrics zero_shot scores noise predictions; this run predicts "
                             f"{config.diffusion.mean_type!r} (diffusion.mean_type).")
        if "ode_bpd" in options.metrics and config.diffusion.mean_type == "xprev":
            raise ValueError("--metrics ode_bpd: this run predicts the posterior mean "
                             "(diffusion.mean_type='xprev'), which has no continuous-time "
                             "reading; use --metrics bpd.")
        if sample_metrics(options.metrics):
            features.check_feature_net(options.feature_net, options.inception_weights)
            memory.check_sampling_batch(model, config_lib.image_shape(config),
                                        min(options.sample_batch_size, options.num_samples),
                                        options.num_samples)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        classifier = None if options.classifier is None else \
            runs.load_classifier(options.classifier, image_shape=config_lib.image_shape(config),
                                 timesteps=config.diffusion.timesteps)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    try:  # non-finite samples, an output that cannot be written: one line, no report
        report = evaluate.run_evaluation(evaluate.RunData.from_config(config),
                                         sampling.ModelApply(model), params, options,
                                         workdir=FLAGS.workdir, step=step, weights=FLAGS.weights,
                                         mesh=mesh, progress=FLAGS.progress and jax.process_index() == 0,
                                         classifier=classifier)
    except (evaluate.NonFiniteSamplesError, images.OutputError) as e:
        raise app.UsageError(str(e)) from None
    if jax.process_index() == 0:
        for line in report["protocol"]:
            print(line)
        print(f"Report: {report['path']}")


if __name__ == "__main__":
    app.run(main)
