"""Evaluation of a trained DDPM with an explicit protocol: bits/dim, FID, IS and KID.

    python evaluate.py --workdir runs/digits --metrics bpd,fid,is --num_samples 1000
    python evaluate.py --workdir runs/cifar10 --metrics fid,is \
        --feature_net inception --inception_weights pt_inception-2015-12-05-6726825d.pth

(the command line is the top-level evaluate.py; this module holds the library functions).

* Bits/dim: the full variational bound (prior + decoder + every KL term, all T) of
  `diffusion.calc_bpd` for every image of a split (`likelihood.evaluate_bpd`). Reported: mean
  total, prior, decoder (t = 0) and KL sum, and the per-t curve (.npz and .png).
* ODE bits/dim (`--metrics ode_bpd`): the exact likelihood of the probability-flow ODE
  (`ode_likelihood.evaluate_ode_bpd`; RK45 or RK4, Hutchinson-Skilling or exact trace) of the
  same split's images, uniformly dequantised; reported with its standard error and the mean
  number of ODE evaluations (NFE).
* FID / IS / KID of generated samples (`ddpm_jax.features`), each labelled with its feature
  network, weights SHA-256, sample count, reference split, sampler and steps. Class-conditional
  models draw with the null label (unconditional) by default; labels="balanced" gives sample n
  class n mod N, optionally with classifier-free guidance (`--labels balanced --guidance w`).
Each run writes workdir/eval/report_<step>_<weights>_<what>.json and logs its protocol line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from ddpm_jax import config as config_lib
from ddpm_jax import features, images, parallel, plots, sampling
from ddpm_jax.labels import LABEL_MODES, balanced, check_labels_and_guidance
from ddpm_jax.sampling import ApplyFn
from ddpm_jax.likelihood import bpd_summary, evaluate_bpd
from ddpm_jax.ode_likelihood import check_ode_options, evaluate_ode_bpd, ode_bpd_summary
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec, finite_scale

Array = jax.Array

METRICS = ("bpd", "ode_bpd", "fid", "is", "kid", "zero_shot")
LIKELIHOODS = ("bpd", "ode_bpd")  # of the data split; the others score generated samples
DATA_METRICS = LIKELIHOODS + ("zero_shot",)  # zero_shot: the diffusion classifier (zero_shot.py)


def sample_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics that need generated samples (FID / IS / KID)."""
    return tuple(m for m in metrics if m not in DATA_METRICS)


# ------------------------------------------------------------------------------- samples

def generate_samples(apply_fn: ApplyFn, params: Any, schedule: Schedule, spec: SamplerSpec, *,
                     num_samples: int, image_shape: Sequence[int], batch_size: int, key: Array,
                     mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                     labels: np.ndarray | None = None, classifier_params: Any = None,
                     **guidance: Any) -> np.ndarray:
    """num_samples uint8 images [N, H, W, C] of the chain `spec` (sample n depends only on
    (key, n) and labels[n]). labels: [N] classes for a class-conditional apply_fn, or None.
    guidance: make_sampler's guidance, classifier, classifier_scale (classifier_params: the
    guiding classifier's)."""
    batch = parallel.round_up_to_devices(min(batch_size, num_samples),
                                         1 if mesh is None else mesh.size)
    sampler = sampling.make_sampler(apply_fn, schedule, (batch, *image_shape), spec, mesh=mesh,
                                    **guidance)
    return sampling.draw_images(_FiniteOnly(sampler), params, key, num_samples, labels=labels,
                                progress=progress, classifier_params=classifier_params)


class NonFiniteSamplesError(ValueError):
    """Samples holding NaN or inf: no score (and no report) is computed from them."""


class _FiniteOnly:
    """A sampler whose every batch is checked for NaN / inf before it becomes uint8 pixels
    (where NaN would turn into black and score as an image)."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def __call__(self, params: Any, key: Array, offset: int, *args: Any, **kwargs: Any) -> Any:
        out = self.sampler(params, key, offset, *args, **kwargs)
        bad = int(jax.device_get(jax.numpy.sum(~jax.numpy.isfinite(out["images"]))))
        if bad:
            raise NonFiniteSamplesError(
                    f"The samples from image {offset} on hold {bad} NaN or inf values: no score "
                    "and no report are written from them. Check the sampler options (a "
                    "guidance or classifier scale too large) and the checkpoint (is it finite?).")
        return out


# ------------------------------------------------------------------------- the protocol

@dataclasses.dataclass(frozen=True)
class RunData:
    """What evaluation needs of a run besides its network: the data set it models and its
    diffusion (`from_config` is the one reader of the config here)."""

    dataset: str
    image_size: int
    channels: int
    data_dir: str | None
    timesteps: int
    schedule_name: str
    mean_type: str
    var_type: str
    schedule: Schedule
    chain_shape: tuple[int, int, int] | None = None  # the model's input, when not the image's
                                                     # (a latent run's latents)

    @classmethod
    def from_config(cls, config: Any) -> RunData:
        d, data_cfg = config.diffusion, config.data
        return cls(dataset=data_cfg.dataset, image_size=data_cfg.image_size,
                   channels=data_cfg.channels, data_dir=data_cfg.get("data_dir"),
                   timesteps=d.timesteps, schedule_name=d.schedule, mean_type=d.mean_type,
                   var_type=d.var_type, schedule=config_lib.schedule_from_config(config),
                   chain_shape=config_lib.image_shape(config))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


@dataclasses.dataclass
class EvalOptions:
    """What to evaluate and how; `from_config` takes the defaults from config.eval/sampling."""

    metrics: tuple[str, ...] = ("bpd", "fid", "is")
    bpd_split: str = "test"
    bpd_num_images: int | None = None        # None: the whole split
    bpd_batch_size: int = 64
    ode_solver: str = "rk45"                 # ode_bpd: rk45 (adaptive) | rk4 (ode_steps steps)
    ode_trace: str = "rademacher"            # rademacher | gaussian (Hutchinson) | exact
    ode_tolerance: float = 1e-5              # RK45's rtol = atol (score_sde's 1e-5)
    ode_steps: int = 100                     # RK4's steps
    ode_dequantization: str = "uniform"      # uniform (score_sde) | decoder (the bound's L_0)
    num_samples: int = 1000
    sampler: SamplerSpec = SamplerSpec()     # the samples' chain; its clip_denoised also bpd's
    sample_batch_size: int = 256
    reference_split: str = "train"
    reference_num_images: int | None = None  # None: the whole split
    feature_net: str = "digits"              # digits | inception
    inception_weights: str | None = None
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    labels: str = "none"                     # none (the null label) | balanced (n mod N)
    guidance: float | None = None           # classifier-free guidance weight (labels=balanced)
    classifier: str | None = None           # classifier guidance: a classifier run's work dir
    classifier_scale: float | None = None   # its scale s (None: 1 with a classifier)
    seed: int = 0
    cache_dir: str | None = None
    save_samples: bool = True
    zero_shot_samples: int = 64              # zero_shot: (t, eps) pairs per image
    zero_shot_images: int | None = None      # zero_shot: first N images of bpd_split (None: all)

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"metrics={','.join(self.metrics)!r}: choose from {','.join(METRICS)}.")
        config_lib.check_choice("feature_net", self.feature_net, features.FEATURE_NETS)
        if "ode_bpd" in self.metrics:
            check_ode_options(solver=self.ode_solver, trace=self.ode_trace, mean_type="eps",
                              rtol=self.ode_tolerance, atol=self.ode_tolerance,
                              num_steps=self.ode_steps, dequantization=self.ode_dequantization)
        if self.num_samples < 2 and sample_metrics(self.metrics):
            raise ValueError(f"num_samples={self.num_samples}: FID/IS/KID need >= 2 samples.")
        if not isinstance(self.sampler, SamplerSpec):
            raise TypeError(f"sampler must be a SamplerSpec; got {type(self.sampler).__name__}.")
        finite_scale("guidance", self.guidance)
        finite_scale("classifier_scale", self.classifier_scale)
        config_lib.check_choice("labels", self.labels, LABEL_MODES)
        check_labels_and_guidance(self.labels, self.guidance)
        if self.classifier_scale is not None and self.classifier is None:
            raise ValueError("classifier_scale needs a classifier (a classifier run's work dir).")
        if self.classifier is not None:
            if self.labels != "balanced":
                raise ValueError("Classifier guidance needs labels=balanced (image n asks for "
                                 "class n mod N).")
            if self.guidance is not None:
                raise ValueError("guidance (classifier-free) and classifier guidance are two "
                                 "methods; pick one.")

    @classmethod
    def from_config(cls, config: Any, *, sampler: dict[str, Any] | None = None,
                    **overrides: Any) -> EvalOptions:
        """config.eval's protocol and config.sampling's SamplerSpec; `sampler`: overrides of
        the spec (`SamplerSpec.with_overrides`), `overrides`: of the other fields (None keeps
        the config's)."""
        e = config.eval
        defaults = dict(
                metrics=tuple(e.metrics.split(",")), bpd_split=e.bpd_split,
                bpd_num_images=e.bpd_num_images, bpd_batch_size=e.bpd_batch_size,
                num_samples=e.fid_num_samples,
                sampler=SamplerSpec.from_config(config, **(sampler or {})),
                sample_batch_size=e.fid_batch_size, reference_split=e.fid_reference,
                feature_net=e.feature_net or (
                        "digits" if config.data.dataset == "digits" else "inception"),
                inception_weights=e.inception_weights, labels=e.labels,
                guidance=e.guidance, seed=config.training.seed)
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**defaults)


def _classifier_scale(options: EvalOptions) -> float:
    return 1.0 if options.classifier_scale is None else options.classifier_scale


def _report_name(step: int, weights: str, options: EvalOptions, num_steps: int) -> str:
    parts = [f"report_step{step}", weights]
    if "bpd" in options.metrics:
        parts.append(f"bpd-{options.bpd_split}")
    if "zero_shot" in options.metrics:
        parts.append(f"zeroshot-{options.bpd_split}-s{options.zero_shot_samples}")
    if "ode_bpd" in options.metrics:
        parts.append(f"odebpd-{options.bpd_split}-{options.ode_solver}-{options.ode_trace}"
                     + ("" if options.ode_dequantization == "uniform" else
                        f"-{options.ode_dequantization}"))
    if sample_metrics(options.metrics):
        parts.append(f"{options.sampler.sampler}{num_steps}-n{options.num_samples}-"
                     f"{options.feature_net}")
        if options.labels != "none":
            parts.append(options.labels + ("" if options.guidance is None
                                           else f"-w{options.guidance:g}"))
        if options.classifier is not None:
            parts.append(f"clf{_classifier_scale(options):g}")
    return "_".join(parts)


def _write_json(path: str, obj: Any) -> None:
    """Atomically (images.write_atomically): a kill leaves the previous report whole, and a
    work dir removed during the evaluation is made again rather than the report lost."""
    images.write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _bpd_section(run: RunData, apply_fn: ApplyFn, params: Any, options: EvalOptions,
                 schedule: Schedule, key: Array, mesh: jax.sharding.Mesh | None, progress: bool,
                 stem: str, where: str, write: bool) -> tuple[dict[str, Any], str]:
    """Bits/dim of the split: (summary, protocol line); writes the per-t .npz and .png."""
    from ddpm_jax import data  # the TFDS import is slow: only when needed

    start = time.time()
    split_images = data.load_split_uint8(run.dataset, options.bpd_split, run.data_dir,
                                         image_size=run.image_size, channels=run.channels,
                                         max_examples=options.bpd_num_images)
    clip_denoised = options.sampler.clip_denoised
    result = evaluate_bpd(apply_fn, params, schedule, split_images, key, mean_type=run.mean_type,
                          var_type=run.var_type, clip_denoised=clip_denoised,
                          batch_size=options.bpd_batch_size, mesh=mesh, progress=progress)
    summary = bpd_summary(result)
    summary.update(split=options.bpd_split, seconds=round(time.time() - start, 1),
                   clip_denoised=clip_denoised, curve=stem + "_bpd_terms.npz")
    line = (f"{options.bpd_split} bits/dim {summary['total']:.4f} (+- "
            f"{summary['total_stderr']:.4f} s.e.; prior {summary['prior']:.4g}, decoder "
            f"{summary['decoder']:.4f}, KL terms {summary['kl_terms']:.4f}): the full bound over "
            f"all T={run.timesteps} steps, {summary['num_images']} images of "
            f"{run.dataset}/{options.bpd_split}, {where}"
            + (", null label (the unconditional model)"
               if getattr(apply_fn, "null_label", None) is not None else "") + ".")
    if write:  # atomically, the .npz last (images.write_atomically)
        images.write_atomically({
                stem + "_bpd_terms.png": lambda path: plots.save_line_plot(
                        path, result["terms_bpd"], title=f"L_t in bits/dim ({run.dataset}/"
                        f"{options.bpd_split}, {where}); total {summary['total']:.4f}",
                        xlabel="t (0-based)", ylabel="bits/dim"),
                stem + "_bpd_terms.npz": lambda path: np.savez(
                        path, **{k: v for k, v in result.items() if k != "num_images"})})
    return summary, line


_DEQUANTIZATION_WORDS = {
    "uniform": "uniform dequantisation",
    "decoder": "decoder dequantisation (x_1 ~ q(x_1|x_0), + the discretized decoder: 1 call)"}


def _ode_bpd_section(run: RunData, apply_fn: ApplyFn, params: Any, options: EvalOptions,
                     schedule: Schedule, key: Array, mesh: jax.sharding.Mesh | None,
                     progress: bool, where: str, **_: Any) -> tuple[dict[str, Any], str]:
    """ODE bits/dim of the split: (summary, protocol line)."""
    from ddpm_jax import data  # the TFDS import is slow: only when needed

    start = time.time()
    split_images = data.load_split_uint8(run.dataset, options.bpd_split, run.data_dir,
                                         image_size=run.image_size, channels=run.channels,
                                         max_examples=options.bpd_num_images)
    result = evaluate_ode_bpd(apply_fn, params, schedule, split_images, key,
                              mean_type=run.mean_type, trace=options.ode_trace,
                              solver=options.ode_solver, rtol=options.ode_tolerance,
                              atol=options.ode_tolerance, num_steps=options.ode_steps,
                              dequantization=options.ode_dequantization, var_type=run.var_type,
                              clip_denoised=options.sampler.clip_denoised,
                              batch_size=options.bpd_batch_size, mesh=mesh, progress=progress)
    summary = ode_bpd_summary(result)
    summary.update(split=options.bpd_split, seconds=round(time.time() - start, 1),
                   solver=options.ode_solver, trace=options.ode_trace,
                   dequantization=options.ode_dequantization)
    how = (f"RK45 rtol=atol={options.ode_tolerance:g}" if options.ode_solver == "rk45" else
           f"RK4 {options.ode_steps} steps")
    line = (f"{options.bpd_split} ODE bits/dim {summary['total']:.4f} (+- "
            f"{summary['total_stderr']:.4f} s.e.): probability-flow ODE from t=0 to "
            f"t={run.timesteps - 1}, {how}, {options.ode_trace} trace, mean NFE "
            f"{summary['nfe']:.1f} (max {summary['nfe_max']}, {summary['not_converged']} not "
            f"converged), {_DEQUANTIZATION_WORDS[options.ode_dequantization]}, "
            f"{summary['num_images']} images of "
            f"{run.dataset}/{options.bpd_split}, {where}"
            + (", null label (the unconditional model)"
               if getattr(apply_fn, "null_label", None) is not None else "") + ".")
    return summary, line


def _scores_section(run: RunData, apply_fn: ApplyFn, params: Any, options: EvalOptions,
                    schedule: Schedule, key: Array, mesh: jax.sharding.Mesh | None,
                    progress: bool, stem: str, where: str, write: bool,
                    classifier: tuple[Any, Any] | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """FID / IS / KID of generated samples: (samples info, scores, protocol line)."""
    image_shape = run.chain_shape or run.image_shape
    # Before the reference statistics: an unconditional model fails here, not minutes later.
    if classifier is not None:
        labels = balanced(classifier[0].num_classes, options.num_samples)
    else:
        labels = (sampling.balanced_labels(apply_fn, options.num_samples)
                  if options.labels == "balanced" else None)
    guide = {} if classifier is None else dict(classifier=classifier[0],
                                               classifier_scale=_classifier_scale(options),
                                               classifier_params=classifier[1])
    net = features.make_feature_net(options.feature_net, image_size=run.image_size,
                                    inception_weights=options.inception_weights,
                                    cache_dir=options.cache_dir)
    reference = features.reference_statistics(
            net, dataset=run.dataset, split=options.reference_split,
            image_size=run.image_size, channels=run.channels,
            data_dir=run.data_dir, cache_dir=options.cache_dir,
            max_images=options.reference_num_images, progress=progress)
    spec = options.sampler
    start = time.time()
    samples = generate_samples(
            apply_fn, params, schedule, spec, num_samples=options.num_samples,
            image_shape=image_shape, batch_size=options.sample_batch_size, key=key, mesh=mesh,
            progress=progress, labels=labels, guidance=options.guidance, **guide)
    num_steps = spec.plan(schedule).num_steps
    info = dict(num_samples=options.num_samples, sampler=spec.sampler, steps=num_steps,
                eta=spec.eta, spacing=spec.spacing, order=spec.order, threshold=spec.threshold,
                var_type=spec.var_type, labels=options.labels, guidance=options.guidance,
                seed=options.seed, seconds=round(time.time() - start, 1))
    if classifier is not None:
        info.update(classifier=options.classifier, classifier_scale=_classifier_scale(options))
    scores = features.sample_quality(
            net, samples, reference, scores=sample_metrics(options.metrics),
            is_splits=options.is_splits, kid_subsets=options.kid_subsets,
            kid_subset_size=options.kid_subset_size, progress=progress)
    values = [f"{e['label']} {e['value']:.4f}" if name == "fid" else
              f"{e['label']} {e['mean']:.4g} +- {e['std']:.2g}" for name, e in scores.items()]
    how = spec.describe(num_steps)
    if labels is not None and net.kind == "digits":
        # What guidance is for: the share the (clean-image) digits classifier labels as asked.
        _, logits = features.compute_features(net, samples, progress=False)
        info["requested_class_share"] = float(np.mean(np.argmax(logits, axis=1) == labels))
        values.append(f"labelled as requested {100 * info['requested_class_share']:.1f}%")
    if classifier is not None:
        how += (f", classes n mod {classifier[0].num_classes}, classifier guidance s="
                f"{_classifier_scale(options):g} ({options.classifier})")
    elif labels is not None:
        how += (f", classes n mod {apply_fn.null_label}"
                + ("" if options.guidance is None else f", guidance w={options.guidance:g}"))
    elif getattr(apply_fn, "null_label", None) is not None:
        how += ", unconditional (null label)"
    ref = reference["protocol"]
    line = (f"{', '.join(values)}: {options.num_samples} samples ({how}, seed {options.seed}, "
            f"{where}) vs {ref['num_images']} "
            f"images of {ref['dataset']}/{ref['split']}; feature net {net.name} (sha256 "
            f"{net.weights_sha256[:16]}...).")
    if write and options.save_samples:
        images.save_samples(samples, stem + "_samples.png", labels)
    return info, scores, line


def run_evaluation(run: RunData, apply_fn: ApplyFn, params: Any, options: EvalOptions, *,
                   workdir: str, step: int, weights: str = "ema",
                   mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                   classifier: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Evaluates `params` of the run `run` describes; every process must call it.
    classifier: (ClassifierApply, params) of options.classifier, for classifier guidance.

    Writes (process 0) workdir/eval/report_<...>.json; for bpd the per-t curve as .npz and
    .png beside it; for sample scores the samples as .npz and a PNG grid
    (options.save_samples). Returns the report: dict(checkpoint, dataset, diffusion, options,
    bpd, ode_bpd, samples, scores, protocol: one line per measurement, path).
    """
    schedule = run.schedule
    num_steps = options.sampler.plan(schedule).num_steps
    eval_dir = os.path.join(workdir, "eval")
    stem = os.path.join(eval_dir, _report_name(step, weights, options, num_steps))
    write = jax.process_index() == 0
    if write:
        os.makedirs(eval_dir, exist_ok=True)
    where = f"{'EMA' if weights == 'ema' else weights} weights of step {step}"
    report: dict[str, Any] = dict(
            workdir=os.path.abspath(workdir), checkpoint=dict(step=step, weights=weights),
            dataset=dict(name=run.dataset, image_size=run.image_size, channels=run.channels),
            diffusion=dict(timesteps=run.timesteps, schedule=run.schedule_name,
                           mean_type=run.mean_type, var_type=run.var_type),
            options=dataclasses.asdict(options),
            protocol=[])
    key = jax.random.key(options.seed)
    common = dict(schedule=schedule, mesh=mesh, progress=progress, stem=stem, where=where,
                  write=write)
    if "bpd" in options.metrics:
        report["bpd"], line = _bpd_section(run, apply_fn, params, options,
                                           key=jax.random.fold_in(key, 1), **common)
        report["protocol"].append(line)
    if "ode_bpd" in options.metrics:
        report["ode_bpd"], line = _ode_bpd_section(run, apply_fn, params, options,
                                                   key=jax.random.fold_in(key, 3), **common)
        report["protocol"].append(line)
    if "zero_shot" in options.metrics:  # the diffusion classifier on the split (bpd_split)
        from ddpm_jax.zero_shot import zero_shot_section
        report["zero_shot"], line = zero_shot_section(
                apply_fn, params, schedule, jax.random.fold_in(key, 4), dataset=run.dataset,
                split=options.bpd_split, data_dir=run.data_dir, image_size=run.image_size,
                channels=run.channels, num_samples=options.zero_shot_samples,
                max_images=options.zero_shot_images, batch_size=options.bpd_batch_size,
                stem=stem if write else None, where=where)
        report["protocol"].append(line)
    if sample_metrics(options.metrics):
        report["samples"], report["scores"], line = _scores_section(
                run, apply_fn, params, options, key=jax.random.fold_in(key, 2),
                classifier=classifier, **common)
        report["protocol"].append(line)
    for line in report["protocol"]:
        logging.info("%s", line)
    if write:
        report["path"] = stem + ".json"
        _write_json(report["path"], report)
    return report


def scalars(report: dict[str, Any]) -> dict[str, float]:
    """Flat {name: value} of a report for metric writers, e.g. eval/bpd, eval/digits-FID."""
    out = {}
    if "bpd" in report:
        out["eval/bpd"] = report["bpd"]["total"]
    if "ode_bpd" in report:
        out["eval/ode_bpd"] = report["ode_bpd"]["total"]
    if "zero_shot" in report:
        out["eval/zero_shot_accuracy"] = report["zero_shot"]["accuracy"]
    for name, entry in report.get("scores", {}).items():
        out[f"eval/{entry['label']}"] = entry["value"] if name == "fid" else entry["mean"]
    return out
