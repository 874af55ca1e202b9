"""The train state and the train step, as pure functions (no I/O, no globals).

The recipe is the official one (`diffusion_tf/diffusion_utils_2.py` + `scripts/run_cifar.py`):
Adam (eps 1e-8) with a linear warmup `lr * min(1, step / warmup_steps)` (0 at step 0; an
optional cosine or linear decay to 0 after it, off by default),
global-norm gradient clipping before Adam, and an EMA of the parameters updated after every
step from the new parameters, `ema = decay * ema + (1 - decay) * params` (the paper's constant
decay; `training.ema_warmup` ramps it as min(decay, (1 + n) / (10 + n))).

Every random number of step `s` comes from `fold_in(state.rng, s)`, drawn with global shapes
inside the jitted step: results depend neither on how the loop is split into calls nor, under
`jit` with `NamedSharding` (partitionable threefry), on the number of devices.

`train_step` is jitted by the caller (`loop.py`) with shardings and donation; nothing here
touches devices or files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import adapters, control, diffusion, distill, xla_cpu
from ddpm_jax.models.autoencoder import Autoencoder, autoencoder_loss
from ddpm_jax.schedule import Schedule

Array = jax.Array
PyTree = Any
Batch = dict[str, Array]
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; one pytree, saved whole by the checkpointer.

    step: int32 []; number of optimizer steps taken (the next step's index).
    params / ema_params: the model's parameters and their EMA, float32, separate buffers.
    opt_state: Adam's moments (float32) and count, after gradient clipping.
    rng: uint32 [2], the run's base key; step s uses fold_in(rng, s).
    nonfinite_in_a_row / nonfinite_total: int32 []; steps whose loss or gradient norm was not
        finite (those updates are skipped).
    """

    step: Array
    params: PyTree
    opt_state: optax.OptState
    ema_params: PyTree
    rng: Array
    nonfinite_in_a_row: Array
    nonfinite_total: Array


LR_DECAYS = ("none", "cosine", "linear")


def learning_rate(step: Array | int, *, base_lr: float, warmup_steps: int, decay: str = "none",
                  total_steps: int | None = None) -> Array:
    """The learning rate of the update made at 0-based `step`; float32 [].

    decay="none" is the official schedule: base_lr * min(1, step / warmup_steps) (0 at step 0,
    then constant). "cosine" / "linear" multiply that by a factor falling from 1 at the end of
    the warmup to 0 at `total_steps`: 0.5 (1 + cos(pi f)) or 1 - f, with
    f = (step - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1].
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"Unknown lr decay {decay!r}; choose one of {', '.join(LR_DECAYS)}.")
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 0:
        lr = jnp.full((), base_lr, jnp.float32)
    else:
        lr = base_lr * jnp.minimum(1.0, step / warmup_steps)
    if decay == "none":
        return lr
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"lr decay {decay!r} needs total_steps > warmup_steps={warmup_steps}; "
                         f"got {total_steps!r}.")
    f = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    factor = 0.5 * (1.0 + jnp.cos(jnp.pi * f)) if decay == "cosine" else 1.0 - f
    return lr * factor


@functools.cache
def make_optimizer(*, grad_clip: float, adam_b1: float = 0.9, adam_b2: float = 0.999,
                   adam_eps: float = 1e-8) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when grad_clip <= 0) then Adam's direction, *unscaled*.

    The learning rate is applied by `train_step` from `state.step`, so the schedule follows
    the step count even when non-finite updates are skipped (Adam's own count, used for bias
    correction, counts applied updates only). Memoised: equal arguments give the same object,
    so a jitted step that takes the optimizer as a static argument is not recompiled.
    """
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps))
    return optax.chain(*parts)


def init_params(model: nn.Module, rng: Array, image_shape: tuple[int, int, int]) -> PyTree:
    """The model's parameters for images of shape (H, W, C), from an all-zero batch of 1."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if isinstance(model, Autoencoder):  # a first stage: (x, key), no timestep
        return model.init({"params": rng}, x, jax.random.PRNGKey(0))["params"]
    variables = model.init({"params": rng}, x, t, train=False)
    return variables["params"]


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: Array,
                       image_shape: tuple[int, int, int]) -> TrainState:
    """A fresh state at step 0. rng: a raw uint32 [2] key (jax.random.PRNGKey(seed)).

    Jit it with `out_shardings` to create the parameters directly where they live. The EMA
    starts as an exact copy of the parameters, in its own buffers.
    """
    init_rng, run_rng = jax.random.split(rng)
    params = init_params(model, init_rng, image_shape)
    # A real copy: the jitted step donates the state, and two leaves sharing one buffer cannot
    # both be donated.
    ema_params = jax.tree.map(lambda p: p.copy(), params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      ema_params=ema_params, rng=run_rng, nonfinite_in_a_row=zero,
                      nonfinite_total=zero)


def _model_denoise_fn(model: nn.Module, params: PyTree, labels: Array | None,
                      dropout_rng: Array) -> Callable[[Array, Array], Array]:
    def denoise_fn(x_t: Array, t: Array) -> Array:
        out = model.apply({"params": params}, x_t, t, labels, train=True,
                          rngs={"dropout": dropout_rng})
        # Losses in float32 whatever the compute dtype.
        return out.astype(jnp.float32)
    return denoise_fn


def drop_labels(labels: Array, key: Array, rate: float, null_label: int) -> Array:
    """labels: [B] int -> [B] int with each label replaced by `null_label` with probability
    `rate` (classifier-free guidance's label dropout: the null label learns the unconditional
    model)."""
    if rate <= 0.0:
        return labels
    return jnp.where(jax.random.bernoulli(key, rate, labels.shape), null_label, labels)


def _unroll_loops(unroll: bool | None) -> bool:
    """Whether a lax.scan whose body takes gradients of convolutions should be unrolled
    (unroll=None: where `xla_cpu.prefers_unrolled_gradient_loops`, i.e. on XLA's CPU backend,
    whose loop bodies get naive gradient convolutions)."""
    return xla_cpu.prefers_unrolled_gradient_loops() if unroll is None else unroll


def _accumulate(grad_fn: Callable[..., Any], params: PyTree, data: tuple[Any, ...],
                dropout_rng: Array, microbatches: int, unroll: bool) -> Any:
    """grad_fn over `microbatches` equal slices of the batch, averaged: ((loss, terms), grads) of
    the whole batch, to float rounding. Slice i holds rows i, i + M, i + 2M, ... so that, with
    the batch split over devices in contiguous blocks, every slice is spread over every device.
    Dropout in slice i: fold_in(dropout_rng, i).

    One lax.scan over the slices: rolled, the backward pass holds the activations of one slice
    at a time; unrolled (`_unroll_loops`), XLA may schedule the slices as it likes."""
    batch = data[0].shape[0]
    if batch % microbatches:
        raise ValueError(f"The batch of {batch} does not split into {microbatches} equal "
                         "microbatches; pick a divisor.")

    def split(a: Array) -> Array:                                    # [B, ...] -> [M, B/M, ...]
        return a.reshape(batch // microbatches, microbatches, *a.shape[1:]).swapaxes(0, 1)

    def one(i: Array | int, slices: tuple[Any, ...]) -> Any:
        return grad_fn(params, *slices, jax.random.fold_in(dropout_rng, i))

    def body(total: Any, xs: tuple[Array, tuple[Any, ...]]) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, one(*xs)), None

    slices = jax.tree.map(split, data)
    first = jax.eval_shape(one, 0, jax.tree.map(lambda a: a[0], slices))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), slices), unroll=unroll)
    return jax.tree.map(lambda v: v / microbatches, total)


def ema_decay_at(step: Array, *, ema_decay: float, warmup: bool) -> Array:
    """The EMA decay of the update made at 0-based `step`: `ema_decay`, or with warmup
    min(ema_decay, (1 + step) / (10 + step)) (0.1 at step 0, 0.5 at step 8, 0.9 at step 80;
    the ramp of TensorFlow's ExponentialMovingAverage with num_updates)."""
    if not warmup:
        return jnp.float32(ema_decay)
    n = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The train step's settings: hashable, one static argument of the jitted step
    (`config.step_config` builds it from an experiment config).

    model / optimizer: the network and the optax transformation (the learning rate is applied
    by the step: `learning_rate`'s warmup over warmup_steps to base_lr, then lr_decay over
    total_steps). ema_decay / ema_warmup: the EMA (`ema_decay_at`). mean_type, var_type,
    loss_type, hybrid_lambda, loss_weight, min_snr_gamma: `diffusion.training_losses`.
    use_labels / label_dropout: class labels, each replaced by the null label with that
    probability. microbatches / unroll_microbatches: gradient accumulation (`_accumulate`).
    objective: "denoise", "classify" (a noise-conditional classifier) or "distill" (progressive
    distillation: `ddpm_jax.distill`; the teacher's parameters are the step's `teacher_params`
    argument, its network is `model`, its output read as teacher_mean_type, its x0 clipped to
    [-1, 1] with teacher_clip; teacher_steps N, the student learns N / 2). transform: a
    fine-tuning run's (`ddpm_jax.adapters`): the state's params are its trainable tree, and
    the network runs on `adapters.merge(frozen base, trainable, transform)`, the base being the
    step's `teacher_params` argument (the step's frozen parameters). objective "autoencoder":
    a latent-diffusion first stage (`models.autoencoder.autoencoder_loss`, reconstruction
    "l1" / "l2" + kl_weight * KL per pixel)."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    base_lr: float
    warmup_steps: int
    ema_decay: float
    ema_warmup: bool = False
    mean_type: str = "eps"
    var_type: str = "fixedlarge"
    loss_type: str = "mse"
    hybrid_lambda: float = 1e-3
    lr_decay: str = "none"
    total_steps: int | None = None
    loss_weight: str = "uniform"
    min_snr_gamma: float = 5.0
    use_labels: bool = False
    label_dropout: float = 0.0
    microbatches: int = 1
    unroll_microbatches: bool | None = None
    objective: str = "denoise"
    teacher_steps: int = 0
    teacher_mean_type: str = "eps"
    teacher_clip: bool = True
    transform: adapters.Transform | None = None
    control: control.StepSpec | None = None  # a control image from each batch (ddpm_jax.control)
    kl_weight: float = 1e-6
    reconstruction: str = "l1"


def train_step(state: TrainState, batch: Batch, schedule: Schedule, settings: StepConfig,
               teacher_params: PyTree = None) -> tuple[TrainState, Metrics]:
    """One optimizer step: (state, batch, schedule) -> (state, metrics).

    The schedule is an argument (data), not a constant, so that jit's cache can be shared by
    every run with equal settings. batch["image"]: [B, H, W, C] float32 in [-1, 1] (the global
    batch); batch["label"]: [B] int, read only with use_labels; then each is replaced by the
    model's null label (model.num_classes) with probability label_dropout. t ~ U{0..T-1} and the
    noise are drawn here with global shapes. microbatches=M > 1 runs the forward and backward
    pass over M equal slices of the batch in turn and averages the gradients (`_accumulate`):
    the same update up to float rounding (model dropout aside, which draws per slice). The
    slices run in one lax.scan, with the activation memory of B/M rows, except on XLA's CPU
    backend (unroll_microbatches=None picks by backend, `_unroll_loops`), where the scan is
    unrolled; that saves no memory on the CPU but runs faster than one pass (smaller
    convolutions suit the caches; see BENCHMARKS.md).
    ema_warmup: use `ema_decay_at(step)` = min(ema_decay, (1 + n) / (10 + n)) for the n-th update
    instead of the constant decay (off: the official recipe), so a short run's EMA forgets the
    random initialisation within a few hundred steps.
    When the loss or the gradient norm is not finite, params, opt_state and ema_params are kept,
    and the non-finite counters go up; otherwise nonfinite_in_a_row resets to 0.
    Metrics: a flat dict of float32 / int32 scalars (loss and its terms averaged over the batch,
    grad_norm before clipping, lr, nonfinite counters).
    objective="classify" trains a noise-conditional classifier instead (`model` returns logits
    [B, K] of x_t ~ q(x_t | x0) at the same uniform t; labels as given, never dropped): loss is
    the cross-entropy, with `accuracy` and `accuracy_t{0,1,2}`, the accuracy in the low, middle
    and high third of t (the batch's share of each third weighs it; 0 when a third is empty).
    objective="distill" draws the student's step uniformly from its teacher_steps / 2 steps
    instead of t and regresses the student's x0 on the teacher's two-step target
    (`distill.distillation_losses`, metrics loss and x0_mse); `teacher_params` (the teacher's
    parameters, never updated, not part of the state) are needed then and ignored otherwise.
    With settings.transform (fine-tuning) `teacher_params` holds the frozen base instead.
    objective="autoencoder" trains a first stage on the batch's images (t and the noise unused;
    z ~ q(z | x) drawn from the dropout key): metrics loss, reconstruction, kl, mse.
    batch["control"] (optional, [B, H, W, C_c] in [-1, 1]): the rows' control images given with
    the data (control kind "data").
    batch["weight"] (optional, [B] float32): per-row loss weights, loss = mean_b(w_b l_b)
    (`weighted_mean`; prior preservation weighs instance and prior rows); other terms stay
    unweighted means.
    """
    x0 = batch["image"]
    step_rng = jax.random.fold_in(state.rng, state.step)
    t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
    labels = None
    if settings.objective == "classify":
        labels = batch["label"]
    elif settings.use_labels:
        labels = drop_labels(batch["label"], jax.random.fold_in(step_rng, 3),
                             settings.label_dropout, settings.model.num_classes)
    # t: the timestep, or with objective="distill" the student's step index.
    high = settings.teacher_steps // 2 if settings.objective == "distill" else schedule.num_timesteps
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, high, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    (loss, terms), grads = _loss_and_grads(settings, state.params, schedule,
                                           (x0, t, noise, labels, batch.get("weight"),
                                            batch.get("control")),
                                           dropout_rng, teacher_params)
    return _update(settings, state, loss, terms, grads)


def _loss_and_grads(settings: StepConfig, params: PyTree, schedule: Schedule,
                    data: tuple[Any, ...], dropout_rng: Array,
                    teacher_params: PyTree = None) -> tuple[Any, PyTree]:
    """((loss, terms), grads) of the objective on data = (x0, t, noise, labels, weight,
    control: the batch's given control images or None), over
    the batch at once or accumulated over microbatches; grads are those of the trainable tree
    when settings.transform is set."""
    def loss_fn(params: PyTree, x0: Array, t: Array, noise: Array, labels: Array | None,
                weight: Array | None, given: Array | None,
                dropout_rng: Array) -> tuple[Array, dict[str, Array]]:
        if settings.transform is not None:
            params = adapters.merge(teacher_params, params, settings.transform)
        if settings.objective == "autoencoder":  # z ~ q(z | x) from the step's dropout key
            loss, terms = autoencoder_loss(x0, settings.model.apply({"params": params}, x0,
                                                                    dropout_rng),
                                           kl_weight=settings.kl_weight,
                                           reconstruction=settings.reconstruction)
            return loss, dict(terms, loss=loss)
        if settings.objective == "classify":
            return _classifier_loss(settings.model, params, schedule, x0, t, noise, labels,
                                    dropout_rng)
        denoise_fn = (_model_denoise_fn(settings.model, params, labels, dropout_rng)
                      if settings.control is None else control.train_denoise_fn(
                              settings.control, settings.model, params, x0, labels, dropout_rng,
                              given))
        if settings.objective == "distill":
            terms = distill.distillation_losses(
                    schedule, denoise_fn, _teacher_x0_fn(settings, teacher_params, schedule, labels),
                    x0=x0, step_index=t, noise=noise, teacher_steps=settings.teacher_steps,
                    mean_type=settings.mean_type)
            terms = {name: jnp.mean(value) for name, value in terms.items()}
            return terms["loss"], terms
        terms = diffusion.training_losses(
                schedule, denoise_fn, x0=x0, t=t, noise=noise, mean_type=settings.mean_type,
                var_type=settings.var_type, loss_type=settings.loss_type,
                hybrid_lambda=settings.hybrid_lambda, loss_weight=settings.loss_weight,
                min_snr_gamma=settings.min_snr_gamma)
        loss = weighted_mean(terms["loss"], weight)
        terms = {name: jnp.mean(value) for name, value in terms.items()}
        terms["loss"] = loss
        return loss, terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if settings.microbatches == 1:
        return grad_fn(params, *data, dropout_rng)
    return _accumulate(grad_fn, params, data, dropout_rng, settings.microbatches,
                       _unroll_loops(settings.unroll_microbatches))


def weighted_mean(values: Array, weight: Array | None) -> Array:
    """mean_b(weight_b values_b) over the batch (the plain mean without weights). With weights
    2 on B/2 instance rows and 2 lambda on B/2 prior rows this is DreamBooth's objective,
    mean over instances + lambda * mean over prior samples. values, weight: [B]."""
    return jnp.mean(values) if weight is None else jnp.mean(weight * values)


def _teacher_x0_fn(settings: StepConfig, teacher_params: PyTree, schedule: Schedule,
                   labels: Array | None) -> distill.X0Fn:
    """The teacher's x0 prediction: `model` with the teacher's parameters, deterministic (no
    dropout), its output read as teacher_mean_type, clipped with teacher_clip; no gradient."""
    if teacher_params is None:
        raise ValueError("objective='distill' needs the teacher's parameters: pass "
                         "teacher_params to train_step.")

    def x0_fn(z: Array, t: Array) -> Array:
        out = settings.model.apply({"params": teacher_params}, z, t, labels, train=False)
        out = jax.lax.stop_gradient(out.astype(jnp.float32))[..., :z.shape[-1]]
        return distill.x0_from_output(schedule, output=out, z_t=z, t=t,
                                      mean_type=settings.teacher_mean_type,
                                      clip=settings.teacher_clip)
    return x0_fn


def _update(settings: StepConfig, state: TrainState, loss: Array, terms: dict[str, Array],
            grads: PyTree) -> tuple[TrainState, Metrics]:
    """The optimizer and EMA update, kept out when the loss or gradient is not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = learning_rate(state.step, base_lr=settings.base_lr, warmup_steps=settings.warmup_steps,
                       decay=settings.lr_decay, total_steps=settings.total_steps)
    direction, new_opt_state = settings.optimizer.update(grads, state.opt_state, state.params)
    tuning = settings.transform is not None and settings.transform.method in adapters.METHODS
    if tuning:
        direction = adapters.scale_row_updates(direction, settings.transform)
    new_params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
    decay = ema_decay_at(state.step, ema_decay=settings.ema_decay, warmup=settings.ema_warmup)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_params)
    if tuning and settings.transform.row_ema_warmup and settings.transform.rows:
        # A taught row starts at an uninformative point (a new class: the null row): its
        # average forgets that start, as a run from scratch does; the rest keeps the base's.
        row_decay = ema_decay_at(state.step, ema_decay=settings.ema_decay, warmup=True)
        rows = (row_decay * adapters.taught_rows(state.ema_params, settings.transform)
                + (1.0 - row_decay) * adapters.taught_rows(new_params, settings.transform))
        new_ema = adapters.with_taught_rows(new_ema, rows, settings.transform)

    def keep_if_nonfinite(new: PyTree, old: PyTree) -> PyTree:
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    nonfinite = (~finite).astype(jnp.int32)
    new_state = state.replace(
            step=state.step + 1,
            params=keep_if_nonfinite(new_params, state.params),
            opt_state=keep_if_nonfinite(new_opt_state, state.opt_state),
            ema_params=keep_if_nonfinite(new_ema, state.ema_params),
            nonfinite_in_a_row=(state.nonfinite_in_a_row + 1) * nonfinite,
            nonfinite_total=state.nonfinite_total + nonfinite,
    )
    metrics = dict(terms, grad_norm=grad_norm, lr=lr,
                   nonfinite_in_a_row=new_state.nonfinite_in_a_row,
                   nonfinite_total=new_state.nonfinite_total)
    return new_state, metrics


def _classifier_loss(model: nn.Module, params: PyTree, schedule: Schedule, x0: Array, t: Array,
                     noise: Array, labels: Array, dropout_rng: Array) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy of p(y | x_t, t) on x_t ~ q(x_t | x0), with accuracy overall and per third
    of t (each third's correct count over the batch's rows in it)."""
    x_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    logits = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng})
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    terms = dict(loss=loss, accuracy=jnp.mean(correct))
    band = jnp.minimum(3 * t // schedule.num_timesteps, 2)
    for k in range(3):
        rows = (band == k).astype(jnp.float32)
        terms[f"accuracy_t{k}"] = jnp.sum(correct * rows) / jnp.maximum(jnp.sum(rows), 1.0)
    return loss, terms


def train_steps(state: TrainState, batches: Batch, schedule: Schedule, settings: StepConfig,
                teacher_params: PyTree = None, *,
                unroll: bool | None = None) -> tuple[TrainState, Metrics]:
    """K optimizer steps in one call: batches hold a leading axis of K batches, [K, B, ...].

    Exactly K applications of `train_step` in one lax.scan, so the result equals K separate
    calls; unrolled (K copies of the step in one program) where `_unroll_loops(unroll)` says so,
    i.e. by default on XLA's CPU backend. Returns the final state and each metric stacked over
    the K steps: [K].
    """
    def body(carry: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return train_step(carry, batch, schedule, settings, teacher_params)
    return jax.lax.scan(body, state, batches, unroll=_unroll_loops(unroll))
