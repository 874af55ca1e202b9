"""Parsing, checks and console output shared by the top-level scripts (train.py, sample.py,
evaluate.py). Library functions take the parsed values; only the scripts call these."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def parse_steps(text: str | None) -> int | str | None:
    """A command line's --steps: None stays None (all T), digits become an int S, anything else
    ('ddimS', 'S1,S2,...') is passed on to `plans.space_timesteps` as a string."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else text


def check_output_path(path: str, flag: str, *, directory: bool = False) -> None:
    """Raises ValueError (one line naming `flag` and the fix) when `path` cannot be written: a
    file (directory=False) or a directory to create or fill (directory=True). Runs before any
    work, so that a bad --out does not fail only after hours of sampling. Uses os.access, so
    root passes where permission bits alone would refuse; a read-only mount still refuses."""
    path = os.path.abspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"{flag}: {path} is a dangling symlink (to {os.readlink(path)}, which "
                         "does not exist): remove the link, or choose another path.")
    if os.path.exists(path):
        if os.path.isdir(path) and not directory:
            raise ValueError(f"{flag}: {path} is an existing directory: name a file inside it, "
                             f"e.g. {flag}={os.path.join(path, 'samples.png')}.")
        if directory and not os.path.isdir(path):
            raise ValueError(f"{flag}: {path} is a file, not a directory: move that file aside "
                             "or choose another path.")
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            raise ValueError(f"{flag}: {path} is not writable (read-only file system or no "
                             "permission): choose a writable location.")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag}: {path} lies under {ancestor}, which is a regular file: choose "
                         "a path under a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {path}, {ancestor} is not writable (read-only "
                         "file system or no permission): choose a writable location.")


def check_run_dir(workdir: str | None, flag: str) -> None:
    """ValueError (one line) unless `workdir` (None: not given) is a directory holding something
    to load: a training run's checkpoints."""
    if workdir is None:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"{flag}={workdir} is a file, not a run directory: pass the directory "
                         "that train.py wrote (it holds checkpoints/).")
    if not os.path.isdir(workdir):
        raise ValueError(f"{flag}={workdir} does not exist; train into it with train.py first, "
                         "or pass --diffusers_dir for released weights.")
    if not os.listdir(workdir):
        raise ValueError(f"{flag}={workdir} is empty: it holds no checkpoint to sample; train "
                         "into it with train.py first.")


def check_png_output(path: str, flag: str) -> None:
    """ValueError (one line) unless `path` names a writable .png file with a name before the
    suffix, and the .npz that goes beside it is writable too."""
    if not path.endswith(".png"):
        raise ValueError(f"{flag}={path} must end in .png (the .npz goes beside it).")
    if os.path.basename(path) == ".png":
        raise ValueError(f"{flag}={path} has no file name before .png: name the file, e.g. "
                         f"{flag}={os.path.join(os.path.dirname(path), 'samples.png')}.")
    for output in (path, path[:-len(".png")] + ".npz"):
        check_output_path(output, flag)


def check_denoiser(config: Any, flag: str, workdir: str) -> None:
    """ValueError (one line) when the run at `workdir` is a noise-conditional classifier
    (model.kind 'classifier'), which guides a denoiser but cannot draw images itself."""
    from ddpm_jax import config as config_lib
    if config_lib.model_kind(config) == "autoencoder":
        raise ValueError(f"{flag}={workdir} is an autoencoder run (model.kind='autoencoder'), "
                         "not a denoiser: name it as --config.latent.autoencoder of a latent "
                         "run (configs/digits.py:latent), and sample that run.")
    if config_lib.model_kind(config) == "classifier":
        raise ValueError(f"{flag}={workdir} is a classifier run (model.kind='classifier'), not "
                         "a denoiser: pass a denoiser run here, and the classifier as "
                         f"--classifier={workdir} (with --labels) to guide it.")


def check_var_type(var_type: str | None, config: Any) -> None:
    """ValueError (one line) for a --var_type whose model output the run's network does not
    make: a learned variance needs 2C output channels, which a fixed-variance run lacks."""
    from ddpm_jax import config as config_lib
    from ddpm_jax.config import LEARNED_VAR_TYPES
    run_var_type = config.diffusion.var_type
    if var_type is None or (var_type in LEARNED_VAR_TYPES) == (run_var_type in LEARNED_VAR_TYPES):
        return
    if var_type in LEARNED_VAR_TYPES:
        raise ValueError(f"--var_type={var_type} needs a network trained to output a variance; "
                         f"this run's is fixed (diffusion.var_type={run_var_type!r}, "
                         f"{config_lib.image_shape(config)[-1]} output channels): use "
                         "--var_type=fixedlarge or fixedsmall, or leave it unset.")


def check_config_file(spec: str, flag: str = "--config") -> None:
    """ValueError (one line) unless `spec` ('path.py' or 'path.py:variant') names an existing
    Python config file whose get_config(variant) runs: a missing file, a file that is not
    Python, or an unknown variant is named here instead of by ml_collections' tracebacks."""
    import runpy
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}={spec}: no such file {path!r}; pass an experiment file, e.g. "
                         f"{flag}=configs/digits.py (or configs/digits.py:tiny).")
    if not path.endswith(".py"):
        raise ValueError(f"{flag}={spec}: {path} is not a Python config file (.py): pass an "
                         f"experiment file, e.g. {flag}=configs/digits.py.")
    try:
        module = runpy.run_path(path)
        if "get_config" not in module:
            raise ValueError(f"{path} defines no get_config()")
        module["get_config"](*([variant] if variant else []))
    except Exception as e:  # the file's own error, whatever it is: one line
        reason = " ".join(str(e).split())
        raise ValueError(f"{flag}={spec}: {type(e).__name__}: {reason}") from None


def check_batch_size(batch_size: int, num_devices: int, flag: str) -> int:
    """`batch_size`, or ValueError (one line) when the devices do not divide it."""
    if batch_size % num_devices:
        raise ValueError(f"{flag}={batch_size} must be a multiple of the {num_devices} devices.")
    return batch_size


def load_model(workdir: str | None, diffusers_dir: str | None, weights: str) -> tuple[Any, Any, Any]:
    """(config, model, params) of --workdir's latest checkpoint (`weights` 'ema' or 'raw') or of
    --diffusers_dir (`runs.load_for_sampling`); ValueError naming the flag otherwise (a
    classifier run given as the model too)."""
    from ddpm_jax import checkpoint, runs
    flag = f"--workdir={workdir}" if workdir is not None else f"--diffusers_dir={diffusers_dir}"
    try:
        loaded = runs.load_for_sampling(workdir, weights=weights,
                                              diffusers_dir=diffusers_dir)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        raise ValueError(f"{flag}: " + " ".join(str(e).split("\n"))) from None
    if workdir is not None:
        check_denoiser(loaded[0], "--workdir", workdir)
    return loaded


def describe_guidance(labels: str | None, guidance: float | None, classifier: str | None,
                      classifier_scale: float) -> str:
    """', labels 3,7, guidance 1.5' / ', labels 3,7, classifier DIR scale 2' or '' for a log
    line."""
    if labels is None:
        return ""
    text = f", labels {labels}"
    if guidance is not None:
        text += f", guidance {guidance}"
    if classifier is not None:
        text += f", classifier {classifier} scale {classifier_scale:g}"
    return text


# orbax's per-array read and write coroutines: closed unfinished when a restore or a save fails
ORBAX_IO_COROUTINES = ("_read_array_index_and_device_put",
                       "async_serialize_from_host.<locals>.write_fragment")


def drop_closed_event_loop_noise() -> None:
    """Called at the start of the command lines: when a checkpoint restore (or save) fails,
    orbax leaves the other arrays' tensorstore reads (writes) in flight; each that finishes
    after orbax's event loop closed prints an unraisable 'Event loop is closed' traceback,
    their failures are logged by asyncio as '... exception was never retrieved', and those
    closed unfinished print 'Exception ignored in: <coroutine ...>' with their own copy of the
    error: the same damage the one-line error already reports. Drops exactly those; anything
    else is printed. We run no asyncio code of our own."""
    previous = sys.unraisablehook

    def hook(unraisable):
        closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                       and str(unraisable.exc_value) == "Event loop is closed")
        # The other arrays' reads of a failed restore (or writes of a failed save), each closed
        # with its own copy of the error and a 60-line tensorstore spec: about 1,300 lines for
        # a damaged array_metadatas.
        orbax_io = getattr(unraisable.object, "__qualname__", "") in ORBAX_IO_COROUTINES
        if not (closed_loop or orbax_io):
            previous(unraisable)
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(  # Task, Future or _GatheringFuture
            lambda record: "exception was never retrieved" not in str(record.msg))


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors, and INFO records from this project only (the package and
    the script at `script_path`); a library's error with a traceback is cut to its first line."""

    def __init__(self, script_path: str):
        super().__init__()
        self.script_path = script_path

    def filter(self, record: logging.LogRecord) -> bool:
        own = "ddpm_jax" in record.pathname or record.pathname == self.script_path
        if not own and record.exc_info:
            # A library's error log from its own thread (orbax's background save on a full
            # disk logs five tracebacks): its first line only; the one-line error that stops
            # the run says what happened and what to do.
            record.msg, record.args = record.getMessage().split("\n")[0][:300], ()
            record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.WARNING or own


class ProgressBar:
    """tqdm bar with step, loss (the last logged), steps/s and ETA.

    Created at the first report, after the first dispatch: a resumed run starts at its step,
    and the rate leaves out compilation.
    """

    def __init__(self, total: int):
        self.total = total
        self.bar = None
        self.step = 0

    def __call__(self, step: int, scalars: dict | None) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True)
        else:
            self.bar.update(step - self.step)
        self.step = step
        if scalars is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_classifier_flags(classifier: str | None, scale: float | None, classes: Any,
                           guidance: float | None) -> None:
    """ValueError (one line) for classifier-guidance flags that cannot work: a scale without a
    classifier, a classifier dir that does not exist, no --labels to guide towards, or
    classifier-free --guidance as well."""
    from ddpm_jax.spec import finite_scale
    finite_scale("--classifier_scale", scale)
    if scale is not None and classifier is None:
        raise ValueError("--classifier_scale needs --classifier (a classifier run's work dir).")
    if classifier is None:
        return
    if not os.path.isdir(classifier):
        raise ValueError(f"--classifier={classifier} does not exist; train one with "
                         "train.py --config configs/digits.py:classifier.")
    if classes is None:
        raise ValueError("--classifier needs --labels: the classes to guide towards (e.g. "
                         "--labels 3,7 or --labels balanced).")
    if guidance is not None:
        raise ValueError("--guidance (classifier-free) and --classifier are two methods; pick one.")


# --------------------------------------------------------------- flags shared by the scripts

def define_sampler_flags(*, variance: bool) -> None:
    """The sampler flags of sample.py and evaluate.py (absl, module-global), each unset by
    default: the run's config.sampling decides (`SamplerSpec.from_config` with the flags as
    overrides). `variance`: also --var_type and --clip_denoised."""
    from absl import flags

    from ddpm_jax.diffusion import VAR_TYPES
    from ddpm_jax.plans import MAX_SOLVER_ORDER, SPACINGS
    from ddpm_jax.spec import SAMPLERS
    flags.DEFINE_enum("sampler", None, list(SAMPLERS), "ddpm: ancestral; ddim: Song et al.; "
                      "dpm++: DPM-Solver++ multistep, deterministic, near-converged in 15-25 "
                      "steps; dpm++sde: its SDE variant, stochastic; heun: EDM's second-order "
                      "ODE step (2S-1 model calls); euler_ancestral: k-diffusion's (= DDIM "
                      "eta 1 on the same steps) (default config.sampling.sampler).")
    flags.DEFINE_string("steps", None, "Reverse steps: an int S (evenly spaced, t=0 and t=T-1 "
                        "kept), 'ddimS' (stride range(0, T, c)) or 'S1,S2,...' (default "
                        "config.sampling.steps).")
    flags.DEFINE_enum("spacing", None, list(SPACINGS), "Which timesteps --steps keeps: time (as "
                      "--steps says), logsnr (S steps uniform in log-SNR), edm (the t nearest "
                      "EDM's rho=7 sigmas) or trailing (t = round(k T / S) - 1, k = 1..S: a "
                      "distilled student's grid); the last three with an int --steps. Default "
                      "config.sampling.spacing with the config's sampler, else edm for heun and "
                      "euler_ancestral and time for the others.")
    flags.DEFINE_integer("order", None, "Solver order with --sampler=dpm++ (1-3; 1 is DDIM with "
                         "eta 0) or dpm++sde (1-2; 1 is DDIM with eta 1) (default "
                         "config.sampling.order).", lower_bound=1,
                         upper_bound=MAX_SOLVER_ORDER)
    flags.DEFINE_float("threshold", None, "Dynamic thresholding of each x0 prediction at this "
                       "percentile (Imagen: 0.995) instead of the [-1, 1] clip (default "
                       "config.sampling.threshold).", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("eta", None, "DDIM eta in [0, 1]: 0 deterministic, 1 DDPM's beta~ "
                       "variance (default config.sampling.eta).", lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("corrector_snr", None, "Predictor-corrector: a Langevin corrector with "
                       "this signal-to-noise ratio r in (0, 1] after every predictor step "
                       "(score_sde: 0.16); unset: none.")
    flags.DEFINE_integer("corrector_steps", None, "Langevin steps per corrector (default 1 with "
                         "--corrector_snr).")
    if variance:
        flags.DEFINE_enum("var_type", None, list(VAR_TYPES), "Reverse variance of "
                          "--sampler=ddpm (default: the run's).")
        flags.DEFINE_boolean("clip_denoised", None, "Clip each x0 prediction to [-1, 1] "
                             "(default config.sampling.clip_denoised).")


def sampler_flag_values(values: Any) -> dict[str, Any]:
    """The sampler flags that `define_sampler_flags` defined, parsed, as overrides of the run's
    `SamplerSpec` (None: the config's value)."""
    kwargs = dict(sampler=values.sampler, steps=parse_steps(values.steps), eta=values.eta,
                  spacing=values.spacing, order=values.order, threshold=values.threshold,
                  corrector_snr=values.corrector_snr, corrector_steps=values.corrector_steps)
    for name in ("var_type", "clip_denoised"):
        if name in values:
            kwargs[name] = values[name].value
    return kwargs


def define_ode_flags() -> None:
    """evaluate.py's options of --metrics ode_bpd (`evaluate.EvalOptions`' ode_* fields)."""
    from absl import flags

    from ddpm_jax.ode_likelihood import DEQUANTIZATIONS, SOLVERS, TRACES
    flags.DEFINE_enum("ode_solver", "rk45", list(SOLVERS), "ode_bpd's integrator: rk45 "
                      "(Dormand-Prince, adaptive) or rk4 (--ode_steps equal steps).")
    flags.DEFINE_enum("ode_trace", "rademacher", list(TRACES), "ode_bpd's divergence: "
                      "Hutchinson-Skilling with a rademacher or gaussian probe per image, or the "
                      "exact trace (one Jacobian-vector product per pixel: small images).")
    flags.DEFINE_float("ode_tolerance", 1e-5, "RK45's rtol = atol (score_sde's 1e-5).",
                       lower_bound=0.0)
    flags.DEFINE_integer("ode_steps", 100, "RK4's steps (4 evaluations each).", lower_bound=1)
    flags.DEFINE_enum("ode_dequantization", "uniform", list(DEQUANTIZATIONS), "ode_bpd's bridge "
                      "from 8-bit pixels to the ODE: uniform (score_sde's x = 2 (k + u) / 256 - 1, "
                      "a density bound + 7 bits) or decoder (x_1 ~ q(x_1|x_0) and the model's "
                      "discretized decoder, a bound on the pixels themselves, like --metrics bpd).")


def define_guidance_flags(labels_rule: str) -> None:
    """--guidance, --classifier and --classifier_scale; `labels_rule` says which --labels they
    need (the two scripts' --labels differ)."""
    from absl import flags
    flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w >= 0 (needs "
                       f"{labels_rule}): (1 + w) eps(x, y) - w eps(x, null), two model calls per "
                       "step (default config.eval.guidance in evaluate.py, else none).",
                       lower_bound=0.0)
    flags.DEFINE_string("classifier", None, "Classifier guidance: the work dir of a noise-"
                        f"conditional classifier run (configs/digits.py:classifier); needs "
                        f"{labels_rule}.")
    flags.DEFINE_float("classifier_scale", None, "Classifier guidance scale s >= 0 (default 1 "
                       "with --classifier): mu + s Sigma grad log p(y|x_t) (ancestral), eps - s "
                       "sqrt(1 - abar) grad log p(y|x_t) (ddim, dpm++).", lower_bound=0.0)
