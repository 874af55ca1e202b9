"""The DDPM math as pure functions of arrays: forward process, posterior, reverse-step
parameterizations, the losses and the variational bound in bits/dim.

Conventions (those of the official implementation):
  * `t` is a 0-based int array of shape [B]; index i is the paper's step i + 1.
  * images are `[B, H, W, C]` in [-1, 1]; per-step scalars are gathered to `[B, 1, ..., 1]`.
  * the network enters only as a callable `denoise_fn(x_t, t) -> model_output`.
  * arrays are keyword-only after the schedule (and denoise_fn):
    `q_sample(schedule, x0=x0, t=t, noise=noise)`, so same-shaped arrays cannot be swapped.
Nothing here owns state or loops over t in Python; everything works under jit/vmap/grad.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from ddpm_jax.schedule import Schedule

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LOSS_WEIGHTS = ("uniform", "min_snr")


def _check(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(allowed)}.")


def extract(a: Array, t: Array, ndim: int) -> Array:
    """Gathers a[t] for t: [B] and reshapes to [B, 1, ..., 1] with `ndim` axes in all."""
    return jnp.take(a, t, axis=0).reshape((t.shape[0],) + (1,) * (ndim - 1))


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------- forward process

def q_mean_variance(schedule: Schedule, *, x0: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I). Returns (mean [B,...],
    variance [B,1,..], log_variance [B,1,..])."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    variance = extract(1.0 - schedule.alphas_cumprod, t, x0.ndim)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, *, x0: Array, t: Array, noise: Array) -> Array:
    """Draws x_t ~ q(x_t | x_0). x0, noise: [B, H, W, C]; t: [B] int, 0-based."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, *, x0: Array, x_t: Array,
                              t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0) = N(mu~, beta~ I). Returns (mean [B,...], variance [B,1,..],
    log_variance_clipped [B,1,..]); at t = 0 the log-variance takes index 1's value."""
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
    variance = extract(schedule.posterior_variance, t, x_t.ndim)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance


# ---------------------------------------------------------------------- parameterizations

def predict_x0_from_eps(schedule: Schedule, *, x_t: Array, t: Array, eps: Array) -> Array:
    """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, *, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def predict_x0_from_xprev(schedule: Schedule, *, x_t: Array, t: Array, xprev: Array) -> Array:
    """Inverts mu~ = coef1 x0 + coef2 x_t for x0, given the posterior mean `xprev`."""
    coef1 = extract(schedule.posterior_mean_coef1, t, x_t.ndim)
    coef2 = extract(schedule.posterior_mean_coef2, t, x_t.ndim)
    return (xprev - coef2 * x_t) / coef1


def v_from_x0_eps(schedule: Schedule, *, x0: Array, t: Array, eps: Array) -> Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: Schedule, *, x_t: Array, t: Array, v: Array) -> Array:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(schedule: Schedule, *, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v)


def score(schedule: Schedule, *, eps: Array, t: Array) -> Array:
    """The score of q(x_t): grad log q(x_t) = -eps / sqrt(1 - abar_t) (= -eps / sigma_t).
    eps: [B, H, W, C] noise prediction; t: [B] int, 0-based. Returns [B, H, W, C]."""
    return -eps / extract(schedule.sqrt_one_minus_alphas_cumprod, t, eps.ndim)


def dynamic_threshold(x0: Array, *, ratio: float) -> Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022) of an x0 prediction [B, H, W, C]:
    s = max(1, the `ratio` quantile of |x0| over each example's pixels); returns
    clip(x0, -s, s) / s, in [-1, 1] (s = 1 is the static clip)."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def split_model_output(*, model_output: Array, var_type: str,
                       channels: int) -> tuple[Array, Array | None]:
    """Splits the network's output [..., C or 2C] into (mean part [..., C], variance part).

    `channels` is the image's C (x_t.shape[-1]). A learned variance needs 2C channels and
    returns (first C, last C). A fixed variance returns (first C, None): the variance channels
    of a learned-variance model sampled with a fixed variance are dropped.
    """
    _check("var_type", var_type, VAR_TYPES)
    got = model_output.shape[-1]
    if var_type in ("learned", "learned_range"):
        if got != 2 * channels:
            raise ValueError(f"var_type {var_type!r} needs a model output of 2C = {2 * channels} "
                             f"channels (mean, variance) for C = {channels}; got {got}.")
        return model_output[..., :channels], model_output[..., channels:]
    if got not in (channels, 2 * channels):
        raise ValueError(f"var_type {var_type!r} needs a model output of C = {channels} channels "
                         f"(or 2C = {2 * channels}, of which the variance half is dropped); "
                         f"got {got}.")
    return model_output[..., :channels], None


def p_mean_variance(schedule: Schedule, *, model_output: Array, x_t: Array, t: Array,
                    mean_type: str, var_type: str, clip_denoised: bool = True) -> dict[str, Array]:
    """Mean and variance of p_theta(x_{t-1} | x_t) from the network's output.

    model_output: [B, H, W, C], or 2C for learned variances (a 2C output with a fixed
    var_type: its variance half is ignored); x_t: [B, H, W, C]; t: [B].
    Returns dict(mean, variance, log_variance, pred_x0), each [B, H, W, C].
    """
    _check("mean_type", mean_type, MEAN_TYPES)
    mean_part, var_part = split_model_output(model_output=model_output, var_type=var_type,
                                             channels=x_t.shape[-1])
    nd = x_t.ndim

    if var_type == "learned":
        log_variance = var_part
    elif var_type == "learned_range":
        min_log = extract(schedule.posterior_log_variance_clipped, t, nd)
        max_log = extract(jnp.log(schedule.betas), t, nd)
        frac = (var_part + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif var_type == "fixedlarge":
        log_variance = extract(schedule.fixedlarge_log_variance, t, nd)
    else:  # fixedsmall
        log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    if var_type == "fixedsmall":
        # exp(clipped log) would give beta~_1 at t = 0; the true variance there is beta~_0 = 0.
        variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, nd), x_t.shape)
    elif var_type == "fixedlarge":
        variance = jnp.broadcast_to(extract(schedule.fixedlarge_variance, t, nd), x_t.shape)
    else:
        variance = jnp.exp(log_variance)

    def maybe_clip(x: Array) -> Array:
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if mean_type == "xprev":
        pred_x0 = maybe_clip(predict_x0_from_xprev(schedule, x_t=x_t, t=t, xprev=mean_part))
        mean = mean_part
    else:
        if mean_type == "eps":
            pred_x0 = predict_x0_from_eps(schedule, x_t=x_t, t=t, eps=mean_part)
        elif mean_type == "v":
            pred_x0 = predict_x0_from_v(schedule, x_t=x_t, t=t, v=mean_part)
        else:  # xstart
            pred_x0 = mean_part
        pred_x0 = maybe_clip(pred_x0)
        mean, _, _ = q_posterior_mean_variance(schedule, x0=pred_x0, x_t=x_t, t=t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)


# ------------------------------------------------------------------------------- likelihoods

def normal_kl(*, mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(*, x: Array, means: Array, log_scales: Array) -> Array:
    """log p(x) of 8-bit data under a Gaussian discretized to 256 bins, elementwise, in nats.

    x: uint8 values rescaled to [-1, 1] (bins of width 2/255, CDF evaluated at x +- 1/255; the
    outermost bins extend to -inf / +inf). Probabilities are clamped at 1e-12 before the log,
    like the official code; unlike it, the exact normal CDF is used, not a tanh approximation.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    floor = math.log(1e-12)
    # log_ndtr for the open edge bins and the mirrored difference in the upper tail keep float32
    # from cancelling 1 - cdf to 0 when the mean is many standard deviations from the pixel.
    log_cdf_plus = jnp.maximum(log_ndtr(plus_in), floor)
    log_one_minus_cdf_min = jnp.maximum(log_ndtr(-min_in), floor)
    cdf_delta = jnp.where(centered > 0, ndtr(-min_in) - ndtr(-plus_in), ndtr(plus_in) - ndtr(min_in))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: Schedule, *, model_output: Array, x0: Array, x_t: Array, t: Array,
                 mean_type: str, var_type: str, clip_denoised: bool) -> tuple[Array, dict]:
    """The bound's term L_t for each example, in bits/dim: [B]. At t = 0 the discretized
    decoder NLL -log p(x_0 | x_1); for t > 0 KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))."""
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0=x0, x_t=x_t, t=t)
    out = p_mean_variance(schedule, model_output=model_output, x_t=x_t, t=t,
                          mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(mean1=true_mean, logvar1=true_log_var, mean2=out["mean"],
                             logvar2=out["log_variance"]))
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x=x0, means=out["mean"], log_scales=0.5 * out["log_variance"]))
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0), out


# ------------------------------------------------------------------------------------ losses

def mse_target(schedule: Schedule, *, x0: Array, x_t: Array, t: Array, noise: Array,
               mean_type: str) -> Array:
    """What the network's mean part regresses on under L_simple for each mean type."""
    _check("mean_type", mean_type, MEAN_TYPES)
    if mean_type == "eps":
        return noise
    if mean_type == "xstart":
        return x0
    if mean_type == "v":
        return v_from_x0_eps(schedule, x0=x0, t=t, eps=noise)
    return q_posterior_mean_variance(schedule, x0=x0, x_t=x_t, t=t)[0]


def snr(schedule: Schedule, *, t: Array) -> Array:
    """The signal-to-noise ratio alphabar_t / (1 - alphabar_t) at 0-based t [B]; float32 [B].
    From sqrt(1 / alphabar_t - 1) (derived in float64), not from float32's 1 - alphabar_t,
    which loses ~1e-4 relative near t = 0."""
    return 1.0 / jnp.square(schedule.sqrt_recipm1_alphas_cumprod[t])


def mse_weight(schedule: Schedule, *, t: Array, mean_type: str, loss_weight: str = "uniform",
               min_snr_gamma: float = 5.0) -> Array:
    """Per-example weight [B] of the regression loss at 0-based t [B].

    "uniform": 1 (L_simple). "min_snr" (Min-SNR-gamma, Hang et al. 2023): the x0 error
    ||x0 - x0_hat||^2 weighted by min(SNR_t, gamma), expressed in what the network predicts.
    Since ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR_t = ||v - v_hat||^2 / (1 + SNR_t), the
    weight is min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) for xstart and
    min(SNR_t, gamma) / (SNR_t + 1) for v. Under eps the noisy steps (SNR_t <= gamma) keep
    L_simple's weight 1 and the nearly clean ones weigh gamma / SNR_t < 1. Not defined for xprev.
    """
    _check("loss_weight", loss_weight, LOSS_WEIGHTS)
    if loss_weight == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    if mean_type == "xprev":
        raise ValueError("loss_weight='min_snr' weighs eps, xstart or v predictions; mean_type "
                         "'xprev' has no such form: use loss_weight='uniform'.")
    ratio = snr(schedule, t=t)
    clipped = jnp.minimum(ratio, min_snr_gamma)
    if mean_type == "eps":
        return clipped / ratio
    if mean_type == "xstart":
        return clipped
    return clipped / (ratio + 1.0)


def training_losses(schedule: Schedule, denoise_fn: DenoiseFn, *, x0: Array, t: Array,
                    noise: Array, mean_type: str = "eps", var_type: str = "fixedlarge",
                    loss_type: str = "mse", hybrid_lambda: float = 1e-3,
                    loss_weight: str = "uniform", min_snr_gamma: float = 5.0) -> dict[str, Array]:
    """Per-example training losses, each [B].

    `mse` is L_simple (the paper's): mean over pixels of ||target - output||^2, times
    `mse_weight` (1 unless loss_weight='min_snr'). `kl` is the bound's term at t in bits/dim
    (never weighted: another loss_weight raises). `hybrid` (improved DDPM) is mse + lambda * T * vb with the mean part
    stop-gradiented inside vb, so only the variance learns from the bound.
    x0, noise: [B, H, W, C] in [-1, 1]; t: [B] int, 0-based.
    """
    _check("loss_type", loss_type, LOSS_TYPES)
    _check("mean_type", mean_type, MEAN_TYPES)
    _check("var_type", var_type, VAR_TYPES)
    _check("loss_weight", loss_weight, LOSS_WEIGHTS)
    x_t = q_sample(schedule, x0=x0, t=t, noise=noise)
    model_output = denoise_fn(x_t, t)
    mean_part, var_part = split_model_output(model_output=model_output, var_type=var_type,
                                             channels=x0.shape[-1])
    terms: dict[str, Array] = {}
    if loss_type == "kl":
        if loss_weight != "uniform":
            raise ValueError(f"loss_weight={loss_weight!r} weighs the regression loss; loss_type "
                             "'kl' trains on the bound: use loss_weight='uniform'.")
        terms["vb"], _ = vb_terms_bpd(schedule, model_output=model_output, x0=x0, x_t=x_t, t=t,
                                      mean_type=mean_type, var_type=var_type, clip_denoised=False)
        terms["loss"] = terms["vb"]
        return terms
    target = mse_target(schedule, x0=x0, x_t=x_t, t=t, noise=noise, mean_type=mean_type)
    terms["mse"] = mean_flat(jnp.square(target - mean_part))
    terms["loss"] = terms["mse"]
    if loss_weight != "uniform":
        terms["loss"] = terms["mse"] * mse_weight(schedule, t=t, mean_type=mean_type,
                                                  loss_weight=loss_weight,
                                                  min_snr_gamma=min_snr_gamma)
    if loss_type == "hybrid":
        if var_part is None:
            raise ValueError("loss_type 'hybrid' learns the variance: set var_type to 'learned' "
                             f"or 'learned_range' (got {var_type!r}).")
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], axis=-1)
        terms["vb"], _ = vb_terms_bpd(schedule, model_output=frozen, x0=x0, x_t=x_t, t=t,
                                      mean_type=mean_type, var_type=var_type, clip_denoised=False)
        terms["loss"] = terms["loss"] + hybrid_lambda * schedule.num_timesteps * terms["vb"]
    return terms


# ---------------------------------------------------------------------------- bits per dim

def prior_bpd(schedule: Schedule, *, x0: Array) -> Array:
    """KL(q(x_T | x_0) || N(0, I)) per example in bits/dim: [B]."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(schedule, x0=x0, t=t)
    kl = normal_kl(mean1=mean, logvar1=jnp.broadcast_to(log_variance, x0.shape), mean2=0.0,
                   logvar2=0.0)
    return mean_flat(kl) / math.log(2.0)


def calc_bpd(schedule: Schedule, denoise_fn: DenoiseFn, *, x0: Array, key: Array,
             mean_type: str = "eps", var_type: str = "fixedlarge",
             clip_denoised: bool = True) -> dict[str, Array]:
    """The full variational bound of a batch in bits/dim (the official `calc_bpd_loop`).

    x0: [B, H, W, C] in [-1, 1] on the 8-bit grid; key: PRNG key (the noise at step t is drawn
    from fold_in(key, t)). Every t in {0..T-1} is evaluated by one `lax.scan`.
    Returns total_bpd [B] = prior_bpd [B] + sum_t terms_bpd[:, t]; terms_bpd, x0_mse and
    eps_mse are [B, T].
    """
    _check("mean_type", mean_type, MEAN_TYPES)
    _check("var_type", var_type, VAR_TYPES)
    batch = x0.shape[0]

    def step(carry, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0=x0, t=t, noise=noise)
        vb, out = vb_terms_bpd(schedule, model_output=denoise_fn(x_t, t), x0=x0, x_t=x_t, t=t,
                               mean_type=mean_type, var_type=var_type,
                               clip_denoised=clip_denoised)
        x0_mse = mean_flat(jnp.square(out["pred_x0"] - x0))
        eps_mse = mean_flat(jnp.square(
            predict_eps_from_x0(schedule, x_t=x_t, t=t, x0=out["pred_x0"]) - noise))
        return carry, (vb, x0_mse, eps_mse)

    timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(step, None, timesteps)
    # The scan runs t = T-1 .. 0; flip so column t holds step t.
    terms = jnp.flip(vb.T, axis=1)
    prior = prior_bpd(schedule, x0=x0)
    return dict(total_bpd=prior + jnp.sum(terms, axis=1), prior_bpd=prior, terms_bpd=terms,
                x0_mse=jnp.flip(x0_mse.T, axis=1), eps_mse=jnp.flip(eps_mse.T, axis=1))
