"""The probability-flow ODE likelihood (ddpm_jax/ode_likelihood.py) on Gaussian data, whose
optimal noise predictor and ODE flow are analytic.

Data x0 ~ N(mu, Sigma) with a full covariance Sigma = Q diag(s^2) Q^T: x_t = alpha x0 + sigma eps
has covariance V = alpha^2 Sigma + sigma^2 I, the optimal predictor is E[eps | x_t] =
sigma V^{-1} (x_t - alpha mu) (a non-diagonal Jacobian, so that Hutchinson's estimate is not
exact by accident), and since every V(rho) shares Sigma's eigenvectors the ODE maps
x_0 - alpha_0 mu to V_1^{1/2} V_0^{-1/2} (x_0 - alpha_0 mu): the model's log-density of x_0 is
log N(x_1; 0, I) + (log det V_1 - log det V_0) / 2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import ode_likelihood as ode
from ddpm_jax.schedule import Schedule
from reference import scaled_linear

T = 40
SHAPE = (2, 2, 2)   # D = 8
D = 8


def gaussian_problem(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    s2 = np.linspace(0.05, 0.6, D)
    mu = rng.normal(size=D) * 0.3
    return q, s2, mu


class GaussianEps:
    """apply_fn(params, x [1, H, W, C], t [1] float) -> E[eps | x_t] for data N(mu, Sigma), at
    the noise level of the fractional t: rho(t) interpolated linearly in t between the knots,
    the inverse of the map the ODE module uses."""

    def __init__(self, schedule, q, s2, mu):
        self.knots = jnp.asarray(ode.rho_knots(schedule), jnp.float32)
        self.q, self.s2, self.mu = (jnp.asarray(a, jnp.float32) for a in (q, s2, mu))

    def __call__(self, params, x, t):
        rho = jnp.interp(t[0], jnp.arange(T, dtype=jnp.float32), self.knots)
        abar = jax.nn.sigmoid(-2.0 * rho)
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        r = x.reshape(D) - alpha * self.mu
        v_inv_r = self.q @ ((self.q.T @ r) / (abar * self.s2 + 1.0 - abar))
        return (sigma * v_inv_r).reshape(x.shape)

    def __hash__(self):
        return id(self)


def analytic_log_density(schedule, q, s2, mu, x0):
    """The ODE model's log p(x0) [B] in float64 (module docstring), x0 [B, D]."""
    knots = ode.rho_knots(schedule)
    abar0, abar1 = (1.0 / (1.0 + np.exp(2.0 * r)) for r in (knots[0], knots[-1]))
    v0, v1 = abar0 * s2 + 1 - abar0, abar1 * s2 + 1 - abar1
    coords = (x0 - np.sqrt(abar0) * mu) @ q                     # eigen-coordinates at rho_0
    x1 = (np.sqrt(abar1) * mu + (coords * np.sqrt(v1 / v0)) @ q.T)
    prior = -0.5 * np.sum(x1**2, axis=1) - 0.5 * D * math.log(2 * math.pi)
    return prior + 0.5 * np.sum(np.log(v1) - np.log(v0))


@pytest.fixture(scope="module")
def problem():
    schedule = Schedule.from_betas(scaled_linear(T))
    q, s2, mu = gaussian_problem()
    x0 = np.random.default_rng(1).normal(size=(4, D)) * 0.5 + mu
    return schedule, GaussianEps(schedule, q, s2, mu), q, s2, mu, x0


@pytest.mark.parametrize("solver", ["rk45", "rk4"])
def test_exact_trace_log_likelihood_is_the_analytic_gaussian_one(problem, solver):
    schedule, eps, q, s2, mu, x0 = problem
    out = jax.jit(lambda x: ode.ode_log_likelihood(
            eps, None, ode.rho_knots(schedule), x, jax.random.key(0), trace="exact", solver=solver,
            num_steps=200))(jnp.asarray(x0.reshape((-1,) + SHAPE), jnp.float32))
    expected = analytic_log_density(schedule, q, s2, mu, x0)
    np.testing.assert_allclose(np.asarray(out["log_likelihood"]), expected, atol=2e-3)
    assert np.all(np.asarray(out["converged"]))
    if solver == "rk45":   # adaptive: far fewer than RK4's 800 evaluations, counted per image
        assert np.all((np.asarray(out["nfe"]) > 20) & (np.asarray(out["nfe"]) < 400))
    else:
        assert np.all(np.asarray(out["nfe"]) == 800)


@pytest.mark.parametrize("trace", ["rademacher", pytest.param("gaussian", marks=pytest.mark.slow)])
def test_hutchinson_estimate_is_unbiased_within_its_standard_error(problem, trace):
    schedule, eps, q, s2, mu, x0 = problem
    probes = 64
    x = jnp.asarray(np.repeat(x0[:1], probes, axis=0).reshape((-1,) + SHAPE), jnp.float32)
    out = jax.jit(lambda x: ode.ode_log_likelihood(eps, None, ode.rho_knots(schedule), x, jax.random.key(3),
                                                   trace=trace))(x)
    estimates = np.asarray(out["log_likelihood"], np.float64)
    exact = analytic_log_density(schedule, q, s2, mu, x0[:1])[0]
    stderr = estimates.std(ddof=1) / math.sqrt(probes)
    assert estimates.std() > 1e-2   # a non-diagonal Jacobian: each probe is off
    assert abs(estimates.mean() - exact) < 4 * stderr, (estimates.mean(), exact, stderr)


@pytest.mark.slow
def test_ode_bpd_dequantises_each_image_by_its_own_key(problem):
    schedule, eps, q, s2, mu, _ = problem
    data = np.random.default_rng(2).integers(0, 256, size=(3,) + SHAPE).astype(np.uint8)
    key = jax.random.key(5)
    result = ode.evaluate_ode_bpd(eps, None, schedule, data, key, trace="exact", batch_size=2,
                                  progress=False)
    x = np.stack([np.asarray(ode.dequantize(data[n:n + 1], jax.random.fold_in(
            jax.random.fold_in(key, n), 0)))[0] for n in range(3)]).reshape(3, D)
    assert np.all((x >= -1) & (x < 1))
    expected = -analytic_log_density(schedule, q, s2, mu, x) / (D * math.log(2)) + 7
    np.testing.assert_allclose(result["bpd"], expected, atol=1e-3)
    summary = ode.ode_bpd_summary(result)
    assert summary["num_images"] == 3 and summary["not_converged"] == 0 and summary["nfe"] > 0


def _discretized_gaussian_log_prob(k, mean, std):
    """float64 log P(bin k) of N(mean, std^2) on 256 bins of width 2/255 (edge bins open)."""
    from scipy.special import log_ndtr
    x = k / 127.5 - 1.0
    upper = np.where(k == 255, np.inf, (x + 1 / 255 - mean) / std)
    lower = np.where(k == 0, -np.inf, (x - 1 / 255 - mean) / std)
    return np.log(np.exp(log_ndtr(upper)) - np.exp(log_ndtr(lower)))


def test_decoder_dequantisation_is_the_variational_bound_in_float64(problem):
    # -log P(k) <= E_q[-log p(x_0|x_1) - log p_ODE(x_1) + log q(x_1|x_0)], one x_1 per image.
    # Assembled here from the Gaussian closed forms: x_1 from the same key, p_ODE the analytic
    # density, the decoder N(x0_hat, posterior variance at t = 1) with the exact predictor's x0_hat.
    schedule, eps, q, s2, mu, _ = problem
    rng = np.random.default_rng(4)
    data = np.clip(np.round((mu + 0.3 * rng.normal(size=(3, D)) + 1) * 127.5), 0, 255)
    data = data.astype(np.uint8).reshape((3,) + SHAPE)
    key = jax.random.key(6)
    result = ode.evaluate_ode_bpd(eps, None, schedule, data, key, trace="exact", batch_size=3,
                                  progress=False, dequantization="decoder")

    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1 - betas)
    x0 = data.reshape(3, D).astype(np.float64) / 127.5 - 1
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, n), 0),
                                                   (1,) + SHAPE)).reshape(D) for n in range(3)])
    x1 = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * noise
    v0 = abar[0] * s2 + 1 - abar[0]
    eps_hat = np.sqrt(1 - abar[0]) * (((x1 - np.sqrt(abar[0]) * mu) @ q) / v0) @ q.T
    x0_hat = np.clip((x1 - np.sqrt(1 - abar[0]) * eps_hat) / np.sqrt(abar[0]), -1, 1)
    decoder_std = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))    # fixedlarge at t = 0
    decoder = _discretized_gaussian_log_prob(data.reshape(3, D).astype(np.float64), x0_hat,
                                             decoder_std).sum(1)
    log_q = (-0.5 * np.sum(noise**2, 1) - 0.5 * D * np.log(2 * math.pi * (1 - abar[0])))
    expected = (-decoder - analytic_log_density(schedule, q, s2, mu, x1) + log_q) / (D * math.log(2))
    np.testing.assert_allclose(result["bpd"], expected, atol=2e-3)
    np.testing.assert_allclose(result["decoder_bpd"], -decoder / (D * math.log(2)), atol=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(solver="euler"), "solver='euler': choose one of ('rk45', 'rk4')."),
    (dict(trace="sketch"), "trace='sketch': choose one of ('rademacher', 'gaussian', 'exact')."),
    (dict(mean_type="xprev"), "mean_type='xprev': choose one of ('eps', 'xstart', 'v') (the "
                              "posterior mean has no continuous-time reading)."),
    (dict(rtol=0.0), "rtol=0.0: use a tolerance in (0, 1) such as 1e-5."),
    (dict(solver="rk4", num_steps=0), "num_steps=0: RK4 takes an int number of steps >= 1."),
    (dict(dequantization="variational"), "dequantization='variational': choose one of "
                                          "('uniform', 'decoder')."),
])
def test_bad_ode_options_give_one_line_each(problem, options, message):
    schedule, eps, *_ = problem
    with pytest.raises(ValueError) as error:
        ode.evaluate_ode_bpd(eps, None, schedule, np.zeros((1,) + SHAPE, np.uint8),
                             jax.random.key(0), progress=False, **options)
    assert str(error.value) == message


def _shrink_apply(params, x_t, t):
    """A t-independent linear "network", eps = 0.3 x_t (float t accepted)."""
    del params, t
    return 0.3 * x_t


@pytest.mark.slow
def test_run_evaluation_reports_ode_bpd_beside_the_bound(tmp_path):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import digits as digits_config
    from ddpm_jax import evaluate

    config = digits_config.get_config("tiny")
    config.diffusion.timesteps = 10
    config.data.data_dir = str(tmp_path / "tfds")
    options = evaluate.EvalOptions.from_config(config, metrics=("bpd", "ode_bpd"),
                                               bpd_num_images=2, ode_solver="rk4", ode_steps=3)
    report = evaluate.run_evaluation(evaluate.RunData.from_config(config), _shrink_apply, None,
                                     options, workdir=str(tmp_path / "run"), step=3,
                                     progress=False)
    assert report["path"].endswith("report_step3_ema_bpd-test_odebpd-test-rk4-rademacher.json")
    bound, ode_line = report["protocol"]
    bound_total = report["bpd"]["total"]
    assert ode_line.startswith("test ODE bits/dim") and "RK4 3 steps, rademacher trace" in ode_line
    assert "mean NFE 12.0" in ode_line and "2 images of digits/test" in ode_line
    assert report["ode_bpd"]["num_images"] == 2 and np.isfinite(report["ode_bpd"]["total"])
    assert evaluate.scalars(report)["eval/ode_bpd"] == report["ode_bpd"]["total"]

    options = evaluate.EvalOptions.from_config(config, metrics=("ode_bpd",), bpd_num_images=2,
                                               ode_solver="rk4", ode_steps=3,
                                               ode_dequantization="decoder")
    report = evaluate.run_evaluation(evaluate.RunData.from_config(config), _shrink_apply, None,
                                     options, workdir=str(tmp_path / "run"), step=3,
                                     progress=False)
    assert report["path"].endswith("report_step3_ema_odebpd-test-rk4-rademacher-decoder.json")
    assert "decoder dequantisation" in report["protocol"][0]
    # A bound on the pixels themselves: the same scale as the bound's bits/dim (no +7 bits).
    assert abs(report["ode_bpd"]["total"] - bound_total) < 0.5 * bound_total
