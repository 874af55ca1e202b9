"""The reverse chain as one `lax.scan`: what `sampling.Sampler` compiles and calls.

Each step reads the plan's per-step data (`plans.SamplingPlan`), calls the model (with
classifier-free guidance through `guidance.guided_model`), forms p(x_{t-1} | x_t) with the spec's
clip or dynamic threshold, applies classifier guidance, and moves by the sampler's update rule,
chosen once per compile from `STEP_RULES` (no string tests inside the scan). Everything the
program is specialised on is one hashable `ChainOptions`; everything else is data.

One seam serves the methods that call the model more than once per step: `predict(x, j)`, the
same guided prediction at chain index j on another x. Heun's rule calls it on its Euler
proposal at index i - 1; the Langevin corrector calls it after the predictor step (both skipped
on the last step, which lands on sigma = 0).

Known regions (`ChainOptions.blend`; DiffEdit, Blended diffusion): after every step the pixels
that `blend["mask"]` marks known are replaced by the source's state at the index landed on,
`blend_known`, the rule RePaint's chain (`editing.chain`) uses too: "q_x0" draws it from
q(X_{i-1} | x0 = `blend["known"]`) (the image itself after the last step), "trajectory" takes
it from `blend["known"][i]` (a deterministic encoding's X_{i-1}, [S, B, H, W, C]).

Indexing and randomness: see `sampling` (the contract lives with the public API).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ddpm_jax import xla_cpu
from ddpm_jax.diffusion import dynamic_threshold, p_mean_variance, q_posterior_mean_variance, q_sample
from ddpm_jax.guidance import ApplyFn, classifier_guidance, guided_model
from ddpm_jax.parallel import DATA_AXIS, constrain
from ddpm_jax.plans import SamplingPlan, progressive_indices
from ddpm_jax.spec import SAMPLERS, SamplerSpec

Array = jax.Array


BLENDS = ("q_x0", "trajectory")


def q_known(schedule: Any, x0: Array, i: Array, noise: Array) -> Array:
    """A draw of q(X_{i-1} | x0) for the state the reverse move at chain index i lands on:
    sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) noise, and x0 itself (bit for bit) after i = 0.
    x0, noise: [B, H, W, C]; i: a scalar chain index."""
    last = i == 0
    prev = jnp.maximum(i - 1, 0)
    abar_prev = jnp.where(last, 1.0, schedule.alphas_cumprod[prev])
    return jnp.sqrt(abar_prev) * x0 + jnp.where(last, 0.0, jnp.sqrt(1.0 - abar_prev)) * noise


def blend_known(known_mask: Array, known: Array, generated: Array) -> Array:
    """known_mask * known + (1 - known_mask) * generated: with a 0 / 1 mask, the known pixels
    exactly `known`'s and the rest exactly `generated`'s. known_mask: [B, H, W, 1 or C]."""
    return known_mask * known + (1.0 - known_mask) * generated


def row_keys(key: Array, rows: Array) -> tuple[Array, Array]:
    """(init_keys, step_keys), each [B]: split(fold_in(key, n)) of each row's global index n."""
    keys = jax.vmap(lambda n: jax.random.split(jax.random.fold_in(key, n)))(rows)   # [B, 2]
    return keys[:, 0], keys[:, 1]


@dataclasses.dataclass(frozen=True)
class StepRule:
    """One sampler's update of the chain, chosen once per compile from `STEP_RULES`.

    update(out, x_t, per_step, history, predict) -> (mean, std or None, history): `out` is the
    step's `p_mean_variance` (after thresholding and guidance), `per_step` the plan's data at
    this index, `history` the x0 predictions a multistep solver carries, `predict(x, j)` the
    seam for a further model call (the same `out` for x at chain index j). std None: no noise.
    ancestral: the step draws around the posterior mean (thresholding re-forms that mean from
    the thresholded x0; classifier guidance shifts it); otherwise the step is built from x0.
    solver: DPM-Solver++'s per-step weights and x0 history ride along. edm: the plan's EDM
    weights (step_coef, heun_coef) ride along."""

    update: Callable[..., tuple[Array, Array | None, tuple[Array, ...]]]
    ancestral: bool = False
    solver: bool = False
    edm: bool = False


def _ancestral_update(out, x_t, per_step, history, predict):
    return out["mean"], jnp.exp(0.5 * out["log_variance"]), history


def _ddim_update(out, x_t, per_step, history, predict):
    return per_step["coef_x0"] * out["pred_x0"] + per_step["coef_xt"] * x_t, per_step["sigma"], \
        history


def _solver_mean(out, x_t, per_step, history):
    """DPM-Solver++'s mean; history[k] is x0_hat of the (k+1)-th step back."""
    weights = per_step["dpm_x0"]
    mean = per_step["dpm_xt"] * x_t + weights[0] * out["pred_x0"]
    for k, past in enumerate(history):
        mean = mean + weights[k + 1] * past
    return mean, ((out["pred_x0"],) + history)[:len(history)]


def _dpm_update(out, x_t, per_step, history, predict):
    mean, history = _solver_mean(out, x_t, per_step, history)
    return mean, None, history  # the probability-flow ODE: no noise


def _dpm_sde_update(out, x_t, per_step, history, predict):
    mean, history = _solver_mean(out, x_t, per_step, history)
    return mean, per_step["dpm_z"], history  # dpm_z z (0 on the last step)


def _euler_ancestral_update(out, x_t, per_step, history, predict):
    c = per_step["step_coef"]
    return c[0] * x_t + c[1] * out["pred_x0"], c[2], history


def _heun_update(out, x_t, per_step, history, predict):
    """EDM's Alg. 1: the Euler proposal at t_{i-1}, then the trapezoid with the slope there
    (`plans.edm_coefficients`); the last step (to sigma = 0) is the Euler step alone."""
    c, w, i = per_step["step_coef"], per_step["heun_coef"], per_step["index"]
    euler = c[0] * x_t + c[1] * out["pred_x0"]

    def corrected(proposal):
        return w[0] * x_t + w[1] * out["pred_x0"] + w[2] * predict(proposal, i - 1)["pred_x0"]

    return jax.lax.cond(i > 0, corrected, lambda proposal: proposal, euler), None, history


STEP_RULES = {"ddpm": StepRule(_ancestral_update, ancestral=True),
              "ddim": StepRule(_ddim_update),
              "dpm++": StepRule(_dpm_update, solver=True),
              "dpm++sde": StepRule(_dpm_sde_update, solver=True),
              "heun": StepRule(_heun_update, edm=True),
              "euler_ancestral": StepRule(_euler_ancestral_update, edm=True)}
assert set(STEP_RULES) == set(SAMPLERS)


def langevin_step(x: Array, score: Array, noise: Array, snr: Array, alpha: Array) -> Array:
    """One Langevin corrector step (Song et al. 2021, Alg. 5; score_sde's LangevinCorrector):
        eps = 2 alpha (r ||z|| / ||score||)^2,   x <- x + eps score + sqrt(2 eps) z,
    x, score, noise z: [B, H, W, C]; snr r and alpha (score_sde's alpha_t = 1 - beta_t): scalars.
    The norms are per example (score_sde averages them over the batch, which would make a
    sample depend on its batch); returns [B, H, W, C]."""
    axes = tuple(range(1, x.ndim))
    score_norm = jnp.sqrt(jnp.sum(jnp.square(score), axis=axes, keepdims=True))
    noise_norm = jnp.sqrt(jnp.sum(jnp.square(noise), axis=axes, keepdims=True))
    step = 2.0 * alpha * jnp.square(snr * noise_norm / score_norm)
    return x + step * score + jnp.sqrt(2.0 * step) * noise


@dataclasses.dataclass(frozen=True)
class ChainOptions:
    """What the compiled chain is specialised on (hashable; everything else is data): the
    batch shape, the spec's sampler and output reading, recording, guidance, sharding, start,
    the corrector's number of Langevin steps (0: none) and the known region's source (None,
    or one of BLENDS)."""

    shape: tuple[int, ...]
    sampler: str
    mean_type: str
    var_type: str
    clip_denoised: bool
    threshold: float | None
    return_every: int | None = None
    progressive: tuple[str, ...] = ("pred_x0",)
    unroll: int = 1
    guided: bool = False
    mesh: Mesh | None = None
    classifier: ApplyFn | None = None
    start: str = "noise"
    corrector_steps: int = 0
    blend: str | None = None

    @classmethod
    def of(cls, spec: SamplerSpec, shape: Sequence[int], **rest: Any) -> ChainOptions:
        return cls(shape=tuple(int(s) for s in shape), sampler=spec.sampler,
                   mean_type=spec.mean_type, var_type=spec.var_type,
                   clip_denoised=spec.clip_denoised, threshold=spec.threshold,
                   corrector_steps=spec.corrector_steps or 0, **rest)


def _first_state(plan: SamplingPlan, init_keys: Array, init: Array | None,
                 static: ChainOptions) -> Array:
    """x at the plan's first timestep: N(0, I), `init` itself, or q(x_t | x0 = init)."""
    batch, image_shape = static.shape[0], static.shape[1:]
    x_t = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(init_keys)
    if static.start == "x_t":  # the chain's first state, given (decoding latents, interpolation)
        x_t = init.astype(jnp.float32)
    elif static.start == "q_x0":  # SDEdit: x ~ q(x_t | x0 = init) at the plan's first timestep
        first = jnp.full((batch,), plan.num_steps - 1, jnp.int32)
        x_t = q_sample(plan.schedule, x0=init.astype(jnp.float32), t=first, noise=x_t)
    return constrain(x_t, static.mesh)


def _predict(model_out: Callable[[Array, Array], Array], plan: SamplingPlan, x_t: Array, t: Array,
             index: Array, static: ChainOptions) -> dict[str, Array]:
    """One step's p_mean_variance with the spec's clip or dynamic threshold."""
    threshold = static.threshold
    out = p_mean_variance(plan.schedule, model_output=model_out(x_t, t), x_t=x_t, t=index,
                          mean_type=static.mean_type, var_type=static.var_type,
                          clip_denoised=static.clip_denoised and threshold is None)
    if threshold is not None:
        out["pred_x0"] = dynamic_threshold(out["pred_x0"], ratio=threshold)
        if STEP_RULES[static.sampler].ancestral and static.mean_type != "xprev":
            out["mean"] = q_posterior_mean_variance(plan.schedule, x0=out["pred_x0"], x_t=x_t,
                                                    t=index)[0]
    return out


def _reverse_chain(apply_fn: ApplyFn, params: Any, plan: SamplingPlan, key: Array,
                   example_offset: Array, labels: Array | None, guidance: Array,
                   init: Array | None, rows: Array | None, classifier_params: Any,
                   classifier_scale: Array, blend: dict[str, Array] | None = None, *,
                   static: ChainOptions) -> dict[str, Array]:
    batch, image_shape = static.shape[0], static.shape[1:]
    mesh, rule, classifier = static.mesh, STEP_RULES[static.sampler], static.classifier
    # With a classifier the labels are its targets; the model sees them only if conditional.
    conditional = classifier is None or getattr(apply_fn, "null_label", None) is not None
    conditional = conditional or hasattr(apply_fn, "class_targets")  # rows beyond labels
    targets = labels if labels is None or not hasattr(apply_fn, "class_targets") else \
        apply_fn.class_targets(labels)
    model_out = guided_model(apply_fn, params, labels if conditional else None, guidance,
                             channels=image_shape[-1], guided=static.guided, mesh=mesh)
    if rows is None:
        rows = example_offset + jnp.arange(batch, dtype=jnp.int32)
    init_keys, step_keys = row_keys(key, constrain(rows, mesh))
    x_t = _first_state(plan, init_keys, init, static)
    records, every = {}, static.return_every
    if every is not None:
        num_records = len(progressive_indices(plan.num_steps, every))
        records = {name: constrain(jnp.zeros((num_records,) + static.shape, jnp.float32), mesh,
                                   PartitionSpec(None, DATA_AXIS)) for name in static.progressive}

    def guided(x, t, index):
        out = _predict(model_out, plan, x, t, index, static)
        if classifier is not None:
            out = classifier_guidance(out, classifier, classifier_params, classifier_scale,
                                      targets, plan.schedule, x_t=x, t=t, index=index,
                                      shift_mean=rule.ancestral)
        return out

    def predict(x, j):
        """The seam: the step's guided prediction for x at chain index j (a traced scalar)."""
        return guided(x, jnp.full((batch,), plan.timesteps[j], jnp.int32),
                      jnp.full((batch,), j, jnp.int32))

    def correct(x, i):
        """corrector_steps Langevin steps at chain index i - 1 (after the step from i), with
        the score of the step's prediction, (alpha x0_hat - x) / sigma^2 (= -eps / sigma
        unclipped), and noise normal(fold_in(fold_in(step_key, i), 1 + j)) for step j."""
        abar = plan.schedule.alphas_cumprod[i - 1]

        def one(j, x):
            x0_hat = predict(x, i - 1)["pred_x0"]
            noise = jax.vmap(lambda k: jax.random.normal(
                    jax.random.fold_in(jax.random.fold_in(k, i), 1 + j), image_shape,
                    jnp.float32))(step_keys)
            score = (jnp.sqrt(abar) * x0_hat - x) / (1.0 - abar)
            return constrain(langevin_step(x, score, noise, plan.corrector_snr[i - 1],
                                           plan.corrector_alpha[i - 1]), mesh)

        return jax.lax.fori_loop(0, static.corrector_steps, one, x)

    def step(carry, per_step):
        x_t, history, records = carry
        i = per_step["index"]
        index = jnp.full((batch,), i, jnp.int32)
        t = jnp.full((batch,), per_step["timestep"], jnp.int32)
        out = guided(x_t, t, index)
        mean, std, history = rule.update(out, x_t, per_step, history, predict)
        if std is None:
            x_prev = constrain(mean, mesh)
        else:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), image_shape,
                                                         jnp.float32))(step_keys)
            # No noise on the last step: the chain returns its final mean, as the official sampler.
            x_prev = constrain(mean + jnp.where(i > 0, std, 0.0) * noise, mesh)
        if static.corrector_steps:  # none after the last step, which lands on x0_hat
            x_prev = jax.lax.cond(i > 0, lambda x: correct(x, i), lambda x: x, x_prev)
        if static.blend == "q_x0":  # noise normal(fold_in(fold_in(step_key, i), 0))
            z = jax.vmap(lambda k: jax.random.normal(
                    jax.random.fold_in(jax.random.fold_in(k, i), 0), image_shape,
                    jnp.float32))(step_keys)
            x_prev = constrain(blend_known(known_mask, q_known(plan.schedule, blend["known"], i, z),
                                           x_prev), mesh)
        elif static.blend == "trajectory":
            x_prev = constrain(blend_known(known_mask, per_step["known"], x_prev), mesh)
        if records:
            # Slot i // k is rewritten at every index of its block; the chain runs i downwards,
            # so the value left is the one at i = slot * k, with no conditional.
            values = dict(pred_x0=out["pred_x0"], x_t=x_t)
            records = {name: jax.lax.dynamic_update_index_in_dim(buf, values[name], i // every, 0)
                       for name, buf in records.items()}
        return (x_prev, history, records), None

    per_step = dict(index=jnp.arange(plan.num_steps, dtype=jnp.int32), timestep=plan.timesteps,
                    coef_x0=plan.ddim_coef_x0, coef_xt=plan.ddim_coef_xt, sigma=plan.ddim_sigma)
    history = ()
    if rule.solver:
        per_step.update(dpm_xt=plan.dpm_coef_xt, dpm_x0=plan.dpm_coef_x0, dpm_z=plan.dpm_coef_z)
        # Zeros until the warm-up fills them (their weights are 0 there); the order is the
        # plan's K, a shape: order 1 carries no history.
        history = tuple(jnp.zeros_like(x_t) for _ in range(plan.dpm_coef_x0.shape[1] - 1))
    if rule.edm:
        per_step.update(step_coef=plan.step_coef, heun_coef=plan.heun_coef)
    if static.blend is not None:
        known_mask = constrain(blend["mask"].astype(jnp.float32), mesh)
        if static.blend == "trajectory":
            per_step["known"] = blend["known"].astype(jnp.float32)
    per_step = jax.tree.map(lambda a: jnp.flip(a, axis=0), per_step)
    (images, _, records), _ = jax.lax.scan(step, (x_t, history, records), per_step,
                                           unroll=static.unroll)
    result = dict(images=images)
    decode = getattr(apply_fn, "decode", None)  # a latent model's decoder, in the same program
    if decode is not None and getattr(apply_fn, "decodes", False):
        result.update(latents=images, images=decode(params, images))
    result.update({name: jnp.flip(buf, axis=0) for name, buf in records.items()})
    return result


STARTS = ("noise", "x_t", "q_x0")


@functools.cache
def chain_jit(top_level: bool) -> Callable[..., dict[str, Array]]:
    """The jitted chain, built on first use so that the backend's compiler options are known.
    jax accepts compiler options only on a top-level jit: a chain traced inside the caller's own
    jit (top_level=False) compiles with the caller's program and its options."""
    options = xla_cpu.compiler_options("inference") if top_level else None
    return jax.jit(_reverse_chain, static_argnums=0, static_argnames=("static",),
                   compiler_options=options)
