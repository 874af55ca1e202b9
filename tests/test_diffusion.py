"""diffusion.py against an independent float64 NumPy derivation and against properties.

Expected values come from REFERENCE.md's formulas written out here in float64 NumPy (and SciPy's
exact normal CDF), never from `ddpm_jax.diffusion`. Inputs are float32 so that the only
difference between code and reference is the code's float32 arithmetic. `Schedule.from_betas`
is the only library call used to build inputs; its tables are checked in test_schedule.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ddpm_jax import diffusion as D
from ddpm_jax.schedule import Schedule

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOG2 = math.log(2.0)

# --------------------------------------------------------------------------- float64 reference


def linear_betas(T):
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


def cosine_betas(T, s=0.008):
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


BETAS = {
    "linear2": lambda: linear_betas(2),
    "linear10": lambda: linear_betas(10),
    "cosine50": lambda: cosine_betas(50),
    "linear1000": lambda: linear_betas(1000),
}


@functools.cache
def setup(name):
    """(Schedule under test, float64 reference tables) for a named beta schedule."""
    betas = BETAS[name]()
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    fixedlarge = np.append(post_var[1], betas[1:])
    tb = {
        "betas": betas,
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "post_var": post_var,
        "post_logvar_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "coef1": np.sqrt(abar_prev) * betas / (1 - abar),
        "coef2": np.sqrt(alphas) * (1 - abar_prev) / (1 - abar),
        "fixedlarge": fixedlarge,
        "fixedlarge_log": np.log(fixedlarge),
    }
    return Schedule.from_betas(betas), tb


def g(tb, key, t):
    """Gathers a [T] table at t [B] as [B, 1, 1, 1]."""
    return tb[key][np.asarray(t)].reshape(-1, 1, 1, 1)


def mean_flat64(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


def ref_q_mean_variance(tb, x0, t):
    abar = g(tb, "abar", t)
    return np.sqrt(abar) * x0, 1 - abar, np.log(1 - abar)


def ref_q_sample(tb, x0, t, noise):
    abar = g(tb, "abar", t)
    return np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise


def ref_posterior(tb, x0, x_t, t):
    mean = g(tb, "coef1", t) * x0 + g(tb, "coef2", t) * x_t
    return mean, g(tb, "post_var", t), g(tb, "post_logvar_clipped", t)


def ref_x0_from_eps(tb, x_t, t, eps):
    abar = g(tb, "abar", t)
    return np.sqrt(1 / abar) * x_t - np.sqrt(1 / abar - 1) * eps


def ref_eps_from_x0(tb, x_t, t, x0):
    abar = g(tb, "abar", t)
    return (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar)


def ref_x0_from_xprev(tb, x_t, t, xprev):
    # Invert mu~ = coef1 x0 + coef2 x_t for x0.
    return (xprev - g(tb, "coef2", t) * x_t) / g(tb, "coef1", t)


def ref_v(tb, x0, t, eps):
    abar = g(tb, "abar", t)
    return np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0


def ref_x0_from_v(tb, x_t, t, v):
    abar = g(tb, "abar", t)
    return np.sqrt(abar) * x_t - np.sqrt(1 - abar) * v


def ref_eps_from_v(tb, x_t, t, v):
    abar = g(tb, "abar", t)
    return np.sqrt(1 - abar) * x_t + np.sqrt(abar) * v


def ref_p_mean_variance(tb, out, x_t, t, mean_type, var_type, clip):
    C = x_t.shape[-1]
    if var_type in ("learned", "learned_range"):
        out, var_out = out[..., :C], out[..., C:]
        if var_type == "learned":
            logvar = var_out
        else:
            frac = (var_out + 1) / 2
            logvar = frac * np.log(g(tb, "betas", t)) + (1 - frac) * g(tb, "post_logvar_clipped", t)
        var = np.exp(logvar)
    elif var_type == "fixedlarge":
        var, logvar = g(tb, "fixedlarge", t), g(tb, "fixedlarge_log", t)
    else:
        var, logvar = g(tb, "post_var", t), g(tb, "post_logvar_clipped", t)
    maybe_clip = (lambda x: np.clip(x, -1, 1)) if clip else (lambda x: x)
    if mean_type == "xprev":
        mean, pred_x0 = out, maybe_clip(ref_x0_from_xprev(tb, x_t, t, out))
    else:
        pred_x0 = maybe_clip(
            {"eps": ref_x0_from_eps, "xstart": lambda tb, x_t, t, o: o, "v": ref_x0_from_v}[
                mean_type
            ](tb, x_t, t, out)
        )
        mean = ref_posterior(tb, pred_x0, x_t, t)[0]
    shape = x_t.shape
    return {
        "mean": mean,
        "variance": np.broadcast_to(var, shape),
        "log_variance": np.broadcast_to(logvar, shape),
        "pred_x0": pred_x0,
    }


def ref_normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def ref_discretized_ll(x, means, log_scales):
    x, means, log_scales = np.broadcast_arrays(x, means, log_scales)
    std = np.exp(log_scales)
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    # Bin probability as the difference of the smaller tails (exact in float64 for far bins).
    z_hi, z_lo = (upper - means) / std, (lower - means) / std
    prob = np.where(z_lo > 0, norm.sf(z_lo) - norm.sf(z_hi), norm.cdf(z_hi) - norm.cdf(z_lo))
    return np.log(np.maximum(prob, 1e-12))


def ref_vb_bpd(tb, out, x0, x_t, t, mean_type, var_type, clip=False):
    pm = ref_p_mean_variance(tb, out, x_t, t, mean_type, var_type, clip)
    true_mean, _, true_logvar = ref_posterior(tb, x0, x_t, t)
    kl = mean_flat64(ref_normal_kl(true_mean, true_logvar, pm["mean"], pm["log_variance"])) / LOG2
    nll = -mean_flat64(ref_discretized_ll(x0, pm["mean"], 0.5 * pm["log_variance"])) / LOG2
    return np.where(np.asarray(t) == 0, nll, kl), pm


# --------------------------------------------------------------------------- helpers

CASES = [  # (schedule, image shape): t always includes 0, a middle step and T-1
    ("linear2", (3, 2, 2, 1)),
    ("linear10", (3, 4, 4, 2)),
    ("cosine50", (3, 2, 3, 1)),
    ("linear1000", (3, 4, 4, 2)),
]


def steps(sched):
    T = sched.num_timesteps
    return np.array([0, T // 2, T - 1], np.int32)


def f32(rng, shape, low=None, high=None):
    if low is None:
        return rng.standard_normal(shape).astype(np.float32)
    return rng.uniform(low, high, shape).astype(np.float32)


def on_grid(rng, shape):
    """Images on the 256-level data grid, including both edges."""
    k = rng.integers(0, 256, shape)
    k.flat[0], k.flat[-1] = 0, 255
    return (k / 127.5 - 1).astype(np.float32)


def f64(x):
    return np.asarray(x, np.float64)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, scaled=True):
    """float32 vs float64: atol grows with the array's magnitude (float32 cancellation)."""
    expected = f64(expected)
    actual = f64(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scaled:
        atol = atol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("name,shape", CASES)
def test_q_mean_variance_and_q_sample(name, shape):
    sched, tb = setup(name)
    rng = np.random.default_rng(0)
    x0, noise, t = f32(rng, shape, -1, 1), f32(rng, shape), steps(sched)
    mean, var, logvar = D.q_mean_variance(sched, x0=x0, t=t)
    ref_mean, ref_var, ref_logvar = ref_q_mean_variance(tb, f64(x0), t)
    assert_close(mean, ref_mean)
    assert_close(jnp.broadcast_to(var, shape), np.broadcast_to(ref_var, shape))
    assert_close(jnp.broadcast_to(logvar, shape), np.broadcast_to(ref_logvar, shape))
    x_t = D.q_sample(sched, x0=x0, t=t, noise=noise)
    assert x_t.shape == shape and x_t.dtype == jnp.float32
    assert_close(x_t, ref_q_sample(tb, f64(x0), t, f64(noise)))


def test_q_sample_moments_from_many_draws():
    sched, tb = setup("linear1000")
    n = 100_000
    x0_img = np.array([-1.0, -0.3, 0.5, 1.0], np.float32).reshape(1, 2, 2, 1)
    ts = np.array([0, 499, 999], np.int32)
    t = np.repeat(ts, n)
    x0 = np.broadcast_to(x0_img, (3 * n, 2, 2, 1))
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = np.asarray(D.q_sample(sched, x0=x0, t=t, noise=noise), np.float64).reshape(3, n, 2, 2, 1)
    for i, step in enumerate(ts):
        abar = tb["abar"][step]
        samples = x_t[i]
        expected_var = 1 - abar
        np.testing.assert_array_less(
            np.abs(samples.mean(0) - np.sqrt(abar) * x0_img[0]), 5 * np.sqrt(expected_var / n)
        )
        np.testing.assert_array_less(
            np.abs(samples.var(0) - expected_var), 5 * expected_var * np.sqrt(2 / n)
        )


# --------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("name,shape", CASES)
def test_q_posterior_mean_variance(name, shape):
    sched, tb = setup(name)
    rng = np.random.default_rng(1)
    x0, x_t, t = f32(rng, shape, -1, 1), f32(rng, shape), steps(sched)
    mean, var, logvar = D.q_posterior_mean_variance(sched, x0=x0, x_t=x_t, t=t)
    ref_mean, ref_var, ref_logvar = ref_posterior(tb, f64(x0), f64(x_t), t)
    assert_close(mean, ref_mean)
    assert_close(jnp.broadcast_to(var, shape), np.broadcast_to(ref_var, shape), atol=1e-9)
    assert_close(jnp.broadcast_to(logvar, shape), np.broadcast_to(ref_logvar, shape))


@pytest.mark.parametrize("name", ["linear10", "cosine50", "linear1000"])
def test_posterior_matches_bayes_rule_analytically(name):
    # q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0,
    # 1 - abar_{t-1}): a product of Gaussians in x_{t-1}, so precisions add.
    sched, tb = setup(name)
    T = sched.num_timesteps
    t = np.arange(1, T, dtype=np.int32)
    rng = np.random.default_rng(2)
    x0, x_t = f32(rng, (T - 1, 1, 1, 1), -1, 1), f32(rng, (T - 1, 1, 1, 1))
    mean, var, _ = D.q_posterior_mean_variance(sched, x0=x0, x_t=x_t, t=t)
    alpha, beta = g(tb, "alphas", t), g(tb, "betas", t)
    abar_prev = g(tb, "abar_prev", t)
    precision = alpha / beta + 1 / (1 - abar_prev)
    bayes_mean = (
        np.sqrt(alpha) * f64(x_t) / beta + np.sqrt(abar_prev) * f64(x0) / (1 - abar_prev)
    ) / precision
    assert_close(mean, bayes_mean)
    assert_close(jnp.broadcast_to(var, mean.shape), 1 / precision, atol=0, scaled=False)


def test_posterior_matches_bayes_rule_on_a_grid():
    # The same product, normalised numerically on a dense 1-D grid in float64.
    cases = [("linear10", 1), ("linear10", 5), ("linear10", 9), ("cosine50", 1), ("cosine50", 49)]
    grid = np.linspace(-8, 8, 1_600_001)
    dx = grid[1] - grid[0]
    for i, (name, step) in enumerate(cases):
        sched, tb = setup(name)
        rng = np.random.default_rng(10 + i)
        x0 = np.float32(rng.uniform(-1, 1))
        x_t = np.float32(rng.standard_normal())
        alpha, beta, abar_prev = tb["alphas"][step], tb["betas"][step], tb["abar_prev"][step]
        log_p = -0.5 * (f64(x_t) - np.sqrt(alpha) * grid) ** 2 / beta
        log_p += -0.5 * (grid - np.sqrt(abar_prev) * f64(x0)) ** 2 / (1 - abar_prev)
        p = np.exp(log_p - log_p.max())
        p /= p.sum() * dx
        grid_mean = np.sum(grid * p) * dx
        grid_var = np.sum((grid - grid_mean) ** 2 * p) * dx
        mean, var, _ = D.q_posterior_mean_variance(
            sched, x0=jnp.full((1, 1, 1, 1), x0), x_t=jnp.full((1, 1, 1, 1), x_t),
            t=jnp.array([step]),
        )
        np.testing.assert_allclose(float(mean.reshape(())), grid_mean, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(float(jnp.reshape(var, -1)[0]), grid_var, rtol=1e-4)


def test_posterior_at_first_step_is_x0():
    sched, _ = setup("linear10")
    rng = np.random.default_rng(3)
    x0, x_t = f32(rng, (2, 2, 2, 1), -1, 1), f32(rng, (2, 2, 2, 1))
    mean, var, logvar = D.q_posterior_mean_variance(
        sched, x0=x0, x_t=x_t, t=jnp.zeros(2, jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(mean), x0, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(var) == 0)
    assert np.all(np.isfinite(np.asarray(logvar)))


# --------------------------------------------------------------------------- parameterizations


@pytest.mark.parametrize("name,shape", CASES)
def test_predictions_match_reference(name, shape):
    sched, tb = setup(name)
    rng = np.random.default_rng(4)
    x0, x_t, eps, t = f32(rng, shape, -1, 1), f32(rng, shape), f32(rng, shape), steps(sched)
    a, b, c = f64(x0), f64(x_t), f64(eps)
    assert_close(D.predict_x0_from_eps(sched, x_t=x_t, t=t, eps=eps), ref_x0_from_eps(tb, b, t, c))
    assert_close(D.predict_eps_from_x0(sched, x_t=x_t, t=t, x0=x0), ref_eps_from_x0(tb, b, t, a))
    assert_close(D.predict_x0_from_xprev(sched, x_t=x_t, t=t, xprev=eps), ref_x0_from_xprev(tb, b, t, c))
    assert_close(D.v_from_x0_eps(sched, x0=x0, t=t, eps=eps), ref_v(tb, a, t, c))
    assert_close(D.predict_x0_from_v(sched, x_t=x_t, t=t, v=eps), ref_x0_from_v(tb, b, t, c))
    assert_close(D.predict_eps_from_v(sched, x_t=x_t, t=t, v=eps), ref_eps_from_v(tb, b, t, c))


@pytest.mark.parametrize("name", ["linear10", "cosine50"])
def test_parameterizations_round_trip(name):
    # x_t = sqrt(abar) x0 + sqrt(1-abar) eps; each prediction recovers the quantity it targets.
    sched, _ = setup(name)
    T = sched.num_timesteps
    rng = np.random.default_rng(5)
    shape = (T, 2, 2, 1)
    t = np.arange(T, dtype=np.int32)
    x0, eps = f32(rng, shape, -1, 1), f32(rng, shape)
    x_t = D.q_sample(sched, x0=x0, t=t, noise=eps)
    v = D.v_from_x0_eps(sched, x0=x0, t=t, eps=eps)
    tol = {"rtol": 1e-4, "atol": 2e-4}
    np.testing.assert_allclose(D.predict_x0_from_eps(sched, x_t=x_t, t=t, eps=eps), x0, **tol)
    np.testing.assert_allclose(D.predict_eps_from_x0(sched, x_t=x_t, t=t, x0=x0), eps, **tol)
    np.testing.assert_allclose(D.predict_x0_from_v(sched, x_t=x_t, t=t, v=v), x0, **tol)
    np.testing.assert_allclose(D.predict_eps_from_v(sched, x_t=x_t, t=t, v=v), eps, **tol)
    xprev, _, _ = D.q_posterior_mean_variance(sched, x0=x0, x_t=x_t, t=t)
    np.testing.assert_allclose(D.predict_x0_from_xprev(sched, x_t=x_t, t=t, xprev=xprev), x0, **tol)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("name,shape", [CASES[1], CASES[3]])
def test_p_mean_variance_matches_reference(name, shape, mean_type, var_type, clip):
    sched, tb = setup(name)
    rng = np.random.default_rng(6)
    t = steps(sched)
    x_t = f32(rng, shape)
    out = f32(rng, shape)
    if var_type == "learned":
        out = np.concatenate([out, f32(rng, shape) - 4], axis=-1)
    elif var_type == "learned_range":
        out = np.concatenate([out, f32(rng, shape, -1, 1)], axis=-1)
    got = D.p_mean_variance(
        sched, model_output=out, x_t=x_t, t=t, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip,
    )
    ref = ref_p_mean_variance(tb, f64(out), f64(x_t), t, mean_type, var_type, clip)
    assert set(got) >= {"mean", "variance", "log_variance", "pred_x0"}
    for key in ("mean", "variance", "log_variance", "pred_x0"):
        assert got[key].shape == shape, key
        assert_close(got[key], ref[key], atol=1e-6 if key != "variance" else 1e-9)
    if clip:
        assert np.all(np.abs(np.asarray(got["pred_x0"])) <= 1)


def test_p_mean_variance_with_optimal_eps_recovers_true_posterior():
    # Feeding the true noise as eps_theta gives pred_x0 = x0, so the model mean is mu~.
    sched, tb = setup("linear10")
    rng = np.random.default_rng(7)
    shape, t = (3, 4, 4, 2), steps(sched)
    x0, eps = f32(rng, shape, -1, 1), f32(rng, shape)
    x_t = D.q_sample(sched, x0=x0, t=t, noise=eps)
    got = D.p_mean_variance(
        sched, model_output=eps, x_t=x_t, t=t, mean_type="eps", var_type="fixedsmall"
    )
    true_mean, _, _ = ref_posterior(tb, f64(x0), f64(x_t), t)
    np.testing.assert_allclose(got["pred_x0"], x0, atol=2e-5)
    np.testing.assert_allclose(got["mean"], true_mean, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"mean_type": "epsilon", "var_type": "fixedlarge"}, {"mean_type": "eps", "var_type": "large"}],
)
def test_p_mean_variance_bad_types_raise(kwargs):
    sched, _ = setup("linear10")
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError):
        D.p_mean_variance(sched, model_output=x, x_t=x, t=jnp.zeros(1, jnp.int32), **kwargs)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_p_mean_variance_fixed_variance_drops_learned_variance_channels(
    channels, mean_type, var_type
):
    # A learned-variance model (2C output channels) sampled with a fixed variance: the variance
    # half is ignored, so everything equals the reference fed the first C channels alone.
    sched, tb = setup("linear10")
    rng = np.random.default_rng(20)
    shape, t = (3, 2, 3, channels), steps(sched)
    x_t, mean_out = f32(rng, shape), f32(rng, shape)
    out = np.concatenate([mean_out, f32(rng, shape, -1, 1)], axis=-1)
    got = D.p_mean_variance(
        sched, model_output=out, x_t=x_t, t=t, mean_type=mean_type, var_type=var_type
    )
    ref = ref_p_mean_variance(tb, f64(mean_out), f64(x_t), t, mean_type, var_type, True)
    for key in ("mean", "variance", "log_variance", "pred_x0"):
        assert got[key].shape == shape, key
        assert_close(got[key], ref[key], atol=1e-6 if key != "variance" else 1e-9)


@pytest.mark.parametrize(
    "var_type,out_channels",
    [("learned", 2), ("learned_range", 3), ("fixedlarge", 9), ("fixedsmall", 4)],
)
def test_p_mean_variance_wrong_output_channels_raise(var_type, out_channels):
    # C = 3: a learned variance needs exactly 6 channels, a fixed one 3 or 6.
    sched, _ = setup("linear10")
    x_t = jnp.zeros((1, 2, 2, 3))
    out = jnp.zeros((1, 2, 2, out_channels))
    with pytest.raises(ValueError, match="channels"):
        D.p_mean_variance(
            sched, model_output=out, x_t=x_t, t=jnp.zeros(1, jnp.int32), mean_type="eps",
            var_type=var_type,
        )


# --------------------------------------------------------------------------- KL and likelihood


def test_normal_kl_matches_closed_form_and_is_zero_for_equal_gaussians():
    rng = np.random.default_rng(8)
    shape = (3, 4, 4, 2)
    m1, m2 = f32(rng, shape), f32(rng, shape)
    lv1, lv2 = f32(rng, shape, -5, 1), f32(rng, shape, -5, 1)
    assert_close(D.normal_kl(mean1=m1, logvar1=lv1, mean2=m2, logvar2=lv2), ref_normal_kl(f64(m1), f64(lv1), f64(m2), f64(lv2)))
    np.testing.assert_allclose(D.normal_kl(mean1=m1, logvar1=lv1, mean2=m1, logvar2=lv1), 0, atol=1e-6)
    assert np.all(np.asarray(D.normal_kl(mean1=m1, logvar1=lv1, mean2=m2, logvar2=lv2)) >= -1e-6)
    # Closed form written the textbook way: log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2.
    s1, s2 = np.exp(0.5 * f64(lv1)), np.exp(0.5 * f64(lv2))
    textbook = np.log(s2 / s1) + (s1**2 + (f64(m1) - f64(m2)) ** 2) / (2 * s2**2) - 0.5
    assert_close(D.normal_kl(mean1=m1, logvar1=lv1, mean2=m2, logvar2=lv2), textbook)


def test_normal_kl_monte_carlo():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    rng = np.random.default_rng(9)
    x = m1 + math.exp(0.5 * lv1) * rng.standard_normal(400_000)
    log_ratio = norm.logpdf(x, m1, math.exp(0.5 * lv1)) - norm.logpdf(x, m2, math.exp(0.5 * lv2))
    kl = float(D.normal_kl(mean1=jnp.float32(m1), logvar1=jnp.float32(lv1),
                           mean2=jnp.float32(m2), logvar2=jnp.float32(lv2)))
    stderr = log_ratio.std() / math.sqrt(x.size)
    assert abs(kl - log_ratio.mean()) < 5 * stderr


def test_discretized_likelihood_matches_scipy_reference():
    rng = np.random.default_rng(11)
    shape = (3, 8, 8, 2)
    x = on_grid(rng, shape)
    means = f32(rng, shape, -1.1, 1.1)
    log_scales = f32(rng, shape, math.log(0.003), math.log(0.5))
    # Put some means right on their pixel so that most bins have sizeable mass.
    means[0] = x[0]
    got = np.asarray(D.discretized_gaussian_log_likelihood(x=x, means=means, log_scales=log_scales))
    ref = ref_discretized_ll(f64(x), f64(means), f64(log_scales))
    assert got.shape == shape
    np.testing.assert_allclose(np.exp(got), np.exp(ref), atol=1e-5)
    big = np.exp(ref) > 0.02
    assert big.sum() > 50
    np.testing.assert_allclose(got[big], ref[big], atol=5e-4)
    assert np.all(got <= 1e-6)


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    levels = (np.arange(256) / 127.5 - 1).astype(np.float32).reshape(1, 16, 16, 1)
    params = [(0.0, 0.1), (0.95, 0.05), (-1.0, 0.5), (0.3, 0.002), (1.4, 0.3), (-0.2, 3.0)]
    x = np.broadcast_to(levels, (len(params), 16, 16, 1))
    means = np.broadcast_to(
        np.array([m for m, _ in params], np.float32).reshape(-1, 1, 1, 1), x.shape
    )
    log_scales = np.broadcast_to(
        np.log(np.array([s for _, s in params], np.float32)).reshape(-1, 1, 1, 1), x.shape
    )
    logp = D.discretized_gaussian_log_likelihood(x=x, means=means, log_scales=log_scales)
    total = np.exp(np.asarray(logp, np.float64)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(total, 1.0, atol=1e-4)


def test_discretized_likelihood_edges_and_clamp():
    # Edge bins take the whole tail; far-away bins are clamped at log(1e-12).
    x = np.array([-1.0, 1.0, 0.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    means = np.array([-3.0, 3.0, 0.9, 0.0], np.float32).reshape(1, 2, 2, 1)
    log_scales = np.log(np.array([0.5, 0.5, 0.01, 1e-4], np.float32)).reshape(1, 2, 2, 1)
    got = np.asarray(
        D.discretized_gaussian_log_likelihood(x=x, means=means, log_scales=log_scales)
    ).ravel()
    np.testing.assert_allclose(got[:2], math.log(norm.cdf((-1 + 1 / 255 + 3.0) / 0.5)), atol=1e-6)
    np.testing.assert_allclose(got[2], math.log(1e-12), rtol=1e-4)
    # Mean on the pixel, tiny scale: nearly all mass is in the bin.
    np.testing.assert_allclose(got[3], 0.0, atol=1e-6)


def test_mean_flat():
    x = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)
    np.testing.assert_allclose(D.mean_flat(x), x.reshape(3, -1).mean(1), rtol=1e-6)
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_allclose(D.mean_flat(y), [0.5, 2.5, 4.5])


# --------------------------------------------------------------------------- training losses


def near_optimal_denoiser(tb, x0, mean_type, var_type, params, record=None):
    """The posterior-optimal output for data = {x0} plus a small learnable error.

    Close to optimal so the decoder likelihood at t = 0 stays far from the 1e-12 clamp; the
    error `w_mean * scale * x_t` makes the mse and the KL non-zero. `tb`: this file's tables as
    float32 jnp arrays. `record`, when given, receives the x_t and output of an eager call.
    """

    def fn(x_t, t):
        if record is not None:
            record["x_t"] = x_t
        gather = lambda key: tb[key][t].reshape(-1, 1, 1, 1)
        sa, s1 = jnp.sqrt(gather("abar")), jnp.sqrt(1 - gather("abar"))
        eps = (x_t - sa * x0) / s1
        target = {
            "eps": eps,
            "xstart": x0 + 0 * x_t,
            "xprev": gather("coef1") * x0 + gather("coef2") * x_t,
            "v": sa * eps - s1 * x0,
        }[mean_type]
        scale = 0.1 if mean_type in ("eps", "v") else 0.1 * s1
        out = target + params["w_mean"] * scale * x_t
        if var_type == "learned":
            out = jnp.concatenate([out, gather("fixedlarge_log") + params["w_var"] * 0.1 * x_t], -1)
        elif var_type == "learned_range":
            out = jnp.concatenate([out, jnp.tanh(params["w_var"] * x_t)], -1)
        if record is not None:
            record["out"] = out
        return out

    return fn


def jnp_tables(tb):
    return {k: jnp.asarray(v, jnp.float32) for k, v in tb.items()}


def ref_training_losses(tb, x0, x_t, t, noise, out, mean_type, var_type, loss_type, lam):
    C = x0.shape[-1]
    T = len(tb["betas"])
    target = {
        "eps": noise,
        "xstart": x0,
        "xprev": ref_posterior(tb, x0, x_t, t)[0],
        "v": ref_v(tb, x0, t, noise),
    }[mean_type]
    mse = mean_flat64((target - out[..., :C]) ** 2)
    vb, _ = ref_vb_bpd(tb, out, x0, x_t, t, mean_type, var_type)
    loss = {"mse": mse, "kl": vb, "hybrid": mse + lam * T * vb}[loss_type]
    return {"loss": loss, "mse": mse, "vb": vb}


LOSS_CASES = (
    [("mse", m, v) for m in MEAN_TYPES for v in VAR_TYPES]
    + [("kl", m, v) for m in MEAN_TYPES for v in VAR_TYPES]
    # hybrid exists to train a learned variance; the code rejects it with a fixed one.
    + [("hybrid", m, v) for m in MEAN_TYPES for v in ("learned", "learned_range")]
)


# Every combination on one schedule; the bound's combinations again on a second.
REFERENCE_LOSS_CASES = (
    [("linear10",) + c for c in LOSS_CASES]
    + [("cosine50", "kl", m, v) for m in MEAN_TYPES for v in ("fixedlarge", "learned_range")]
    + [("cosine50", "hybrid", "v", "learned")]
)
# A representative subset for the (slower) gradient checks: each type of each kind at least once.
GRAD_CASES = (
    [("mse", "eps", "fixedlarge"), ("mse", "xprev", "fixedsmall")]
    + [("kl", m, "learned_range") for m in MEAN_TYPES]
    + [
        ("kl", "eps", "fixedsmall"),
        ("hybrid", "v", "learned"),
        ("hybrid", "xstart", "learned_range"),
    ]
)


@pytest.mark.parametrize("name,loss_type,mean_type,var_type", REFERENCE_LOSS_CASES)
def test_training_losses_match_reference(name, loss_type, mean_type, var_type):
    sched, tb = setup(name)
    rng = np.random.default_rng(12)
    shape, t = (3, 4, 4, 2), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    params = {"w_mean": 0.7, "w_var": 0.5}
    record = {}
    fn = near_optimal_denoiser(jnp_tables(tb), jnp.asarray(x0), mean_type, var_type, params, record)
    got = D.training_losses(
        sched, fn, x0=x0, t=t, noise=noise, mean_type=mean_type, var_type=var_type,
        loss_type=loss_type,
    )
    # The loss math is checked on the exact x_t and model output the code produced.
    x_t, out = f64(record["x_t"]), f64(record["out"])
    assert_close(x_t, ref_q_sample(tb, f64(x0), t, f64(noise)))
    ref = ref_training_losses(
        tb, f64(x0), x_t, t, f64(noise), out, mean_type, var_type, loss_type, 1e-3
    )
    expected_keys = (
        {"loss"}
        | ({"mse"} if loss_type != "kl" else set())
        | ({"vb"} if loss_type != "mse" else set())
    )
    assert set(got) >= expected_keys
    for key in expected_keys:
        assert got[key].shape == (3,), key
        assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, scaled=False)


def test_training_losses_mse_hand_formula():
    # L_simple = mean over pixels of (eps - eps_theta)^2 for an arbitrary model.
    sched, tb = setup("linear1000")
    rng = np.random.default_rng(13)
    shape = (3, 4, 4, 2)
    x0, noise, t = on_grid(rng, shape), f32(rng, shape), np.array([0, 17, 999], np.int32)
    got = D.training_losses(sched, lambda x, t: 0.5 * x, x0=x0, t=t, noise=noise)
    x_t = ref_q_sample(tb, f64(x0), t, f64(noise))
    np.testing.assert_allclose(got["mse"], mean_flat64((f64(noise) - 0.5 * x_t) ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["loss"], got["mse"])


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "v"])
def test_min_snr_weight_is_the_x0_error_weighted_by_min_snr_gamma(mean_type):
    # Independent of the weight formulas: for any output, weight * ||target - output||^2 equals
    # min(SNR_t, gamma) * ||x0 - x0_hat||^2, x0_hat the output's x0 prediction, all in float64.
    sched, tb = setup("linear1000")
    rng = np.random.default_rng(5)
    shape, gamma = (6, 3, 3, 1), 5.0
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    t = np.array([0, 3, 40, 120, 500, 999], np.int32)
    out = f32(rng, shape)
    got = D.training_losses(sched, lambda x, t: out, x0=x0, t=t, noise=noise, mean_type=mean_type,
                            loss_weight="min_snr", min_snr_gamma=gamma)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t][:, None, None, None]
    x_t = np.sqrt(abar) * f64(x0) + np.sqrt(1 - abar) * f64(noise)
    x0_hat = {"eps": (x_t - np.sqrt(1 - abar) * f64(out)) / np.sqrt(abar),
              "xstart": f64(out),
              "v": np.sqrt(abar) * x_t - np.sqrt(1 - abar) * f64(out)}[mean_type]
    snr = abar[:, 0, 0, 0] / (1 - abar[:, 0, 0, 0])
    assert snr.min() < gamma < snr.max()
    expected = np.minimum(snr, gamma) * mean_flat64((f64(x0) - x0_hat) ** 2)
    np.testing.assert_allclose(got["loss"], expected, rtol=2e-4)
    # mse stays the unweighted L_simple term; uniform weighting leaves loss == mse.
    plain = D.training_losses(sched, lambda x, t: out, x0=x0, t=t, noise=noise, mean_type=mean_type)
    np.testing.assert_allclose(got["mse"], plain["mse"], rtol=1e-6)
    np.testing.assert_allclose(plain["loss"], plain["mse"])


def test_min_snr_weight_under_eps_is_one_on_the_noisy_steps_and_refuses_xprev():
    sched, _ = setup("linear1000")
    t = np.arange(1000, dtype=np.int32)
    w = np.asarray(D.mse_weight(sched, t=t, mean_type="eps", loss_weight="min_snr", min_snr_gamma=5.0))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    snr = abar / (1 - abar)
    np.testing.assert_allclose(w[snr <= 5.0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-4)
    assert w[0] < 1e-3 and (np.diff(w) >= -1e-7).all()   # grows with t, up to 1
    with pytest.raises(ValueError, match="mean_type 'xprev' has no such form"):
        D.mse_weight(sched, t=t, mean_type="xprev", loss_weight="min_snr")
    zeros = np.zeros((1, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="loss_type 'kl' trains on the bound"):
        D.training_losses(sched, lambda x, t: x, x0=zeros, t=np.zeros(1, np.int32), noise=zeros,
                          loss_type="kl", loss_weight="min_snr")
    with pytest.raises(ValueError, match="Unknown loss_weight 'p2'"):
        D.training_losses(sched, lambda x, t: x, x0=np.zeros((1, 2, 2, 1), np.float32),
                          t=np.zeros(1, np.int32), noise=np.zeros((1, 2, 2, 1), np.float32),
                          loss_weight="p2")


@pytest.mark.parametrize(
    "loss_type,mean_type,var_type", [("mse", "eps", "fixedlarge"), ("kl", "v", "fixedsmall")]
)
def test_training_losses_fixed_variance_ignores_variance_channels(loss_type, mean_type, var_type):
    # C = 1 and a 2C output: before the variance half was dropped, (target - output) broadcast
    # [B,H,W,1] against [B,H,W,2] and ran silently wrong.
    sched, tb = setup("linear10")
    rng = np.random.default_rng(21)
    shape, t = (3, 2, 2, 1), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    record = {}

    def fn(x, t):
        record["x_t"] = x
        return jnp.concatenate([0.5 * x, 3.0 + x], -1)

    got = D.training_losses(
        sched, fn, x0=x0, t=t, noise=noise, mean_type=mean_type, var_type=var_type,
        loss_type=loss_type,
    )
    x_t = ref_q_sample(tb, f64(x0), t, f64(noise))
    assert_close(record["x_t"], x_t)
    ref = ref_training_losses(
        tb, f64(x0), x_t, t, f64(noise), 0.5 * f64(record["x_t"]), mean_type, var_type,
        loss_type, 1e-3,
    )
    assert got["loss"].shape == (3,)
    assert_close(got["loss"], ref["loss"], rtol=1e-4, atol=1e-5, scaled=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,mean_type,var_type", GRAD_CASES)
def test_training_losses_gradients_are_finite(loss_type, mean_type, var_type):
    sched, tb = setup("linear10")
    rng = np.random.default_rng(14)
    shape, t = (3, 2, 2, 1), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    tbj = jnp_tables(tb)

    def loss(params):
        fn = near_optimal_denoiser(tbj, x0, mean_type, var_type, params)
        return D.training_losses(
            sched, fn, x0=x0, t=t, noise=noise, mean_type=mean_type, var_type=var_type,
            loss_type=loss_type,
        )["loss"].mean()

    grads = jax.jit(jax.grad(loss))({"w_mean": 0.7, "w_var": 0.5})
    assert all(np.isfinite(float(v)) for v in grads.values())
    assert float(grads["w_mean"]) != 0


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_training_losses_mse_gradient_matches_hand_derivative(mean_type):
    # mse = mean((target - out)^2) with out = target_hat + w * p(x_t):
    # dmse/dw = 2 mean(p (out - target)).
    sched, tb = setup("linear10")
    rng = np.random.default_rng(15)
    shape, t = (3, 4, 4, 2), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    tbj, w = jnp_tables(tb), 0.7

    def mse(w_mean, record=None):
        fn = near_optimal_denoiser(tbj, x0, mean_type, "fixedlarge", {"w_mean": w_mean}, record)
        return D.training_losses(sched, fn, x0=x0, t=t, noise=noise, mean_type=mean_type)["mse"]

    record = {}
    mse(w, record)
    x_t, out = f64(record["x_t"]), f64(record["out"])
    target = {
        "eps": f64(noise),
        "xstart": f64(x0),
        "xprev": ref_posterior(tb, f64(x0), x_t, t)[0],
        "v": ref_v(tb, f64(x0), t, f64(noise)),
    }[mean_type]
    scale = 0.1 if mean_type in ("eps", "v") else 0.1 * np.sqrt(1 - g(tb, "abar", t))
    expected = 2 * mean_flat64(scale * x_t * (out - target))
    got = jax.jacrev(mse)(jnp.float32(w))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_hybrid_vb_trains_only_the_variance(var_type):
    sched, tb = setup("linear10")
    rng = np.random.default_rng(16)
    shape, t = (3, 2, 2, 1), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    tbj, params = jnp_tables(tb), {"w_mean": 0.7, "w_var": 0.5}

    def terms(params, loss_type):
        fn = near_optimal_denoiser(tbj, x0, "eps", var_type, params)
        out = D.training_losses(
            sched, fn, x0=x0, t=t, noise=noise, var_type=var_type, loss_type=loss_type
        )
        return {k: v.sum() for k, v in out.items()}

    def grad_of(key, loss_type):
        return jax.grad(lambda p: terms(p, loss_type)[key])(params)

    vb_grad = grad_of("vb", "hybrid")
    assert float(vb_grad["w_mean"]) == 0.0
    assert abs(float(vb_grad["w_var"])) > 1e-4
    loss_grad, mse_grad = grad_of("loss", "hybrid"), grad_of("mse", "hybrid")
    np.testing.assert_allclose(float(loss_grad["w_mean"]), float(mse_grad["w_mean"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(loss_grad["w_var"]),
        1e-3 * sched.num_timesteps * float(vb_grad["w_var"]),
        rtol=1e-5,
    )
    # The pure kl loss does train the mean through the bound.
    assert abs(float(grad_of("vb", "kl")["w_mean"])) > 1e-4


def test_training_losses_bad_types_raise():
    sched, _ = setup("linear10")
    x = jnp.zeros((1, 2, 2, 1))
    t = jnp.zeros(1, jnp.int32)
    fn = lambda x, t: x
    for kwargs in ({"loss_type": "l1"}, {"mean_type": "x0"}, {"var_type": "fixed"}):
        with pytest.raises(ValueError):
            D.training_losses(sched, fn, x0=x, t=t, noise=x, **kwargs)


# --------------------------------------------------------------------------- jit / vmap


@pytest.mark.slow
def test_jit_and_vmap_agree_with_plain_calls():
    sched, _ = setup("cosine50")
    rng = np.random.default_rng(17)
    shape, t = (3, 4, 4, 2), steps(sched)
    x0, noise = on_grid(rng, shape), f32(rng, shape)
    out = np.concatenate([f32(rng, shape), f32(rng, shape, -1, 1)], -1)
    tol = {"rtol": 1e-5, "atol": 1e-6}

    def per_example(f):
        return jax.vmap(lambda *a: jax.tree_util.tree_map(lambda y: y[0], f(*[b[None] for b in a])))

    plain = D.q_sample(sched, x0=x0, t=t, noise=noise)
    np.testing.assert_allclose(
        jax.jit(D.q_sample)(sched, x0=x0, t=t, noise=noise), plain, **tol
    )
    np.testing.assert_allclose(
        per_example(lambda x, tt, n: D.q_sample(sched, x0=x, t=tt, noise=n))(x0, t, noise),
        plain,
        **tol,
    )

    pmv = functools.partial(D.p_mean_variance, mean_type="v", var_type="learned_range")
    plain = pmv(sched, model_output=out, x_t=noise, t=t)
    jitted = jax.jit(pmv)(sched, model_output=out, x_t=noise, t=t)
    vmapped = per_example(lambda o, x, tt: pmv(sched, model_output=o, x_t=x, t=tt))(out, noise, t)
    for key in plain:
        np.testing.assert_allclose(jitted[key], plain[key], **tol)
        np.testing.assert_allclose(vmapped[key], plain[key], **tol)

    def model(x, tt):
        return jnp.concatenate([0.5 * x, jnp.tanh(x)], -1) + 0.01 * tt.reshape(-1, 1, 1, 1)

    tl = functools.partial(
        D.training_losses, mean_type="eps", var_type="learned_range", loss_type="hybrid"
    )
    plain = tl(sched, model, x0=x0, t=t, noise=noise)
    jitted = jax.jit(lambda s, x, tt, n: tl(s, model, x0=x, t=tt, noise=n))(sched, x0, t, noise)
    vmapped = per_example(lambda x, tt, n: tl(sched, model, x0=x, t=tt, noise=n))(x0, t, noise)
    for key in plain:
        np.testing.assert_allclose(jitted[key], plain[key], **tol)
        np.testing.assert_allclose(vmapped[key], plain[key], **tol)


# --------------------------------------------------------------------------- bits/dim


def offset_denoiser(tb, x_star, mean_type, offset):
    """Optimal output for data = {x_star} plus a fixed offset: pred_x0 does not depend on noise."""

    def fn(x_t, t):
        gather = lambda key: tb[key][t].reshape(-1, 1, 1, 1)
        sa, s1 = jnp.sqrt(gather("abar")), jnp.sqrt(1 - gather("abar"))
        eps = (x_t - sa * x_star) / s1
        target = {"eps": eps, "xstart": x_star + 0 * x_t, "v": sa * eps - s1 * x_star}[mean_type]
        return target + offset

    return fn


def hand_bpd(tb, x_star, mean_type, var_type, offset, clip):
    """calc_bpd's outputs for `offset_denoiser`, derived by hand in float64, noise-free.

    pred_x0 does not depend on the noise: eps: x* - sqrt(1/abar - 1) c; xstart: x* + c;
    v: x* - sqrt(1 - abar) c. For t > 0 the model and true means differ by
    coef1 (x* - pred_x0), independent of x_t; at t = 0 the decoder's mean is pred_x0 itself
    (coef1 = 1, coef2 = 0).
    """
    T = len(tb["betas"])
    x_star, c = f64(x_star), f64(offset)
    model_logvar = tb["fixedlarge_log"] if var_type == "fixedlarge" else tb["post_logvar_clipped"]
    terms, x0_mse, eps_mse = [], [], []
    for step in range(T):
        abar = tb["abar"][step]
        k = math.sqrt(1 / abar - 1)
        if mean_type == "eps":
            pred = x_star - k * c
        elif mean_type == "xstart":
            pred = x_star + c
        else:
            pred = x_star - math.sqrt(1 - abar) * c
        if clip:
            pred = np.clip(pred, -1, 1)
        logvar = model_logvar[step]
        if step == 0:
            logp = ref_discretized_ll(x_star, pred, 0.5 * logvar)
            terms.append(-mean_flat64(logp) / LOG2)
        else:
            delta = tb["coef1"][step] * (x_star - pred)
            kl = ref_normal_kl(delta, tb["post_logvar_clipped"][step], 0.0, logvar)
            terms.append(mean_flat64(kl) / LOG2)
        x0_mse.append(mean_flat64((pred - x_star) ** 2))
        eps_mse.append(mean_flat64(((x_star - pred) / k) ** 2))
    abar_T = tb["abar"][-1]
    prior = (
        mean_flat64(ref_normal_kl(math.sqrt(abar_T) * x_star, math.log(1 - abar_T), 0.0, 0.0))
        / LOG2
    )
    terms = np.stack(terms, 1)
    return {
        "prior_bpd": prior,
        "terms_bpd": terms,
        "total_bpd": prior + terms.sum(1),
        "x0_mse": np.stack(x0_mse, 1),
        "eps_mse": np.stack(eps_mse, 1),
    }


def point_mass_image(rng, shape=(1, 4, 4, 2)):
    x_star = on_grid(rng, shape)
    x_star.flat[1], x_star.flat[2] = 1.0, -1.0
    return x_star


def test_calc_bpd_exact_denoiser_on_point_mass_data():
    # Every KL term vanishes for t > 0 with fixedsmall variance; the decoder term is
    # -log of the discretized N(x*, beta~_1) at x*; the prior is KL(q(x_T|x*) || N(0, I)).
    sched, tb = setup("linear10")
    rng = np.random.default_rng(18)
    x_star = point_mass_image(rng)
    x0 = np.broadcast_to(x_star, (2,) + x_star.shape[1:])
    fn = offset_denoiser(jnp_tables(tb), x_star, "eps", 0.0)
    got = D.calc_bpd(
        sched, fn, x0=x0, key=jax.random.key(0), mean_type="eps", var_type="fixedsmall"
    )
    T = 10
    assert got["terms_bpd"].shape == (2, T) and got["total_bpd"].shape == (2,)
    assert got["prior_bpd"].shape == (2,) and got["x0_mse"].shape == (2, T)
    assert got["eps_mse"].shape == (2, T)
    sigma = math.sqrt(tb["post_var"][1])
    interior = np.log(norm.cdf(1 / 255 / sigma) - norm.cdf(-1 / 255 / sigma))
    edge = np.log(norm.cdf(1 / 255 / sigma))
    is_edge = np.abs(f64(x_star)) > 0.999
    decoder = -np.where(is_edge, edge, interior).mean() / LOG2
    abar_T = tb["abar"][-1]
    prior = (
        np.mean(0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * f64(x_star) ** 2)) / LOG2
    )
    np.testing.assert_allclose(got["terms_bpd"][:, 0], decoder, rtol=1e-5)
    np.testing.assert_allclose(got["terms_bpd"][:, 1:], 0.0, atol=1e-5)
    np.testing.assert_allclose(got["prior_bpd"], prior, rtol=1e-5)
    np.testing.assert_allclose(got["total_bpd"], prior + decoder, rtol=1e-5)
    np.testing.assert_allclose(got["x0_mse"], 0.0, atol=1e-10)
    np.testing.assert_allclose(got["eps_mse"], 0.0, atol=1e-8)
    assert np.all(np.asarray(got["terms_bpd"]) >= -1e-6)


@pytest.mark.parametrize(
    "mean_type,var_type,clip",
    [("eps", "fixedlarge", True), ("v", "fixedsmall", False)],
)
def test_calc_bpd_offset_denoiser_matches_hand_derivation(mean_type, var_type, clip):
    sched, tb = setup("linear10")
    rng = np.random.default_rng(19)
    x_star = point_mass_image(rng)
    # Offsets push the edge pixels outward so that clipping bites (eps and v scale them by
    # ~0.01 at t = 0, keeping the decoder's mean within a std of x*, far from the 1e-12 clamp).
    offset = f32(rng, x_star.shape, -0.05, 0.05)
    offset.flat[1], offset.flat[2] = -0.05, 0.05
    x0 = np.broadcast_to(x_star, (2,) + x_star.shape[1:])
    fn = offset_denoiser(jnp_tables(tb), x_star, mean_type, offset)
    got = D.calc_bpd(
        sched, fn, x0=x0, key=jax.random.key(1), mean_type=mean_type, var_type=var_type,
        clip_denoised=clip,
    )
    ref = hand_bpd(tb, x_star, mean_type, var_type, offset, clip)
    keys = ("prior_bpd", "terms_bpd", "total_bpd", "x0_mse") + (() if clip else ("eps_mse",))
    for key in keys:
        expected = np.broadcast_to(ref[key], got[key].shape)
        np.testing.assert_allclose(got[key], expected, rtol=2e-4, atol=1e-6, err_msg=key)
    assert np.all(np.asarray(got["terms_bpd"]) >= -1e-6)
    np.testing.assert_allclose(
        got["total_bpd"], got["prior_bpd"] + np.asarray(got["terms_bpd"]).sum(1), rtol=1e-6
    )


def test_calc_bpd_bad_types_raise():
    sched, _ = setup("linear10")
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError):
        D.calc_bpd(sched, lambda x, t: x, x0=x, key=jax.random.key(0), var_type="huge")


def test_score_is_minus_eps_over_sigma_and_the_gaussian_score():
    # For x0 = a fixed point x*, q(x_t) = N(sqrt(abar) x*, 1 - abar): its score is
    # -(x_t - sqrt(abar) x*) / (1 - abar), and the true eps is (x_t - sqrt(abar) x*) / sqrt(1 - abar).
    betas = np.linspace(1e-4, 0.02, 100)
    schedule = Schedule.from_betas(betas)
    abar = np.cumprod(1 - betas)
    t = np.array([0, 10, 50, 99], np.int32)
    x_star = 0.3
    x_t = np.random.default_rng(0).normal(size=(4, 2, 2, 1))
    a = abar[t][:, None, None, None]
    eps = (x_t - np.sqrt(a) * x_star) / np.sqrt(1 - a)
    got = D.score(schedule, eps=jnp.asarray(eps, jnp.float32), t=jnp.asarray(t))
    np.testing.assert_allclose(got, -(x_t - np.sqrt(a) * x_star) / (1 - a), rtol=1e-4)


def test_dynamic_threshold_rescales_only_outlying_examples():
    inside = np.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)
    outside = 3.0 * inside  # every |x| up to 2.7: s = the 0.9 quantile of |x| > 1
    x0 = jnp.asarray(np.concatenate([inside, outside]), jnp.float32)
    got = np.asarray(D.dynamic_threshold(x0, ratio=0.9))
    np.testing.assert_allclose(got[0], inside[0], rtol=1e-6)  # s = 1: the static clip, a no-op
    s = np.quantile(np.abs(outside), 0.9)
    assert s > 1
    np.testing.assert_allclose(got[1], np.clip(outside[0], -s, s) / s, rtol=1e-5)
    assert np.abs(got).max() <= 1.0
