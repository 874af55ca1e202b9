"""Exact likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2)
of a discrete-time DDPM: log p(x) by the instantaneous change of variables, integrated inside
jit (Dormand-Prince RK45 in a `lax.while_loop`, or fixed-step RK4 in a `lax.scan`), with the
exact trace of the Jacobian or the Hutchinson-Skilling estimate; bits/dim of 8-bit images with
uniform dequantisation as score_sde does.

The continuous-time embedding (stated exactly; docs/continuous_time.md derives it):
  * alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) (half the log-SNR).
    The process is the VP diffusion indexed by rho = -lambda: abar(rho) = sigmoid(-2 rho),
    sigma(rho)^2 = sigmoid(2 rho), rho increasing from data to noise. Its marginals are the
    forward process's q(x_t | x_0) for any monotone time, so the DDPM's discrete steps are the
    knots rho_t = -lambda(abar_t), t = 0..T-1 (0-based, the model's timestep input); the VP SDE
    dx = -beta(tau)/2 x dtau + sqrt(beta(tau)) dW with beta piecewise -log(1 - beta_t) on the
    unit step tau in (t, t+1] (~ score_sde's "betas * T" in unit time) has the same marginals.
  * Between knots the model is called with the fractional timestep t(rho), interpolated
    linearly in rho (= in log-SNR) between the knots: the field is then continuous in rho, which
    an adaptive solver needs (the UNet's sinusoidal embedding takes float t; nearest-integer t
    would make the field piecewise constant in time and the error control chase its jumps).
  * The probability-flow ODE in VP coordinates x, time rho (DDIM's ODE dx~/dsigma~ = eps with
    x~ = x / alpha, sigma~ = e^rho, rewritten for x = alpha x~):
        dx/drho = sigma (eps_hat(x, t(rho)) - sigma x),
    and its divergence sigma tr(d eps_hat / dx) - D sigma^2, so that
        log p_0(x) = log N(x_1; 0, I) + int_{rho_0}^{rho_1} [sigma tr(J) - D sigma^2] drho,
    x_1 the ODE's solution at rho_1 = -lambda_{T-1} (t = T-1) from x at rho_0 = -lambda_0
    (t = 0, where the integration starts: below it the model was never trained, as score_sde
    starts at eps = 1e-5, i.e. the first discrete level). N(0, I) is the prior at t = T-1.
  * eps_hat from the model's output by mean_type: eps itself, (x - alpha x0) / sigma (xstart) or
    sigma x + alpha v (v), never clipped (the field must be smooth). xprev has no continuous
    reading and is refused.

Hutchinson-Skilling: tr(J) ~ e^T J e with one probe e per image, fixed along the whole path
(Rademacher or Gaussian), e^T J e by one forward-mode jvp per evaluation; unbiased, with a
spread reported by `bench/ode_digits.py` over several probes. "exact": D jvps (small images).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ddpm_jax import diffusion, parallel, xla_cpu
from ddpm_jax.diffusion import split_model_output
from ddpm_jax.likelihood import _to_global
from ddpm_jax.schedule import Schedule

Array = jax.Array

SOLVERS = ("rk45", "rk4")
TRACES = ("rademacher", "gaussian", "exact")
ODE_MEAN_TYPES = ("eps", "xstart", "v")
# uniform: score_sde's x = 2 (k + u) / 256 - 1 (a density bound, +7 bits); decoder: x_1 ~ q(x_1|x_0)
# with the model's discretized decoder for p(x_0 | x_1) (a bound on the discrete data itself).
DEQUANTIZATIONS = ("uniform", "decoder")

# Dormand-Prince 5(4) (scipy's RK45): nodes C, stage weights A, 5th-order B, error E = B - B*.
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0])
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]]
_B = np.array([35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


def check_ode_options(*, solver: str, trace: str, mean_type: str, rtol: float, atol: float,
                      num_steps: int, dequantization: str = "uniform") -> None:
    """ValueError, one line per mistake, before anything compiles."""
    for name, value, choices in (("solver", solver, SOLVERS), ("trace", trace, TRACES),
                                 ("mean_type", mean_type, ODE_MEAN_TYPES),
                                 ("dequantization", dequantization, DEQUANTIZATIONS)):
        if value not in choices:
            extra = (" (the posterior mean has no continuous-time reading)"
                     if name == "mean_type" and value == "xprev" else "")
            raise ValueError(f"{name}={value!r}: choose one of {choices}{extra}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name}={value!r}: use a tolerance in (0, 1) such as 1e-5.")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: RK4 takes an int number of steps >= 1.")


def rho_knots(schedule: Schedule) -> np.ndarray:
    """rho_t = -lambda_t = 0.5 log((1 - abar_t) / abar_t) for t = 0..T-1: float64, increasing."""
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))
    return 0.5 * (np.log1p(-abar) - np.log(abar))


def _eps_hat(apply_fn: Callable, params: Any, mean_type: str, x: Array, rho: Array,
             knots: Array) -> Array:
    """eps_hat(x, t(rho)) for one image x [H, W, C]: the model at the fractional timestep
    interpolated linearly in rho between the knots."""
    t = jnp.interp(rho, knots, jnp.arange(knots.shape[0], dtype=jnp.float32))
    out, _ = split_model_output(model_output=apply_fn(params, x[None], t[None])[0],
                                var_type="fixedlarge", channels=x.shape[-1])
    sigma = jnp.sqrt(jax.nn.sigmoid(2.0 * rho))
    alpha = jnp.sqrt(jax.nn.sigmoid(-2.0 * rho))
    if mean_type == "xstart":
        return (x - alpha * out) / sigma
    if mean_type == "v":
        return sigma * x + alpha * out
    return out


def _field(apply_fn, params, mean_type, knots, trace, probe):
    """(rho, (x, integral)) -> (dx/drho, d integral/drho) for one image x [H, W, C]."""
    size = probe.size

    def eps_fn(x, rho):
        return _eps_hat(apply_fn, params, mean_type, x, rho, knots)

    def f(rho, state):
        x = state[0]
        sigma2 = jax.nn.sigmoid(2.0 * rho)
        sigma = jnp.sqrt(sigma2)
        if trace == "exact":
            eps = eps_fn(x, rho)
            basis = jnp.eye(size, dtype=x.dtype).reshape((size,) + x.shape)
            jvps = jax.vmap(lambda e: jax.jvp(lambda y: eps_fn(y, rho), (x,), (e,))[1])(basis)
            tr = jnp.sum(basis * jvps)
        else:
            eps, jvp = jax.jvp(lambda y: eps_fn(y, rho), (x,), (probe,))
            tr = jnp.sum(probe * jvp)
        return sigma * (eps - sigma * x), sigma * tr - size * sigma2

    return f


def _rk45(f, y0, t0, t1, rtol, atol, max_steps):
    """Dormand-Prince 5(4) with scipy's step control, in a lax.while_loop; y0 a pytree of
    arrays. Returns (y(t1), number of evaluations of f, accepted steps, reached t1)."""
    flat0, unravel = ravel_pytree(y0)

    def g(t, y):
        return ravel_pytree(f(t, unravel(y)))[0]

    def norm(v):
        return jnp.sqrt(jnp.mean(jnp.square(v)))

    k0 = g(t0, flat0)
    h0 = 0.01 * (t1 - t0)

    def step(state):
        t, y, k_first, h, nfe, accepted = state
        h = jnp.minimum(h, t1 - t)
        ks = [k_first]
        for s in range(1, 6):
            dy = sum(a * k for a, k in zip(_A[s], ks))
            ks.append(g(t + _C[s] * h, y + h * dy))
        y_new = y + h * sum(b * k for b, k in zip(_B, ks))
        k_last = g(t + h, y_new)
        err = h * sum(e * k for e, k in zip(_E, ks + [k_last]))
        scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
        err_norm = norm(err / scale)
        ok = err_norm <= 1.0
        factor = jnp.clip(0.9 * jnp.maximum(err_norm, 1e-10) ** -0.2, 0.2, 10.0)
        factor = jnp.where(ok, factor, jnp.minimum(factor, 1.0))
        return (jnp.where(ok, t + h, t), jnp.where(ok, y_new, y), jnp.where(ok, k_last, k_first),
                h * factor, nfe + 6, accepted + ok.astype(jnp.int32))

    def cond(state):
        t, *_, accepted = state
        return (t < t1 - 1e-6 * (t1 - t0)) & (state[4] < 6 * max_steps)

    t, y, _, _, nfe, accepted = jax.lax.while_loop(
            cond, step, (t0, flat0, k0, h0, jnp.int32(1), jnp.int32(0)))
    return unravel(y), nfe, accepted, t >= t1 - 1e-6 * (t1 - t0)


def _rk4(f, y0, t0, t1, num_steps):
    """Classic fixed-step RK4 over num_steps equal steps, one lax.scan."""
    h = (t1 - t0) / num_steps

    def add(y, k, c):
        return jax.tree.map(lambda a, b: a + c * b, y, k)

    def step(y, i):
        t = t0 + i * h
        k1 = f(t, y)
        k2 = f(t + h / 2, add(y, k1, h / 2))
        k3 = f(t + h / 2, add(y, k2, h / 2))
        k4 = f(t + h, add(y, k3, h))
        return jax.tree.map(lambda a, b1, b2, b3, b4: a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4),
                            y, k1, k2, k3, k4), None

    y, _ = jax.lax.scan(step, y0, jnp.arange(num_steps, dtype=jnp.float32))
    return y, jnp.int32(4 * num_steps), jnp.int32(num_steps), jnp.bool_(True)


def ode_log_likelihood(apply_fn: Callable, params: Any, knots: Array, x: Array, key: Array,
                       *, mean_type: str = "eps", trace: str = "rademacher",
                       solver: str = "rk45", rtol: float = 1e-5, atol: float = 1e-5,
                       num_steps: int = 100, max_steps: int = 2000) -> dict[str, Array]:
    """log p(x) in nats of continuous data x [B, H, W, C] under the probability-flow ODE (see the
    module docstring for the equations), per image, vmapped (each image its own adaptive steps:
    the result depends neither on the batch nor its size). Traceable; call inside jit.

    apply_fn(params, x [1, H, W, C], t [1] float) -> model output. knots: `rho_knots(schedule)`
    (float64 NumPy, computed outside jit; float32 inside). key: image b's probe is drawn
    from fold_in(key, b); pass per-image keys through `evaluate_ode_bpd` for batch-independent
    probes. trace: "rademacher" / "gaussian" (Hutchinson-Skilling) or "exact". solver: "rk45"
    (rtol, atol; at most max_steps accepted + rejected steps) or "rk4" (num_steps equal steps).
    Returns dict(log_likelihood [B] nats, prior [B] (log N(x_1; 0, I)), delta [B] (the integral),
    nfe [B] evaluations of the field, steps [B] accepted steps, converged [B] bool).
    """
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(x.shape[0]))
    knots = jnp.asarray(knots, jnp.float32)
    return jax.vmap(lambda xb, kb: _one_image(apply_fn, params, knots, xb, kb, mean_type,
                                              trace, solver, rtol, atol, num_steps,
                                              max_steps))(x, keys)


def _one_image(apply_fn, params, knots, x, key, mean_type, trace, solver, rtol, atol,
               num_steps, max_steps):
    if trace == "gaussian":
        probe = jax.random.normal(key, x.shape, jnp.float32)
    else:
        probe = jax.random.rademacher(key, x.shape, jnp.float32)
    f = _field(apply_fn, params, mean_type, knots, trace, probe)
    t0, t1 = knots[0], knots[-1]
    y0 = (x.astype(jnp.float32), jnp.float32(0.0))
    if solver == "rk45":
        (x1, delta), nfe, steps, converged = _rk45(f, y0, t0, t1, rtol, atol, max_steps)
    else:
        (x1, delta), nfe, steps, converged = _rk4(f, y0, t0, t1, num_steps)
    prior = -0.5 * jnp.sum(jnp.square(x1)) - 0.5 * x1.size * math.log(2 * math.pi)
    return dict(log_likelihood=prior + delta, prior=prior, delta=delta, nfe=nfe, steps=steps,
                converged=converged)


def dequantize(data: np.ndarray | Array, key: Array) -> Array:
    """uint8 k [B, H, W, C] -> x = 2 (k + u) / 256 - 1 in [-1, 1), u ~ U(0, 1) (score_sde's
    uniform dequantisation); bits/dim = -log p(x) / (D ln 2) + 7 (8 bits per unit of
    (k + u) / 256, minus 1 for the factor 2)."""
    u = jax.random.uniform(key, jnp.shape(data), jnp.float32)
    return 2.0 * (jnp.asarray(data, jnp.float32) + u) / 256.0 - 1.0


def bpd_from_log_likelihood(log_likelihood: Array, num_dims: int) -> Array:
    """Bits/dim of dequantised 8-bit data from log p(x) in nats of x = 2 (k + u) / 256 - 1."""
    return -log_likelihood / (num_dims * math.log(2.0)) + 7.0


def decoder_bound_terms(apply_fn: Callable, params: Any, schedule: Schedule, k: Array,
                        noise: Array, *, mean_type: str, var_type: str,
                        clip_denoised: bool) -> dict[str, Array]:
    """The first-step terms of the "decoder" dequantisation bound on 8-bit data k [1, H, W, C]:
        -log P(k) <= E_{x_1 ~ q(x_1|x_0)}[-log p(x_0 | x_1) - log p_ODE(x_1) + log q(x_1 | x_0)],
    x_0 = k / 127.5 - 1, x_1 = the forward process at t = 0 (0-based) drawn with `noise`, the
    decoder p(x_0 | x_1) the model's own discretized Gaussian (the bound's L_0). Returns x_1 (where
    the ODE starts), the decoder's NLL in nats and log q(x_1 | x_0) in nats (each [1])."""
    x0 = jnp.asarray(k, jnp.float32) / 127.5 - 1.0
    t = jnp.zeros((1,), jnp.int32)
    x1 = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    output = apply_fn(params, x1, t.astype(jnp.float32))
    decoder_bits, _ = diffusion.vb_terms_bpd(schedule, model_output=output, x0=x0, x_t=x1, t=t,
                                             mean_type=mean_type, var_type=var_type,
                                             clip_denoised=clip_denoised)
    num_dims = k.size
    sigma2 = 1.0 - schedule.alphas_cumprod[0]
    log_q = (-0.5 * jnp.sum(jnp.square(noise), axis=(1, 2, 3))
             - 0.5 * num_dims * jnp.log(2 * math.pi * sigma2))
    return dict(x1=x1, decoder_nll=decoder_bits * num_dims * math.log(2.0), log_q=log_q)


def _ode_bpd_batch_fn(apply_fn, params, knots, data, indices, key, probe_key, schedule, *,
                      options):
    options = dict(options)
    dequantization = options.pop("dequantization")
    var_type, clip_denoised = options.pop("var_type"), options.pop("clip_denoised")

    def one(k, index):
        image_key = jax.random.fold_in(key, index)
        probe = jax.random.fold_in(image_key if probe_key is None else
                                   jax.random.fold_in(probe_key, index), 1)
        if dequantization == "uniform":
            x = dequantize(k[None], jax.random.fold_in(image_key, 0))
        else:
            noise = jax.random.normal(jax.random.fold_in(image_key, 0), k[None].shape, jnp.float32)
            first = decoder_bound_terms(apply_fn, params, schedule, k[None], noise,
                                        mean_type=options["mean_type"], var_type=var_type,
                                        clip_denoised=clip_denoised)
            x = first["x1"]
        out = ode_log_likelihood(apply_fn, params, knots, x, probe, **options)
        out = jax.tree.map(lambda a: a[0], out)
        if dequantization == "uniform":
            out["bpd"] = bpd_from_log_likelihood(out["log_likelihood"], k.size)
        else:   # a bound on the discrete data itself: bits per dim, no +7
            nats = first["decoder_nll"][0] - out["log_likelihood"] + first["log_q"][0]
            out["bpd"] = nats / (k.size * math.log(2.0))
            out["decoder_bpd"] = first["decoder_nll"][0] / (k.size * math.log(2.0))
        return out

    return jax.vmap(one)(data, indices)


@functools.cache
def _ode_bpd_batch() -> Callable[..., dict[str, Array]]:
    return jax.jit(_ode_bpd_batch_fn, static_argnames=("apply_fn", "options"),
                   compiler_options=xla_cpu.compiler_options("inference"))


def evaluate_ode_bpd(apply_fn: Callable, params: Any, schedule: Schedule, data: np.ndarray,
                     key: Array, *, probe_key: Array | None = None, batch_size: int = 64,
                     mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                     **options: Any) -> dict[str, np.ndarray]:
    """ODE bits/dim of every image of `data` (uint8 [N, H, W, C]): image n is dequantised with
    fold_in(fold_in(key, n), 0) and probed with fold_in(fold_in(key, n), 1) (or, given
    probe_key, fold_in(fold_in(probe_key, n), 1): new probes on the same dequantised data), so
    the numbers depend neither on the batch size nor on the device count. options: `ode_log_likelihood`'s
    (mean_type, trace, solver, rtol, atol, num_steps, max_steps). Returns float64 / int arrays
    [N]: bpd, log_likelihood, nfe, steps, converged."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4 or len(data) == 0:
        raise ValueError(f"evaluate_ode_bpd takes uint8 images [N, H, W, C] with N >= 1, got "
                         f"{data.dtype} {data.shape}: dequantisation is defined on 8-bit data.")
    defaults = dict(mean_type="eps", trace="rademacher", solver="rk45", rtol=1e-5, atol=1e-5,
                    num_steps=100, max_steps=2000, dequantization="uniform",
                    var_type="fixedlarge", clip_denoised=True)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"evaluate_ode_bpd has no options {unknown}.")
    options = defaults | options
    check_ode_options(**{k: options[k] for k in ("solver", "trace", "mean_type", "rtol", "atol",
                                                  "num_steps", "dequantization")})
    batch = parallel.round_up_to_devices(min(batch_size, len(data)),
                                         1 if mesh is None else mesh.size)
    knots = jnp.asarray(rho_knots(schedule), jnp.float32)

    def one_batch(start: int, chunk: np.ndarray) -> dict[str, Array]:
        indices = np.arange(start, start + batch, dtype=np.int32)
        return _ode_bpd_batch()(apply_fn, params, knots, _to_global(chunk, mesh),
                                _to_global(indices, mesh), key, probe_key, schedule,
                                options=tuple(sorted(options.items())))

    out = parallel.map_batches(one_batch, [data], batch, desc="ODE bits/dim", progress=progress)
    return {k: np.asarray(v, np.float64 if v.dtype.kind == "f" else v.dtype) for k, v in out.items()}


def ode_bpd_summary(result: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the images: bits/dim with its standard error (over images; with a
    Hutchinson trace it holds the probes' spread too), mean and max NFE, images not converged."""
    bpd = result["bpd"]
    stderr = float(np.std(bpd, ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0
    return dict(total=float(np.mean(bpd)), total_stderr=stderr, nfe=float(np.mean(result["nfe"])),
                nfe_max=int(np.max(result["nfe"])),
                not_converged=int(np.sum(~result["converged"].astype(bool))),
                num_images=len(bpd))

