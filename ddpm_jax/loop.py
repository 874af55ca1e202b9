"""The outer training loop: data -> jitted step -> metrics / checkpoints / sample grids.

One `jax.jit` with explicit `NamedSharding`s over a 1-D "data" mesh of every device of every
host: parameters, optimizer state and EMA replicated, batches split over "data", the state
donated. No explicit collective: XLA inserts the gradient all-reduce (a mean over the global
batch, so gradients do not scale with the device count).

One trainer per work dir: process 0 holds `workdir/trainer.lock` (ddpm_jax/lock.py) for the
whole run, so a second trainer stops at once. Resume: when the work dir holds a checkpoint, the latest complete one is restored (state and
data iterator), after checking that its config is compatible. Preemption: a SIGTERM (with
`jax.distributed` running) reaches orbax's sync point; the loop saves there and returns
normally, so the process exits 0.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax import (adapters, checkpoint, control, data, finetune, frozen, images, latent, lock,
                      memory, parallel, runs, sampling, training, writers, xla_cpu)
from ddpm_jax import config as config_lib
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

Array = jax.Array
ProgressFn = Callable[[int, "Mapping[str, float] | None"], None]

CONFIG_FILE = runs.CONFIG_FILE
SAMPLES_DIR = "samples"
# Metrics reported as their value at the log step; every other metric is averaged over the
# steps since the previous log.
LAST_VALUE_METRICS = ("lr", "nonfinite_in_a_row", "nonfinite_total")


class NonFiniteError(FloatingPointError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient."""


def due(step: int, every: int, last_step: int, *, prev_step: int | None = None) -> bool:
    """Whether a periodic action (log, checkpoint, sample grid, evaluation) runs at `step`: a
    multiple of `every` lies in (prev_step, step], or step is the last step. prev_step: the
    step before this dispatch (default step - 1: one step per dispatch, so step itself must be
    a multiple); with K steps per dispatch a multiple may fall inside the K. every <= 0: only
    at the last step."""
    if step == last_step:
        return True
    previous = step - 1 if prev_step is None else prev_step
    return every > 0 and step // every > previous // every


def save_resolved_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """workdir/config.json (process 0): the config after overrides, as plain JSON. A previous
    config.json with other values (a resume with other overrides, or a hand edit) is never
    overwritten silently: it is kept as config.json.<time> and a warning names it."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    text = json.dumps(checkpoint.config_to_dict(config), indent=2, sort_keys=True) + "\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = f.read()
        if previous == text:
            return
        aside = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        logging.warning("%s held other values than this run's config (edited by hand, or other "
                        "overrides); kept it as %s and wrote this run's config. Training uses "
                        "--config and its overrides, never config.json.", path, aside)
    images.write_text_atomically(path, text)


@functools.cache
def jitted_train_step(mesh: Mesh, steps_per_dispatch: int = 1) -> Callable[..., Any]:
    """`training.train_step` (K = 1) or `train_steps` (K > 1) under one jit: the state, the
    schedule and a distillation teacher's parameters replicated over the mesh, batches
    ([B, ...], or [K, B, ...]) split over "data", the state donated (the teacher's parameters
    are not: one buffer serves every step). Call as f(state, batch, schedule,
    config_lib.step_config(config, model), teacher_params=None).

    Cached per (mesh, K), and the settings are hashable (static), so runs in one process with
    equal settings share one compilation.
    """
    replicated = parallel.replicated(mesh)
    if steps_per_dispatch == 1:
        fn, spec = training.train_step, PartitionSpec(parallel.DATA_AXIS)
    else:
        fn, spec = training.train_steps, PartitionSpec(None, parallel.DATA_AXIS)

    def build(teacher: bool) -> Any:
        # jit's in_shardings must match the positional arguments passed (defaults and keywords
        # do not count): one jit without the teacher argument, one with it.
        shardings = (replicated, NamedSharding(mesh, spec), replicated) + (replicated,) * teacher
        return jax.jit(fn, static_argnums=3, in_shardings=shardings,
                       out_shardings=(replicated, replicated), donate_argnums=0,
                       compiler_options=xla_cpu.compiler_options("train"))
    jitted, jitted_with_teacher = build(False), build(True)

    def call(state, batch, schedule, settings: training.StepConfig, teacher_params=None):
        if teacher_params is None:
            return jitted(state, batch, schedule, settings)
        return jitted_with_teacher(state, batch, schedule, settings, teacher_params)
    call.jitted = jitted  # for tests: jitted._cache_size()
    call.jitted_with_teacher = jitted_with_teacher
    return call


@functools.cache
def jitted_create_train_state(mesh: Mesh) -> Callable[..., training.TrainState]:
    """`training.create_train_state(model, optimizer, rng, image_shape)` with its outputs born
    replicated over the mesh (model, optimizer and image_shape static)."""
    return jax.jit(training.create_train_state, static_argnums=(0, 1),
                   static_argnames=("image_shape",), out_shardings=parallel.replicated(mesh))


class _MetricAccumulator:
    """Per-dispatch metrics kept on device until a log step fetches them in one transfer;
    also the time and step of the last log, for the rates."""

    def __init__(self, step: int):
        self.pending: list[dict[str, Array]] = []
        self.last_time, self.last_step = time.time(), step

    def add(self, metrics: dict[str, Array]) -> None:
        self.pending.append(metrics)

    def reduce(self) -> dict[str, float | int]:
        fetched = jax.device_get(self.pending)
        self.pending = []
        out = {}
        for name in fetched[-1]:
            values = np.concatenate([np.ravel(m[name]) for m in fetched])
            out[name] = (values[-1] if name in LAST_VALUE_METRICS else np.mean(values)).item()
        return out


def warn_if_remat_cannot_save_memory(config: ml_collections.ConfigDict) -> bool:
    """Logs a warning (and returns True) when model.remat is on where it cannot save memory
    (`xla_cpu.remat_pays()` is False: the CPU backend, whose compiler drops remat's barriers)."""
    if not config.model.get("remat", False) or xla_cpu.remat_pays():
        return False
    logging.warning("model.remat=True saves no memory on the CPU backend (XLA's CPU compiler "
                    "removes the rematerialisation barriers) and only adds recomputation; set "
                    "model.remat=False here. It does save memory on GPUs and TPUs.")
    return True


def _check_nonfinite(metrics: Mapping[str, Array], step: int, limit: int,
                     last_checkpoint: int | None) -> None:
    """Raises NonFiniteError when the last `limit` (or more) steps were all non-finite."""
    in_a_row = int(np.ravel(jax.device_get(metrics["nonfinite_in_a_row"]))[-1])
    if in_a_row >= limit:
        total = int(np.ravel(jax.device_get(metrics["nonfinite_total"]))[-1])
        raise NonFiniteError(
                f"Training stopped at step {step}: the loss or gradient norm was non-finite for "
                f"{in_a_row} steps in a row ({total} in total). Those updates were skipped (the "
                "parameters may have turned non-finite before them). Lower training.lr, check "
                "the data for NaN/inf, or raise training.max_nonfinite_in_a_row. Newest "
                "checkpoint (every checkpoint is finite: non-finite saves are refused): "
                f"{'none' if last_checkpoint is None else f'step {last_checkpoint}'}.")


def write_sample_grid(config: ml_collections.ConfigDict, model: Any, schedule: Schedule,
                      ema_params: Any, mesh: jax.sharding.Mesh, path: str) -> None:
    """Samples config.training.num_sample_images images from the EMA weights (every process
    takes part) and writes them as one PNG grid (process 0). Fixed noise: grids of successive
    steps show the same starting points. Class-conditional models follow config.eval.labels
    and config.eval.guidance, as evaluation does: the null label, or image n of class n mod N."""
    count = config.training.num_sample_images
    if config_lib.model_kind(config) == latent.KIND:  # a first stage: its reconstructions
        return latent.write_reconstruction_grid(config, model, ema_params, path)
    if count <= 0:
        return
    batch = parallel.round_up_to_devices(count, mesh.size)
    apply_fn = sampling.ModelApply(model)
    labels = None
    if config.eval.labels == "balanced":  # validate: only for class-conditional models
        labels = sampling.balanced_labels(apply_fn, count)
    sampler = sampling.make_sampler(
            apply_fn, schedule, (batch, *config_lib.image_shape(config)),
            SamplerSpec.from_config(config), guidance=config.eval.guidance, mesh=mesh)
    pixels = sampling.draw_images(sampler, ema_params, jax.random.PRNGKey(config.training.seed + 1),
                                  count, labels=labels, progress=False)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        images.save_image_grid(pixels, path, tile_px=config.training.grid_tile_px)
        logging.info("Wrote %d samples to %s.", count, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: ProgressFn | None = None) -> training.TrainState:
    """Trains `config` in `workdir` until config.training.num_steps (resuming when the work dir
    holds a checkpoint) and returns the final state. Every process calls it.

    progress(step, scalars_or_None): called after every dispatch on process 0 (scalars at log
    steps), for a progress bar.
    """
    config_lib.validate(config)
    # Before anything touches the work dir: a second trainer stops here, naming the holder.
    with lock.hold_on_every_process(workdir):
        return _train_under_lock(config, workdir, progress)


ROUND_DIR = "round_{}"  # round k (1-based) of a chain of distillation rounds, in the work dir


def distillation_rounds(config: ml_collections.ConfigDict, workdir: str
                        ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The runs of a chain of config.distill.rounds halvings: (work dir, config) per round, each
    an ordinary distillation run for `train_and_evaluate`. Round k (1-based) in
    workdir/round_k distils N_k = teacher_steps / 2^(k-1) steps into N_k / 2; its teacher is
    config.distill.teacher (round 1) or round k-1's work dir. Each round's config.sampling is
    its student's own chain, DDIM with eta 0 on the N_k / 2 trailing steps, so that sample
    grids, sample.py and evaluation use it by default. Round 1 trains
    config.distill.first_round_steps steps when set (else training.num_steps, as every later
    round). Rerunning the chain resumes it: finished rounds load, see they are done, and
    return."""
    d = config.distill
    rounds = []
    for k in range(1, d.rounds + 1):
        round_config = copy.deepcopy(config)
        teacher_steps = d.teacher_steps // 2 ** (k - 1)
        with round_config.unlocked():
            round_config.distill.update(
                    teacher=d.teacher if k == 1 else rounds[-1][0],
                    teacher_step=d.teacher_step if k == 1 else None,
                    teacher_steps=teacher_steps, rounds=1, first_round_steps=None)
            if k == 1 and d.get("first_round_steps") is not None:
                round_config.training.num_steps = d.first_round_steps
            round_config.sampling.update(sampler="ddim", eta=0.0, steps=teacher_steps // 2,
                                         spacing="trailing")
        rounds.append((os.path.join(workdir, ROUND_DIR.format(k)), round_config))
    return rounds


def _train_under_lock(config: ml_collections.ConfigDict, workdir: str,
                      progress: ProgressFn | None) -> training.TrainState:
    """train_and_evaluate's body; the orbax manager's start-up removal of half-written
    checkpoints happens here, under the work-dir lock."""
    mesh = parallel.make_mesh()
    _check_setup(config, mesh)
    run = _start(config, workdir, mesh)
    config = run.config
    # Report the starting step to the preemption sync now: a SIGTERM during compilation then
    # still has a step to sync on (JAX's protocol fails when no process has reported one).
    checkpoint.reached_preemption(run.manager, [run.step])
    writers.drop_records_after(workdir, run.step)  # steps after the checkpoint run again
    writer = writers.MetricWriter(workdir)
    try:
        state, step = _run_steps(config, workdir, mesh, run, writer, progress)
    finally:
        # Whatever happened (an error, Ctrl-C), let a started save finish: never leave the
        # newest checkpoint half written.
        try:
            checkpoint.wait_until_finished(run.manager)
        finally:
            run.manager.close()
            writer.close()
    if step is not None:
        logging.info("Training finished at step %d.", step)
    return state


def _check_setup(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Warnings and one-line refusals that need the mesh (the rest is `config.validate`)."""
    t = config.training
    warn_if_remat_cannot_save_memory(config)
    if (config.model.num_classes is not None and t.label_dropout == 0.0
            and config_lib.model_kind(config) == "unet"):
        logging.warning("model.num_classes=%d with training.label_dropout=0: the null label is "
                        "never trained, yet the sample grids, sample.py and evaluation draw with "
                        "it (unconditional). Set training.label_dropout > 0 (0.1 is usual).",
                        config.model.num_classes)
    logging.info("Mesh: %d devices on %d processes.", mesh.size, jax.process_count())
    if t.batch_size % mesh.size:
        raise config_lib.ConfigError(
                f"training.batch_size={t.batch_size} does not split over the {mesh.size} devices: "
                f"set --config.training.batch_size to a multiple of {mesh.size} (e.g. "
                f"{parallel.round_up_to_devices(t.batch_size, mesh.size)}).")
    if (t.batch_size // t.microbatches) % mesh.size:
        raise config_lib.ConfigError(f"training.microbatches={t.microbatches} slices the batch of "
                         f"{t.batch_size} into {t.batch_size // t.microbatches} rows, which do not "
                         f"split over the {mesh.size} devices: use microbatches such that "
                         f"batch_size / microbatches is a multiple of {mesh.size}.")


@dataclasses.dataclass
class _Run:
    """What the loop runs on: built once by `_start`."""

    model: Any
    schedule: Schedule             # replicated over the mesh
    settings: training.StepConfig
    state: training.TrainState
    iterator: Any
    manager: Any
    step: int
    config: ml_collections.ConfigDict  # the run's config (a distillation's teacher step pinned)
    teacher_params: Any = None     # the step's frozen parameters, replicated: a distillation's
                                   # teacher or a fine-tuning's base (EMA weights); else None
    finetune: Any = None           # a fine-tuning run's finetune.Setup; else None
    first_stage: Any = None        # a latent run's latent.FirstStage (frozen autoencoder); else None

    def plain_params(self, params: Any) -> Any:
        """The sampling parameters of a state's (EMA) params: a fine-tuning run's trainable tree
        merged into its base; a latent run's joined with its autoencoder's."""
        if self.first_stage is not None:
            return self.first_stage.join(params)
        if self.finetune is None:
            return params
        return _merge_jitted(params, self.teacher_params, self.finetune.transform)


@functools.partial(jax.jit, static_argnums=2)
def _merge_jitted(trainable: Any, base: Any, transform: Any) -> Any:
    return adapters.merge(base, trainable, transform)


def _start(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> _Run:
    """The model, the replicated schedule, the step settings, the input iterator, and the
    state: restored from the newest checkpoint (with the iterator's position) or created."""
    t = config.training
    replicated = parallel.replicated(mesh)
    model = config_lib.model_from_config(config)
    # Before the input pipeline fills a batch that cannot fit: one line with the estimate.
    memory.check_training_batch(model, config_lib.image_shape(config), t.batch_size,
                                t.microbatches)
    # From host values, identical on every process, to one replicated global array per field.
    schedule = jax.device_put(jax.tree.map(np.asarray, config_lib.schedule_from_config(config)),
                              replicated)
    manager = checkpoint.make_manager(workdir, max_to_keep=t.keep_checkpoints,
                                      keep_period=t.keep_every)
    last_checkpoint = manager.latest_step()
    try:
        held = frozen.resolve(config, model, manager, last_checkpoint, replicated)
    except config_lib.ConfigError:
        manager.close()
        raise
    config, model, teacher_params, tuning = held.config, held.model, held.params, held.tuning
    settings = config_lib.step_config(config, model, teacher_mean_type=held.teacher_mean_type,
                                      transform=held.transform)
    create = frozen.create_fn(held, settings.optimizer, replicated) or functools.partial(
            jitted_create_train_state(mesh), model, settings.optimizer,
            image_shape=config_lib.image_shape(config))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            jax.eval_shape(create, jax.random.PRNGKey(t.seed)))
    if config.finetune.base is not None:
        iterator = finetune.make_iterator(tuning, held.instances,
                                          finetune.prior_data(tuning, workdir, mesh), mesh)
        logging.info("%s", finetune.summary(tuning, abstract.params))
    else:
        iterator = data.make_input_iterator(
            config.data.dataset, "train", global_batch_size=t.batch_size, seed=t.seed,
            image_size=config.data.image_size, channels=config.data.channels,
            random_flip=config.data.random_flip, mesh=mesh, data_dir=config.data.data_dir,
            exclude_labels=tuple(config.data.exclude_labels),
            controls=control.given_controls(config))
    first_stage = None
    if latent.is_latent(config):  # its frozen autoencoder; the scale and step pinned in config
        config, first_stage = latent.start(config, manager, last_checkpoint, iterator, mesh)
        model = first_stage.unet_and_decoder(model)  # grids and evaluation decode

    if last_checkpoint is not None:
        logging.info("Resuming from the checkpoint at step %d in %s.", last_checkpoint,
                     manager.directory)
        state = checkpoint.restore(manager, last_checkpoint, abstract, config,
                                   data_iterator=iterator)
    else:
        state = create(jax.random.PRNGKey(t.seed))
        if teacher_params is not None and tuning is None:  # the student starts as its teacher
            state = frozen.start_from_teacher(mesh)(state, teacher_params)
    # Only now: a refused resume must not overwrite the config of the run that owns the dir.
    save_resolved_config(config, workdir)
    step = int(jax.device_get(state.step))
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    logging.info("Model: %s parameters; starting at step %d of %d.", f"{num_params:,}", step,
                 t.num_steps)
    return _Run(model, schedule, settings, state, iterator, manager, step, config, teacher_params,
                tuning, first_stage)


def _run_steps(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, run: _Run,
               writer: writers.MetricWriter, progress: ProgressFn | None
               ) -> tuple[training.TrainState, int | None]:
    """The loop: dispatch K steps at a time, then what is due at the new step. Returns the
    final state and step (None when preempted)."""
    t, k, step, state = config.training, config.training.steps_per_dispatch, run.step, run.state
    step_fn = functools.partial(jitted_train_step(mesh, k), settings=run.settings)
    stack = jax.jit(lambda *bs: jax.tree.map(lambda *x: jnp.stack(x), *bs),
                    out_shardings=NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS)))
    accumulator, previous_metrics = _MetricAccumulator(step), None
    while step < t.num_steps:
        k_now = min(k, t.num_steps - step)
        batches = [next(run.iterator) for _ in range(k_now)]
        if run.first_stage is not None:  # latent diffusion: the batches' latents, on device
            batches = [run.first_stage.encode(b, step + j) for j, b in enumerate(batches)]
        state, metrics = step_fn(state, batches[0] if k == 1 else stack(*batches), run.schedule,
                                 teacher_params=run.teacher_params)
        previous, step = step, step + k_now
        accumulator.add(metrics)
        # The counter of the previous dispatch is read after this one is queued, so the
        # check does not stall the device.
        if previous_metrics is not None:
            _check_nonfinite(previous_metrics, previous, t.max_nonfinite_in_a_row,
                             run.manager.latest_step())
        previous_metrics = metrics
        scalars = None
        if due(step, t.log_every, t.num_steps, prev_step=previous):
            scalars = _log_scalars(accumulator, writer, step, t.batch_size)
            _check_nonfinite(metrics, step, t.max_nonfinite_in_a_row, run.manager.latest_step())
        if jax.process_index() == 0 and progress is not None:
            progress(step, scalars)
        if _save_or_stop(config, run, state, step, previous):
            return state, None
        _grids_and_evaluation(config, workdir, mesh, run, writer, state, step, previous)
    return state, step


def _log_scalars(accumulator: _MetricAccumulator, writer: writers.MetricWriter, step: int,
                 batch_size: int) -> dict[str, float]:
    """The metrics since the last log, with steps/s and examples/s, written at `step`."""
    scalars = accumulator.reduce()
    now = time.time()
    elapsed = max(now - accumulator.last_time, 1e-9)
    scalars["steps_per_sec"] = (step - accumulator.last_step) / elapsed
    scalars["examples_per_sec"] = scalars["steps_per_sec"] * batch_size
    accumulator.last_time, accumulator.last_step = now, step
    writer.write_scalars(step, scalars)
    return scalars


def _save_or_stop(config: ml_collections.ConfigDict, run: _Run, state: training.TrainState,
                  step: int, previous: int) -> bool:
    """Saves a due checkpoint; on preemption saves, waits and returns True (stop)."""
    t = config.training
    preempted = checkpoint.reached_preemption(run.manager, range(previous + 1, step + 1))
    if preempted or due(step, t.checkpoint_every, t.num_steps, prev_step=previous):
        checkpoint.save(run.manager, step, state, config, data_iterator=run.iterator)
    if preempted:
        checkpoint.wait_until_finished(run.manager)
        logging.warning("Preempted: saved the checkpoint of step %d in %s; exiting.",
                        step, run.manager.directory)
    return preempted


def _grids_and_evaluation(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, run: _Run,
                          writer: writers.MetricWriter, state: training.TrainState, step: int,
                          previous: int) -> None:
    """A due sample grid of the EMA weights, and a due evaluation with its scalars."""
    t = config.training
    if due(step, t.sample_every, t.num_steps, prev_step=previous):
        write_sample_grid(config, run.model, run.schedule, run.plain_params(state.ema_params),
                          mesh,
                          os.path.join(workdir, SAMPLES_DIR, f"step_{step:08d}.png"))
    every = config.eval.every_steps
    if every and due(step, every, t.num_steps, prev_step=previous):
        from ddpm_jax import evaluate  # feature networks: loaded only when asked for
        report = evaluate.run_evaluation(
                evaluate.RunData.from_config(config), sampling.ModelApply(run.model),
                run.plain_params(state.ema_params), evaluate.EvalOptions.from_config(config),
                workdir=workdir,
                step=step, weights="ema", mesh=mesh, progress=False)
        writer.write_scalars(step, evaluate.scalars(report))
