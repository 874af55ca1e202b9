"""Heun and Euler-ancestral on EDM's sigmas, and the Langevin corrector, in the one compiled
chain (ddpm_jax/plans.py, reverse.py, spec.py), against float64 references and Gaussian data,
whose optimal noise predictor is analytic: for x0 ~ N(mu, s^2),
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import plans
from ddpm_jax.reverse import langevin_step
from ddpm_jax.sampling import sample
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec
from reference import (assert_follows_gaussian, reference_heun_step, reference_langevin_step,
                       scaled_linear)

MU, S = 0.3, 0.5


def gaussian_eps(betas, mu=MU, s=S, calls=None):
    """E[eps | x_t] from float64 tables (1 - abar keeps its digits near t = 0); `calls`: a list
    appended to at every trace (the number of model copies in the program)."""
    abar = np.cumprod(1.0 - betas)
    alpha_t = jnp.asarray(np.sqrt(abar), jnp.float32)
    sigma_t = jnp.asarray(np.sqrt(1 - abar), jnp.float32)

    def eps_fn(x_t, t):
        if calls is not None:
            calls.append(1)
        a, sg = alpha_t[t][:, None, None, None], sigma_t[t][:, None, None, None]
        return sg * (x_t - a * mu) / (a**2 * s**2 + sg**2)
    return eps_fn


def test_edm_spacing_snaps_karras_sigmas_to_unique_timesteps():
    betas = np.linspace(1e-4, 0.02, 1000)
    schedule = Schedule.from_betas(betas)
    abar = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - abar) / abar)
    for n in (5, 18, 40):
        kept = plans.edm_timesteps(schedule, n)
        assert len(np.unique(kept)) == n and kept[0] == 0 and kept[-1] == 999
        # each kept t's sigma is within one discrete step of EDM's sigma (rho = 7), in log sigma
        ramp = np.linspace(0, 1, n)
        edm = (sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7
        gaps = np.abs(np.log(sigma[kept[::-1]]) - np.log(edm))
        steps = np.abs(np.diff(np.log(sigma)))
        assert np.all(gaps <= np.maximum(steps[np.minimum(kept[::-1], 998)], 1e-12) * 1.01 + 1e-9)


def test_one_heun_step_is_the_float64_reference():
    """Each Heun step of the chain, recomputed in float64 from the chain's own recorded x_t (the
    proposal's model call included) with EDM's Alg. 1 in EDM variables."""
    betas = scaled_linear(50)
    eps_fn = gaussian_eps(betas)
    abar = np.cumprod(1 - betas)
    steps = 6
    out = sample(eps_fn, Schedule.from_betas(betas), (3, 2, 2, 1), jax.random.key(4),
                 sampler="heun", steps=steps, clip_denoised=False, return_every=1,
                 progressive=("x_t",))
    kept = out["progressive_timesteps"][::-1]
    x_t = np.asarray(out["x_t"], np.float64)[::-1]

    def x0_at(t):
        def x0_fn(x, _):
            a = abar[t]
            eps = np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * S**2 + 1 - a)
            return (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return x0_fn

    for i in range(steps):
        a_next = abar[kept[i - 1]] if i > 0 else 1.0

        def x0_fn(x, level):
            return x0_at(kept[i] if level == 0 else kept[i - 1])(x, level)
        expected = reference_heun_step(x_t[i], x0_fn, abar[kept[i]], a_next)
        got = x_t[i - 1] if i > 0 else np.asarray(out["images"], np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


@pytest.mark.slow
def test_heun_converges_at_second_order_on_the_closed_form():
    """Gaussian data: the probability-flow ODE keeps each coordinate's standardized value, so the
    exact output is x0_hat at t = 0 of alpha_0 mu + sqrt(alpha_0^2 s^2 + sigma_0^2) z(x_T)
    (tests/test_sampling.py's DPM-Solver++ convergence test). Heun's error falls as S^-2,
    the Euler proposal's alone (DDIM eta 0 on the same EDM timesteps) as S^-1."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    eps_fn = gaussian_eps(betas)
    shape, key = (8, 4, 4, 1), jax.random.key(13)
    init_key = jax.vmap(lambda n: jax.random.split(jax.random.fold_in(key, n))[0])(jnp.arange(8))
    x_T = np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(init_key), np.float64)
    z = (x_T - alpha[-1] * MU) / np.sqrt(alpha[-1] ** 2 * S**2 + sigma[-1] ** 2)
    x_0 = alpha[0] * MU + np.sqrt(alpha[0] ** 2 * S**2 + sigma[0] ** 2) * z
    exact = MU + alpha[0] * S**2 * (x_0 - alpha[0] * MU) / (alpha[0] ** 2 * S**2 + sigma[0] ** 2)
    steps = np.array([10, 20, 40])
    errors = {name: np.array([np.abs(np.asarray(sample(
            eps_fn, Schedule.from_betas(betas), shape, key, sampler=name, steps=int(n),
            spacing="edm", clip_denoised=False)["images"]) - exact).max() for n in steps])
            for name in ("heun", "ddim")}
    slopes = {k: -np.polyfit(np.log(steps), np.log(e), 1)[0] for k, e in errors.items()}
    assert 1.7 < slopes["heun"] < 2.4 and 0.8 < slopes["ddim"] < 1.2, (slopes, errors)
    assert np.all(errors["heun"] < errors["ddim"]) and errors["heun"][-1] > 1e-5


def test_euler_ancestral_is_ddim_eta_one_on_the_same_timesteps():
    """k-diffusion's Euler-ancestral step (EDM variables, sigma_up / sigma_down) and DDIM's eta = 1
    step (Song et al. eq. 12) are the same Gaussian: same noise, same images."""
    betas = scaled_linear(50)
    schedule, key = Schedule.from_betas(betas), jax.random.key(6)
    eps_fn = gaussian_eps(betas)
    runs = [np.asarray(sample(eps_fn, schedule, (4, 2, 2, 1), key, steps=7, spacing="edm",
                              **options)["images"])
            for options in (dict(sampler="euler_ancestral"), dict(sampler="ddim", eta=1.0),
                            dict(sampler="ddim", eta=0.0))]
    np.testing.assert_allclose(runs[0], runs[1], atol=2e-5)
    assert np.abs(runs[0] - runs[2]).max() > 1e-2


def test_one_langevin_step_is_the_float64_reference():
    rng = np.random.default_rng(0)
    x, score, z = (rng.normal(size=(3, 2, 2, 2)) for _ in range(3))
    got = langevin_step(*(jnp.asarray(a, jnp.float32) for a in (x, score, z)),
                        jnp.float32(0.16), jnp.float32(0.98))
    expected = reference_langevin_step(x.reshape(3, -1), score.reshape(3, -1), z.reshape(3, -1),
                                       0.16, 0.98)
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), expected, rtol=1e-5, atol=1e-6)


def test_corrector_preserves_the_gaussian_marginal_and_pulls_others_towards_it():
    """x ~ q(x_t) = N(m, v) for Gaussian data with its exact score: a Langevin step keeps the law
    (to its O(r^4) discretisation bias, 4 r^4 v in the variance, here far below the 5-s.e.
    tolerance); from a wrong law N(m + 1, 4 v) ten steps of r = 0.5 move it most of the way
    back."""
    abar, snr = 0.3, 0.16
    m, v = math.sqrt(abar) * MU, abar * S**2 + 1 - abar
    key = jax.random.key(0)
    shape = (2048, 4, 4, 1)

    def steps(x, count, snr=snr):
        for j in range(count):
            noise = jax.random.normal(jax.random.fold_in(key, j), shape)
            x = langevin_step(x, -(x - m) / v, noise, jnp.float32(snr), jnp.float32(0.99))
        return x

    x = m + math.sqrt(v) * jax.random.normal(jax.random.key(1), shape)
    assert_follows_gaussian(np.asarray(steps(x, 1), np.float64).ravel(), m, v)
    wrong = m + 1.0 + 2 * math.sqrt(v) * jax.random.normal(jax.random.key(2), shape)
    moved = np.asarray(steps(wrong, 10, 0.5), np.float64)
    assert abs(moved.mean() - m) < 0.6 and moved.var() < 0.6 * 4 * v, (moved.mean(), moved.var())


def test_pc_chain_samples_gaussian_data_and_calls_the_model_once_more_per_step():
    """Ancestral predictor (fixedsmall) + corrector r = 0.16 on Gaussian data: the samples keep
    the data's moments; the program holds one more model copy (the corrector's) and Heun's one
    more (its proposal's), each behind the one seam."""
    betas = scaled_linear(100)
    schedule = Schedule.from_betas(betas)
    calls = []
    eps_fn = gaussian_eps(betas, s=0.2, calls=calls)
    out = sample(eps_fn, schedule, (512, 4, 4, 1), jax.random.key(8), steps=50,
                 var_type="fixedsmall", clip_denoised=False, corrector_snr=0.16)
    assert len(calls) == 2
    x = np.asarray(out["images"], np.float64).ravel()
    assert abs(x.mean() - MU) < 0.02 and abs(x.std() - 0.2) < 0.02, (x.mean(), x.std())
    plain = sample(eps_fn, schedule, (512, 4, 4, 1), jax.random.key(8), steps=50,
                   var_type="fixedsmall", clip_denoised=False)
    assert np.abs(np.asarray(plain["images"]) - out["images"]).max() > 1e-2
    calls.clear()
    sample(eps_fn, schedule, (2, 4, 4, 1), jax.random.key(8), sampler="heun", steps=5)
    assert len(calls) == 2


def test_spec_counts_model_calls_and_describes_the_corrector():
    spec = SamplerSpec(sampler="heun", steps=10)
    assert spec.spacing == "edm" and spec.model_calls(10) == 19
    assert SamplerSpec(sampler="heun", steps=10).with_overrides(sampler="ddim").spacing == "time"
    pc = SamplerSpec(steps=100, corrector_snr=0.16)
    assert pc.corrector_steps == 1 and pc.model_calls(100) == 199
    assert pc.describe(100) == ("ddpm, 100 steps, fixedlarge variance, time spacing, Langevin "
                                "corrector r=0.16 x1, 199 model calls")


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="rk45"), "sampler='rk45': choose one of ('ddpm', 'ddim', 'dpm++', 'dpm++sde', "
                           "'heun', 'euler_ancestral')."),
    (dict(corrector_snr=0.0), "corrector_snr=0.0: use a signal-to-noise ratio in (0, 1] "
                              "(score_sde: 0.16 on CIFAR-10), or None for no corrector."),
    (dict(corrector_snr=-0.1), "corrector_snr=-0.1: use a signal-to-noise ratio in (0, 1]"),
    (dict(corrector_snr=0.1, corrector_steps=0), "corrector_steps=0: use an int >= 1"),
    (dict(corrector_steps=2), "corrector_steps=2 needs corrector_snr (the corrector's "
                              "signal-to-noise ratio r, e.g. 0.16)."),
    (dict(sampler="heun", steps="ddim10"), "spacing='edm' places an int number of steps S; got "
                                           "steps='ddim10'."),
])
def test_bad_sampler_inputs_give_one_line_each(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplerSpec(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
