"""The one-scan samplers against independent references.

Reference samplers below are plain Python loops written from REFERENCE.md's formulas with
float64 NumPy coefficients; they share only the documented randomness contract of
`ddpm_jax.sampling` (init_key, step_key = split(fold_in(key, n)); z_i = normal(fold_in(step_key, i))).
"""

import dataclasses
import functools
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import plans, reverse, sampling, training
from ddpm_jax.sampling import ModelApply, make_sampler, sample
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec, spec_and_options

from multihost import run_on_two_hosts
from reference import assert_follows_gaussian, gaussian_chain_law, gaussian_sde_dpm_law, scaled_linear
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 50
SHAPE = (4, 4, 4, 2)


class TinyDenoiser(nn.Module):
    """A test double: one 3x3 conv (the jaxpr test counts it), a time embedding, tanh."""

    out_channels: int

    @nn.compact
    def __call__(self, x, t, y=None, *, train=False):
        del y, train
        temb = jnp.sin(t.astype(jnp.float32)[:, None] / jnp.array([[1.0, 3.0, 10.0, 30.0]]))
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(temb)[:, None, None, :]
        return 2.0 * jnp.tanh(nn.Dense(self.out_channels)(jnp.tanh(h)))


@functools.cache
def tiny(out_channels=SHAPE[-1]):
    """(model, params); params drawn with NumPy from the init's shapes, so nothing compiles."""
    model = TinyDenoiser(out_channels)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(SHAPE),
                            jnp.zeros(SHAPE[:1], jnp.int32))["params"]
    rng = np.random.default_rng(out_channels)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32), shapes)
    return model, params


# One compiled copy of the model for every reference loop: (model, params, x_t, t) -> output.
reference_apply = jax.jit(lambda model, params, x_t, t: model.apply({"params": params}, x_t, t),
                          static_argnums=0)


@functools.partial(jax.jit, static_argnums=1)
def batch_noise(key, shape):
    """x_T [B, H, W, C] and z [T, B, H, W, C] per the documented contract, for examples 0..B-1
    (always T steps, so one compile serves every test; chains of S steps use z[:S])."""

    def one_example(n):
        init_key, step_key = jax.random.split(jax.random.fold_in(key, n))
        z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(step_key, i), shape[1:]))(
                jnp.arange(T))
        return jax.random.normal(init_key, shape[1:]), z

    x_T, z = jax.vmap(one_example)(jnp.arange(shape[0]))
    return x_T, jnp.swapaxes(z, 0, 1)


def reference_x0(mean_type, out, x, abar, coef1, coef2):
    """x0_hat (unclipped) from the model's mean part for each mean type (REFERENCE.md), with the
    float32 coefficients of step t: eps, x0 itself, v (Salimans & Ho) or the posterior mean."""
    f32 = np.float32
    if mean_type == "eps":
        return f32(np.sqrt(1 / abar)) * x - f32(np.sqrt(1 / abar - 1)) * out
    if mean_type == "v":
        return f32(np.sqrt(abar)) * x - f32(np.sqrt(1 - abar)) * out
    if mean_type == "xprev":  # invert mu~ = coef1 x0 + coef2 x_t
        return (out - coef2 * x) / coef1
    return out


def reference_ancestral(eps_fn, betas, shape, key, var_type, record_every=None, mean_type="eps"):
    """Ho et al. Algorithm 2 with x0 clipping (the official p_sample), one Python step at a time.
    Coefficients in float64, cast to float32 per step like the official code; x in float32.
    eps_fn returns the mean part (eps, x0, v or mu~ by mean_type) in the first C channels and,
    for a learned variance, the variance part in the last C; a fixed variance ignores the latter.
    With mean_type "xprev" the model's output is the mean, x0_hat only a by-product."""
    C = shape[-1]
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    large_logvar = np.log(np.append(post_var[1], betas[1:]))
    f32 = np.float32
    x, z = map(np.asarray, batch_noise(key, shape))
    records = {}
    for t in range(len(betas) - 1, -1, -1):
        out = np.asarray(eps_fn(x, np.full(shape[:1], t, np.int32)))
        pred, v = out[..., :C], out[..., C:]
        coef1 = f32(np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]))
        coef2 = f32(np.sqrt(alphas[t]) * (1 - abar_prev[t]) / (1 - abar[t]))
        x0 = np.clip(reference_x0(mean_type, pred, x, abar[t], coef1, coef2), -1, 1)
        mean = pred if mean_type == "xprev" else coef1 * x0 + coef2 * x
        if var_type == "fixedlarge":
            logvar = f32(large_logvar[t])
        elif var_type == "fixedsmall":
            logvar = f32(post_logvar[t])
        elif var_type == "learned":
            logvar = v
        else:  # learned_range
            frac = (v + 1) / 2
            logvar = frac * f32(np.log(betas[t])) + (1 - frac) * f32(post_logvar[t])
        if record_every and t % record_every == 0:
            records[t] = x0
        x = mean + (np.exp(0.5 * logvar) * z[t] if t > 0 else f32(0))
    return x, records


def reference_ddim(eps_fn, betas, kept, shape, key, eta, mean_type="eps"):
    """DDIM (Song et al. eq. 12) on the kept timesteps; eps re-derived from the clipped x0.
    x0_hat from the model's output by mean_type, on the respaced chain's own coefficients
    (beta_i = 1 - abar_i / abar_{i-1})."""
    abar_all = np.cumprod(1.0 - betas)
    f32 = np.float32
    x, z = map(np.asarray, batch_noise(key, shape))
    for i in range(len(kept) - 1, -1, -1):
        abar, abar_prev = abar_all[kept[i]], (abar_all[kept[i - 1]] if i > 0 else 1.0)
        out = np.asarray(eps_fn(x, np.full(shape[:1], kept[i], np.int32)))
        beta = 1 - abar / abar_prev
        coef1 = f32(np.sqrt(abar_prev) * beta / (1 - abar))
        coef2 = f32(np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar))
        x0 = np.clip(reference_x0(mean_type, out, x, abar, coef1, coef2), -1, 1)
        eps = (x - f32(np.sqrt(abar)) * x0) / f32(np.sqrt(1 - abar))
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = (f32(np.sqrt(abar_prev)) * x0 + f32(np.sqrt(1 - abar_prev - sigma**2)) * eps
             + (f32(sigma) * z[i] if i > 0 else f32(0)))
    return x


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=T + 1), "steps must lie in 1..50"), (dict(sampler="ddim", eta=1.5), r"eta=1.5: use a value in \[0, 1\]"),
    (dict(eta=0.5), "eta=0.5 only applies to sampler 'ddim'"),
    (dict(sampler="plms"), "sampler='plms': choose one of"),
    (dict(var_type="big"), "var_type='big': choose one of"),
    (dict(return_every=0), "return_every"), (dict(progressive=("eps",)), "progressive"),
    (dict(sampler="ddim", steps=5, order=2), "order=2 only applies to sampler 'dpm\\+\\+' or 'dpm\\+\\+sde'"),
    (dict(sampler="dpm++sde", steps=5, order=3), "order=3: dpm\\+\\+sde has orders 1..2"),
    (dict(sampler="dpm++", steps=1), "order 2 needs at least 2 steps"),
    (dict(sampler="dpm++", steps=5, order=4), "order=4: dpm\\+\\+ has orders 1..3"),
    (dict(sampler="dpm++", steps=5, spacing="karras"), "spacing='karras': choose one of"),
    (dict(sampler="dpm++", steps=5, threshold=1.5), r"threshold=1.5: use a percentile in \(0, 1\)"),
    (dict(classifier_scale=float("inf"), classifier=lambda p, x, t: x),
     "classifier_scale=inf: use a finite number >= 0"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(ModelApply(TinyDenoiser(2)), Schedule.from_betas(scaled_linear(T)), SHAPE,
                     **spec_and_options(**kwargs))


# ------------------------------------------------------------------- structure, compilation

def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


@pytest.mark.parametrize("options, length", [
    (dict(), T), (dict(sampler="ddim", steps=10), 10),
    (dict(steps="ddim5", return_every=2, progressive=("pred_x0", "x_t")), 5),
    (dict(sampler="dpm++", steps=8, order=3, return_every=3), 8),
])
def test_jaxpr_holds_one_scan_over_the_steps_with_one_model_copy(options, length):
    model, params = tiny()
    sampler = make_sampler(ModelApply(model), Schedule.from_betas(scaled_linear(T)), SHAPE,
                           **spec_and_options(**options))
    jaxpr = jax.make_jaxpr(lambda p, k: sampler(p, k))(params, jax.random.key(0)).jaxpr
    eqns = list(_eqns(jaxpr))
    loops = [e for e in eqns if e.primitive.name in ("scan", "while")]
    assert [e.primitive.name for e in loops] == ["scan"]
    assert loops[0].params["length"] == length
    assert sum(e.primitive.name == "conv_general_dilated" for e in eqns) == 1
    inside = list(_eqns(loops[0].params["jaxpr"].jaxpr))
    assert sum(e.primitive.name == "conv_general_dilated" for e in inside) == 1


def counting_apply(model):
    """(ModelApply(model) that appends to `traces` whenever it is traced, traces); a fresh
    class per call, so no jit cache entry is shared between tests."""
    traces = []

    class CountingApply(ModelApply):
        def __call__(self, params, x_t, t):
            traces.append(1)
            return super().__call__(params, x_t, t)

    return CountingApply(model), traces


def test_second_call_and_new_eta_do_not_retrace():
    model, params = tiny()
    apply_fn, traces = counting_apply(model)
    schedule = Schedule.from_betas(scaled_linear(T))
    first = make_sampler(apply_fn, schedule, SHAPE, SamplerSpec(sampler="ddim", steps=10, eta=0.0))
    a = first(params, jax.random.key(0))["images"]
    b = first(params, jax.random.key(1))["images"]
    # A new eta is new plan data of the same shapes: same executable.
    c = make_sampler(apply_fn, schedule, SHAPE, SamplerSpec(sampler="ddim", steps=10, eta=0.7))(
            params, jax.random.key(0))["images"]
    assert len(traces) == 1
    assert not np.allclose(a, b) and not np.allclose(a, c)
    jax.make_jaxpr(make_sampler(apply_fn, schedule, SHAPE, SamplerSpec(sampler="ddim", steps=11)))(
            params, jax.random.key(0))
    assert len(traces) == 2  # a new number of steps is a new program


def test_dpm_solver_compiles_once_for_two_spacings_of_the_same_length():
    model, params = tiny()
    apply_fn, traces = counting_apply(model)
    schedule = Schedule.from_betas(scaled_linear(T))
    runs = [make_sampler(apply_fn, schedule, SHAPE,
                         SamplerSpec(sampler="dpm++", steps=steps, spacing=spacing))(params, jax.random.key(0))["images"]
            for steps, spacing in ((10, "time"), (10, "logsnr"), ("ddim10", "time"))]
    assert len(traces) == 1  # timesteps and solver weights are plan data
    assert np.abs(np.asarray(runs[0]) - np.asarray(runs[1])).max() > 1e-3
    assert np.abs(np.asarray(runs[0]) - np.asarray(runs[2])).max() > 1e-3


# --------------------------------------------------------- equality with Python-loop references

# Shared with the eta = 1 test below, so that both use one compiled program.
ANCESTRAL_SMALL = dict(var_type="fixedsmall", return_every=7, unroll=3)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(var_type="fixedlarge", return_every=7),
                                     ANCESTRAL_SMALL,
                                     dict(var_type="learned_range", return_every=7),
                                     dict(mean_type="v", var_type="learned", return_every=7),
                                     dict(mean_type="xprev", var_type="fixedsmall", return_every=7)])
def test_ancestral_matches_python_loop_reference(options):
    learned = options["var_type"] in ("learned", "learned_range")
    mean_type = options.get("mean_type", "eps")
    model, params = tiny(SHAPE[-1] * (2 if learned else 1))
    if mean_type == "xprev":
        # x_{t-1} = model(x_t) + noise: with the random weights that map expands (a 1e-6 change
        # of the weights moves the samples by ~1 after 50 steps); shrunk weights contract.
        params = jax.tree.map(lambda p: 0.2 * p, params)
    betas, key = scaled_linear(T), jax.random.key(3)
    out = make_sampler(ModelApply(model), Schedule.from_betas(betas), SHAPE,
                       **spec_and_options(**options))(params, key)
    expected, records = reference_ancestral(functools.partial(reference_apply, model, params),
                                            betas, SHAPE, key, options["var_type"], record_every=7,
                                            mean_type=mean_type)
    np.testing.assert_allclose(out["images"], expected, atol=1e-5)
    if mean_type != "xprev":  # xprev's last mean is the model's output itself
        assert float(np.abs(out["images"]).max()) <= 1.0  # the last mean is the clipped x0_hat
    recorded = sorted(records, reverse=True)
    np.testing.assert_array_equal(out["progressive_timesteps"], recorded)
    # x0_hat multiplies float32 rounding in x_t by sqrt(1/abar_t) (up to ~160 here): relative.
    np.testing.assert_allclose(out["pred_x0"], np.stack([records[t] for t in recorded]),
                               rtol=1e-4, atol=1e-5)


DDIM_CASES = [("ddim10", np.arange(0, T, 5), 0.0),
              (7, np.round(np.linspace(0, T - 1, 7)).astype(int), 0.5)]


@pytest.mark.parametrize("steps, kept, eta, mean_type", [
    *[case + ("eps",) for case in DDIM_CASES], DDIM_CASES[1] + ("xstart",)])
def test_ddim_matches_python_loop_reference(steps, kept, eta, mean_type):
    model, params = tiny()
    betas, key = scaled_linear(T), jax.random.key(4)
    out = make_sampler(ModelApply(model), Schedule.from_betas(betas), SHAPE,
                       SamplerSpec(sampler="ddim", steps=steps, eta=eta, mean_type=mean_type))(params, key)
    expected = reference_ddim(functools.partial(reference_apply, model, params), betas, kept,
                              SHAPE, key, eta, mean_type)
    np.testing.assert_allclose(out["images"], expected, atol=1e-5)


def test_ddim_eta_one_on_all_steps_is_ancestral_fixedsmall():
    # With sigma^2 = beta~ the DDIM mean reduces algebraically to the posterior mean mu~, and
    # both samplers draw the same z_i: the chains agree sample by sample, not just in law.
    model, params = tiny()
    schedule, key = Schedule.from_betas(scaled_linear(T)), jax.random.key(5)
    ddim = make_sampler(ModelApply(model), schedule, SHAPE,
                        SamplerSpec(sampler="ddim", eta=1.0))(params, key)
    ddpm = make_sampler(ModelApply(model), schedule, SHAPE,
                        **spec_and_options(**ANCESTRAL_SMALL))(params, key)
    np.testing.assert_allclose(ddim["images"], ddpm["images"], atol=1e-5)
    assert np.abs(ddim["images"] - make_sampler(ModelApply(model), schedule, SHAPE,
                                                SamplerSpec(sampler="ddim", eta=0.0))(params, key)["images"]).max() > 0.01


@dataclasses.dataclass(frozen=True)
class MeanHalf:
    """apply_fn of a learned-variance model cut to its first C output channels: the model a
    fixed variance should see."""

    model: nn.Module
    channels: int

    def __call__(self, params, x_t, t):
        return self.model.apply({"params": params}, x_t, t)[..., :self.channels]


@pytest.mark.slow
def test_trained_learned_variance_model_samples_with_a_fixed_variance():
    # A learned-variance model (2C outputs) trained two hybrid steps, then sampled with its
    # learned variance and with a fixed one (this used to fail: a broadcasting TypeError, for
    # C = 1 a scan-carry mismatch). The fixed variance ignores the last C channels, so it draws
    # exactly what a model emitting only the first C channels draws.
    channels, schedule = SHAPE[-1], Schedule.from_betas(scaled_linear(T))
    model, params = tiny(2 * channels)
    optimizer = training.make_optimizer(grad_clip=1.0)
    zero = jnp.zeros((), jnp.int32)
    state = training.TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                                ema_params=params, rng=jax.random.PRNGKey(0),
                                nonfinite_in_a_row=zero, nonfinite_total=zero)
    step = jax.jit(functools.partial(training.train_step, settings=training.StepConfig(
            model=model, optimizer=optimizer, base_lr=1e-2, warmup_steps=0, ema_decay=0.5,
            var_type="learned_range", loss_type="hybrid")))
    for seed in range(2):
        batch = {"image": jax.random.uniform(jax.random.PRNGKey(seed), SHAPE, minval=-1, maxval=1)}
        new_state, metrics = step(state, batch, schedule)
        assert np.isfinite(float(metrics["vb"])) and float(metrics["vb"]) > 0
        assert not np.allclose(new_state.ema_params["Dense_1"]["kernel"],
                               state.ema_params["Dense_1"]["kernel"])
        state = new_state
    params, key = state.ema_params, jax.random.key(3)
    options = dict(return_every=7)  # the learned_range reference test's program
    learned = make_sampler(ModelApply(model), schedule, SHAPE,
                           **spec_and_options(var_type="learned_range", **options))(params, key)["images"]
    fixed = make_sampler(ModelApply(model), schedule, SHAPE,
                         **spec_and_options(var_type="fixedlarge", **options))(params, key)["images"]
    mean_half = make_sampler(MeanHalf(model, channels), schedule, SHAPE,
                             **spec_and_options(var_type="fixedlarge", **options))(params, key)["images"]
    assert fixed.shape == learned.shape == SHAPE
    np.testing.assert_allclose(fixed, mean_half, rtol=0, atol=1e-6)
    assert np.abs(np.asarray(learned) - np.asarray(fixed)).max() > 1e-3  # the variance matters


# --------------------------------------------------------------------- analytic denoisers

X_STAR = np.linspace(-0.9, 0.9, 16, dtype=np.float32).reshape(1, 4, 4, 1)


def point_mass_eps(schedule):
    """The optimal eps for data = x*: (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def eps_fn(x_t, t):
        a = schedule.alphas_cumprod[t][:, None, None, None]
        return (x_t - jnp.sqrt(a) * X_STAR) / jnp.sqrt(1 - a)
    return eps_fn


@pytest.mark.parametrize("options", [dict(var_type="fixedlarge"),
                                     dict(sampler="ddim", steps=8, eta=0.3)])
def test_point_mass_data_samples_land_on_the_point(options):
    schedule = Schedule.from_betas(scaled_linear(T))
    out = sample(point_mass_eps(schedule), schedule, (32, 4, 4, 1), jax.random.key(6), **options)
    np.testing.assert_allclose(out["images"], np.broadcast_to(X_STAR, (32, 4, 4, 1)), atol=1e-4)


def test_point_mass_marginals_are_the_forward_marginals():
    # With x0_hat = x* exactly and beta~, each step samples q(x_{t-1} | x_t, x*), so x_t is
    # distributed as q(x_t | x*) = N(sqrt(abar_t) x*, 1 - abar_t) along the whole chain.
    schedule = Schedule.from_betas(scaled_linear(T))
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    out = sample(point_mass_eps(schedule), schedule, (256, 4, 4, 1), jax.random.key(7),
                 var_type="fixedsmall", return_every=10, progressive=("x_t", "pred_x0"))
    np.testing.assert_allclose(out["images"], np.broadcast_to(X_STAR, (256, 4, 4, 1)), atol=1e-4)
    np.testing.assert_array_equal(out["progressive_timesteps"], [40, 30, 20, 10, 0])
    for x_t, t in zip(np.asarray(out["x_t"], np.float64), out["progressive_timesteps"]):
        if t == 0:
            continue  # beta~_0 = 0 in q(x_0 | x_1, x*) but 1 - abar_0 > 0: not comparable
        standardized = (x_t - np.sqrt(abar[t]) * X_STAR) / np.sqrt(1 - abar[t])
        assert abs(standardized.mean()) < 0.05 and abs(standardized.std() - 1) < 0.05, t


def gaussian_data_eps(schedule, mu, s):
    """eps_fn(x_t, t) = E[eps | x_t], the optimal noise predictor for x0 ~ N(mu, s^2)."""

    def eps_fn(x_t, t):
        a = schedule.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)
    return eps_fn


@pytest.mark.slow
@pytest.mark.parametrize("sampler, steps, kept, data_tol", [
    ("ddpm", None, np.arange(1000), 0.005),
    ("ddim", None, np.arange(1000), 0.005),
    # 50 DDIM steps are visibly off for narrow data (std 0.176 for 0.2); the samples must
    # follow the chain's law, not the data's.
    ("ddim", "ddim50", np.arange(0, 1000, 20), 0.03)])
def test_gaussian_data_samples_match_theory(sampler, steps, kept, data_tol):
    mu, s = 0.3, 0.2
    betas = scaled_linear(1000)
    schedule = Schedule.from_betas(betas)
    eps_fn = gaussian_data_eps(schedule, mu, s)

    options = dict(var_type="fixedsmall") if sampler == "ddpm" else dict(sampler="ddim")
    out = sample(eps_fn, schedule, (512, 4, 4, 1), jax.random.key(8), steps=steps,
                 clip_denoised=False, **options)
    x = np.asarray(out["images"], np.float64).ravel()
    mean, var = gaussian_chain_law(betas, kept, mu, s, sampler)
    # The chain's law is near the data's (exactly so as the steps grow) ...
    assert abs(mean - mu) < data_tol and abs(np.sqrt(var) - s) < data_tol, (mean, np.sqrt(var))
    # ... and the samples follow it: 8192 draws, 5 standard errors.
    assert_follows_gaussian(x, mean, var)


# ------------------------------------------------------------------------- DPM-Solver++

def reference_dpm_update(x, x0_hats, lam, alpha, sigma, i, order):
    """One DPM-Solver++ step from chain index i to i-1 (Lu et al. 2022b, Alg. 2, as in
    REFERENCE.md; order 3: the 3M update of the dpm-solver code / diffusers), float64.
    x0_hats[k] is x0_hat at index i+k; lam / alpha / sigma indexed by chain index, with the step
    at i = 0 going to alpha = 1, sigma = 0 (lambda = inf)."""
    if i == 0:
        return x0_hats[0]
    h = lam[i - 1] - lam[i]
    ratio, base = sigma[i - 1] / sigma[i], alpha[i - 1] * (1 - np.exp(-h))
    if order == 1:
        return ratio * x + base * x0_hats[0]
    if order == 2:
        r = (lam[i] - lam[i + 1]) / h
        d = (1 + 1 / (2 * r)) * x0_hats[0] - 1 / (2 * r) * x0_hats[1]
        return ratio * x + base * d
    m0, m1, m2 = x0_hats[:3]
    h0, h1 = lam[i] - lam[i + 1], lam[i + 1] - lam[i + 2]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    e = np.exp(-h)
    return (ratio * x - alpha[i - 1] * (e - 1) * m0 + alpha[i - 1] * ((e - 1) / h + 1) * d1
            - alpha[i - 1] * ((e - 1 + h) / h**2 - 0.5) * d2)


@pytest.mark.parametrize("order, steps, spacing", [(2, 10, "time"), (2, 16, "logsnr"),
                                                   (3, 12, "logsnr"), (3, 16, "time")])
def test_dpm_solver_every_step_is_the_published_update(order, steps, spacing):
    """Each step's output, recomputed in float64 from the chain's own recorded x_t and x0_hat
    (so errors cannot accumulate or hide), with the effective order diffusers uses: 1 on the
    first step, min(order, steps taken + 1) after, 1 on the last, <= 2 second-to-last below 15."""
    model, params = tiny()
    betas, key = scaled_linear(T), jax.random.key(11)
    out = make_sampler(ModelApply(model), Schedule.from_betas(betas), SHAPE,
                       SamplerSpec(sampler="dpm++", steps=steps, order=order, spacing=spacing),
                       return_every=1, progressive=("pred_x0", "x_t"))(params, key)
    kept = out["progressive_timesteps"][::-1]  # chain index i -> t
    assert len(kept) == steps
    abar = np.cumprod(1.0 - betas)[kept]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    x_t = np.asarray(out["x_t"], np.float64)[::-1]          # [S, B, ...] by chain index
    x0_hat = np.asarray(out["pred_x0"], np.float64)[::-1]
    for i in range(steps):
        eps = np.asarray(reference_apply(model, params, out["x_t"][steps - 1 - i],
                                         np.full(SHAPE[:1], kept[i], np.int32)), np.float64)
        expected_x0 = np.clip((x_t[i] - sigma[i] * eps) / alpha[i], -1, 1)
        np.testing.assert_allclose(x0_hat[i], expected_x0, rtol=1e-4, atol=1e-4)
        k = min(order, steps - i, 1 if i == 0 else order, 2 if i == 1 and steps < 15 else order)
        expected = reference_dpm_update(x_t[i], x0_hat[i:i + k], lam, alpha, sigma, i, k)
        got = x_t[i - 1] if i > 0 else np.asarray(out["images"], np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("solver, eta", [("dpm++", 0.0), ("dpm++sde", 1.0)])
def test_solver_order_one_is_ddim(solver, eta, spacing):
    # DPM-Solver++ of order 1 is DDIM with eta 0; SDE-DPM-Solver++ of order 1 is DDIM with
    # eta 1 (same grid, same key: the same noise z_i at every chain index, so the same images).
    model, params = tiny()
    schedule, key = Schedule.from_betas(scaled_linear(T)), jax.random.key(12)
    first = make_sampler(ModelApply(model), schedule, SHAPE,
                         SamplerSpec(sampler=solver, order=1, steps=9, spacing=spacing))(params, key)["images"]
    ddim = make_sampler(ModelApply(model), schedule, SHAPE,
                        SamplerSpec(sampler="ddim", eta=eta, steps=9, spacing=spacing))(params, key)["images"]
    np.testing.assert_allclose(np.asarray(first), np.asarray(ddim), atol=2e-5)
    second = make_sampler(ModelApply(model), schedule, SHAPE,
                          SamplerSpec(sampler=solver, steps=9, spacing=spacing))(params, key)["images"]
    assert np.abs(np.asarray(second) - np.asarray(first)).max() > 1e-3  # order 2 is another method


@pytest.mark.parametrize("order, steps, data_tol", [(1, 20, 0.045), (2, 20, 0.01), (2, 50, 0.002)])
def test_sde_dpm_solver_samples_gaussian_data_by_its_exact_law(order, steps, data_tol):
    """Data N(mu, s^2) with the exact eps, steps uniform in log-SNR: the SDE solver's output is
    Gaussian with moments that a float64 recursion over (x_i, x0_hat_{i+1}) gives exactly; the
    samples must follow that law, and the law must approach the data's, 2M much faster than
    order 1 (which is DDIM with eta 1: std 0.158 at 20 steps for 0.2, 2M 0.207). With time
    spacing 2M converges slowly on data this narrow (std 0.31 at 20 steps, 0.23 at 100)."""
    mu, s = 0.3, 0.2
    betas = scaled_linear(1000)
    schedule = Schedule.from_betas(betas)
    eps_fn = gaussian_data_eps(schedule, mu, s)

    out = sample(eps_fn, schedule, (512, 4, 4, 1), jax.random.key(9), sampler="dpm++sde",
                 order=order, steps=steps, spacing="logsnr", clip_denoised=False)
    kept = np.asarray(plans.make_plan(schedule, steps=steps, spacing="logsnr").timesteps)
    mean, var = gaussian_sde_dpm_law(betas, kept, mu, s, order)
    if order == 1:  # the recursion agrees with the DDIM (eta 1) chain law, derived separately
        np.testing.assert_allclose((mean, var), gaussian_chain_law(betas, kept, mu, s, "ddim",
                                                                   eta=1.0), rtol=1e-9)
    assert abs(mean - mu) < data_tol and abs(np.sqrt(var) - s) < data_tol, (mean, np.sqrt(var))
    x = np.asarray(out["images"], np.float64).ravel()
    assert_follows_gaussian(x, mean, var)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_dynamic_threshold_replaces_the_clip(sampler):
    model, params = tiny()
    schedule, key = Schedule.from_betas(scaled_linear(T)), jax.random.key(14)
    runs = {threshold: np.asarray(make_sampler(ModelApply(model), schedule, SHAPE,
                                               SamplerSpec(sampler=sampler, steps=6, threshold=threshold),
                                               return_every=1)(params, key)["pred_x0"]) for threshold in (None, 0.5)}
    clipped, thresholded = runs[None], runs[0.5]
    assert np.abs(thresholded).max() <= 1.0 + 1e-6
    # Where half of an example's pixels exceed 1, it is rescaled, not clipped: fewer pixels at +-1.
    assert (np.abs(thresholded) >= 1 - 1e-6).sum() < (np.abs(clipped) >= 1 - 1e-6).sum()


@pytest.mark.slow
def test_dpm_solver_convergence_order_on_gaussian_data():
    """Data x0 ~ N(mu, s^2): the exact eps is linear in x_t and the probability-flow ODE keeps
    each coordinate's standardized value z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2),
    so the chain's exact output is x0_hat at t = 0 of alpha_0 mu + sqrt(alpha_0^2 s^2 +
    sigma_0^2) z(x_T). Log-SNR spacing (uniform h), T = 1000: the error falls as h^order."""
    mu, s = 0.3, 0.5
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    # eps tables from float64, so that 1 - abar_t near t = 0 keeps its digits in float32
    alpha_t, sigma_t = jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32)

    def eps_fn(x_t, t):  # E[eps | x_t]
        a, sg = alpha_t[t][:, None, None, None], sigma_t[t][:, None, None, None]
        return sg * (x_t - a * mu) / (a**2 * s**2 + sg**2)

    shape, key = (8, 4, 4, 1), jax.random.key(13)
    x_T = np.asarray(batch_noise(key, shape)[0], np.float64)
    z = (x_T - alpha[-1] * mu) / np.sqrt(alpha[-1] ** 2 * s**2 + sigma[-1] ** 2)
    x_0 = alpha[0] * mu + np.sqrt(alpha[0] ** 2 * s**2 + sigma[0] ** 2) * z
    exact = mu + alpha[0] * s**2 * (x_0 - alpha[0] * mu) / (alpha[0] ** 2 * s**2 + sigma[0] ** 2)
    steps = np.array([20, 40, 80])
    errors = {}
    for order in (1, 2, 3):
        errors[order] = np.array([np.abs(np.asarray(sample(
            eps_fn, Schedule.from_betas(betas), shape, key, sampler="dpm++", steps=int(n),
            order=order, spacing="logsnr", clip_denoised=False)["images"]) - exact).max()
            for n in steps])
    slopes = {k: -np.polyfit(np.log(steps), np.log(e), 1)[0] for k, e in errors.items()}
    assert 0.9 < slopes[1] < 1.1 and 1.8 < slopes[2] < 2.2, (slopes, errors)
    # Order 3 starts with an order-1 and an order-2 step (diffusers' warm-up), whose local errors
    # cap its global order near 2; it is still more accurate than order 2 at every step count.
    assert slopes[3] > 2.1 and np.all(errors[3] < errors[2]), (slopes, errors)
    assert errors[2][-1] > 1e-4  # far above float32 rounding: the slope measures the method


# ------------------------------------------------------------------------------------ keys

def test_keys_are_deterministic_and_per_example():
    model, params = tiny()
    schedule = Schedule.from_betas(scaled_linear(T))
    steps, _, eta = DDIM_CASES[1]  # the whole batch reuses the DDIM reference's program
    whole = make_sampler(ModelApply(model), schedule, SHAPE,
                         SamplerSpec(sampler="ddim", steps=steps, eta=eta))
    a = np.asarray(whole(params, jax.random.key(9))["images"])
    np.testing.assert_array_equal(a, whole(params, jax.random.key(9))["images"])
    assert np.abs(a - np.asarray(whole(params, jax.random.key(10))["images"])).max() > 0.1
    assert np.abs(a[0] - a[1]).max() > 0.1  # rows of a batch differ


def test_a_row_depends_only_on_the_key_and_its_global_index():
    """Two half batches at offsets 0 and 2 equal the whole batch bit for bit. The model is
    elementwise, so its arithmetic cannot depend on the batch size (a convolution's reduction
    order may, by a float32 ulp, on some CPUs): what is compared is the randomness alone."""
    def elementwise(params, x, t):
        return jnp.tanh(params * x + 0.1 * jnp.sin(t.astype(jnp.float32))[:, None, None, None])

    schedule = Schedule.from_betas(scaled_linear(T))
    steps, _, eta = DDIM_CASES[1]
    whole = make_sampler(elementwise, schedule, SHAPE,
                         SamplerSpec(sampler="ddim", steps=steps, eta=eta))
    halves = make_sampler(elementwise, schedule, (2,) + SHAPE[1:],
                          SamplerSpec(sampler="ddim", steps=steps, eta=eta))
    a = np.asarray(whole(jnp.float32(1.3), jax.random.key(9))["images"])
    split = np.concatenate([halves(jnp.float32(1.3), jax.random.key(9), 0)["images"],
                            halves(jnp.float32(1.3), jax.random.key(9), 2)["images"]])
    assert np.abs(a[0] - a[1]).max() > 0.1
    np.testing.assert_array_equal(split, a)


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from ddpm_jax.sampling import make_sampler
    from ddpm_jax.schedule import Schedule
    from ddpm_jax.spec import spec_and_options
    assert jax.device_count() == 8, jax.devices()

    def apply_fn(params, x_t, t):
        return jnp.tanh(params["w"] * x_t + params["b"] * jnp.sin(t)[:, None, None, None])

    params = dict(w=jnp.float32(1.3), b=jnp.float32(0.4))
    schedule = Schedule.create("linear", 40, beta_start=0.0025, beta_end=0.5)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shape = (16, 4, 4, 3)
    # Ancestral on a respaced chain with both progressive buffers: every sharded piece at once.
    opts = dict(steps=10, return_every=3, progressive=("pred_x0", "x_t"))
    one = make_sampler(apply_fn, schedule, shape, **spec_and_options(**opts))(
            params, jax.random.key(0))
    eight = make_sampler(apply_fn, schedule, shape, mesh=mesh, **spec_and_options(**opts))(
            params, jax.random.key(0))
    assert eight["images"].sharding.shard_shape(shape) == (2, 4, 4, 3)
    assert eight["x_t"].sharding.shard_shape(one["x_t"].shape) == (4, 2, 4, 4, 3)
    for name in ("images", "pred_x0", "x_t"):
        assert len(eight[name].sharding.device_set) == 8, name
        np.testing.assert_allclose(np.asarray(eight[name]), np.asarray(one[name]), atol=1e-6)

    class Shift:  # class-conditional: the label (3: null) shifts the output
        null_label = 3
        def __call__(self, params, x_t, t, y=None):
            y = jnp.full(x_t.shape[:1], 3) if y is None else y
            return apply_fn(params, x_t, t) + 0.1 * y.astype(jnp.float32)[:, None, None, None]

    labels = np.arange(16) % 3
    for opts in (dict(), dict(sampler="dpm++", order=3, spacing="logsnr", return_every=4)):
        # DPM-Solver++: its x0 history in the carry is sharded like x_t.
        one, eight = (make_sampler(Shift(), schedule, shape, **spec_and_options(
                                       steps=10, guidance=2.0, mesh=m, **opts))(
                                   params, jax.random.key(1), 0, labels)
                      for m in (None, mesh))
        for name in set(one) - {"progressive_timesteps"}:
            assert len(eight[name].sharding.device_set) == 8, name
            np.testing.assert_allclose(np.asarray(eight[name]), np.asarray(one[name]), atol=1e-5)
    print("OK")
""")


@pytest.mark.slow
def test_batch_split_over_eight_devices_matches_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- sample.py

def run_sample_py(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("make_args, message", [
    (lambda d: [f"--workdir={d}/missing"], "--workdir=" ),
    (lambda d: [f"--workdir={d}"], "is empty"),
    (lambda d: [f"--workdir={d}", "--sampler=plms"], "--sampler"),
    (lambda d: [f"--workdir={d}", "--sampler=dpm++", "--order=4"], "--order"),
    (lambda d: [f"--workdir={d}", "--sampler=dpm++", "--spacing=karras"], "--spacing"),
    (lambda d: [f"--diffusers_dir={d}"], "no config.json"),
    (lambda d: [], "workdir"),
])
def test_sample_py_rejects_bad_input_with_a_clear_message(tmp_path, make_args, message):
    proc = run_sample_py(*make_args(tmp_path))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sample_py_on_a_tiny_diffusers_folder(tmp_path):
    """End to end: a random diffusers UNet2DModel in the google/ddpm-* layout -> PNG + .npz."""
    pytest.importorskip("ddpm_jax.convert")
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    # The DDPM architecture in diffusers' terms (as google/ddpm-cifar10-32's config.json).
    unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 16),
            layers_per_block=1, norm_num_groups=8, norm_eps=1e-6, attention_head_dim=None,
            flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "grid.png"
    proc = run_sample_py(f"--diffusers_dir={tmp_path / 'unet'}", "--num_samples=5",
                         "--batch_size=4", "--sampler=ddim", "--steps=3", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(tmp_path / "grid.npz")["images"]
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert len(np.unique(images)) > 10  # not a constant image
    assert out.stat().st_size > 0
    # DPM-Solver++ end to end: 4 steps uniform in log-SNR, order 3.
    proc = run_sample_py(f"--diffusers_dir={tmp_path / 'unet'}", "--num_samples=2",
                         "--sampler=dpm++", "--steps=4", "--order=3", "--spacing=logsnr",
                         f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpm++, 4 steps, order 3, logsnr spacing" in proc.stderr, proc.stderr[-2000:]
    # Bad values are usage errors that name the flag, raised before anything compiles.
    for args, message in ((["--steps=ddim7x"], "--steps"),
                          (["--sampler=ddim", "--steps=3", "--order=2"], "order=2 only applies to sampler 'dpm++'"),
                          (["--sampler=dpm++", "--steps=2", "--order=3"], "needs at least 3 steps")):
        proc = run_sample_py(f"--diffusers_dir={tmp_path / 'unet'}", *args, f"--out={out}")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_draw_images_does_not_depend_on_the_batch_size():
    """Image n depends only on (key, n): 5 images in batches of 2 (the last one padded) equal
    the first 5 of one batch of 8, as uint8, and exactly 5 come back."""
    def apply_fn(params, x, t):
        return params * x

    schedule = Schedule.create("linear", 10)
    key = jax.random.key(7)
    small = make_sampler(apply_fn, schedule, (2, 4, 4, 3), SamplerSpec(sampler="ddpm", steps=4))
    large = make_sampler(apply_fn, schedule, (8, 4, 4, 3), SamplerSpec(sampler="ddpm", steps=4))
    a = sampling.draw_images(small, jnp.float32(0.5), key, 5, progress=False)
    b = sampling.draw_images(large, jnp.float32(0.5), key, 5, progress=False)
    assert a.dtype == np.uint8 and a.shape == (5, 4, 4, 3)
    assert len(np.unique(a)) > 10  # real noise, not a constant image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float32 rounding at the uint8 edge


_SAMPLING_HOST = """
import jax.numpy as jnp, numpy as np
from ddpm_jax import sampling
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec
assert mesh.size == 4  # 2 hosts x 2 CPU devices

def apply_fn(params, x, t):
    return params * x

class Shift:  # class-conditional: the label (3: null) shifts the output
    null_label = 3
    def __call__(self, params, x, t, y=None):
        y = jnp.full(x.shape[:1], 3) if y is None else y
        return params * x + 0.2 * y.astype(jnp.float32)[:, None, None, None]

schedule = Schedule.create("linear", 10)
plain = sampling.make_sampler(apply_fn, schedule, (4, 4, 4, 3), SamplerSpec(steps=4), mesh=mesh)
guided = sampling.make_sampler(Shift(), schedule, (4, 4, 4, 3), SamplerSpec(steps=4),
                               guidance=1.5, mesh=mesh)
solver = sampling.make_sampler(Shift(), schedule, (4, 4, 4, 3),
                               SamplerSpec(sampler="dpm++", steps=4), guidance=1.5, mesh=mesh)
key = jax.random.key(7)
np.save(out, np.stack([sampling.draw_images(plain, jnp.float32(0.5), key, 6, progress=False),
                       sampling.draw_images(guided, jnp.float32(0.5), key, 6, progress=False,
                                            labels=[0, 1, 2, 0, 1, 2]),
                       sampling.draw_images(solver, jnp.float32(0.5), key, 6, progress=False,
                                            labels=[0, 1, 2, 0, 1, 2])]))
"""


@pytest.mark.slow
def test_draw_images_on_two_hosts_gives_every_host_all_images(tmp_path):
    """Two jax.distributed processes on 127.0.0.1 with 2 CPU devices each: the batch is sharded
    over all 4 devices, and each host gets all 6 images, equal to a single process's; also with
    class labels and guidance (the labels replicated, then sharded with the rows)."""
    outs = run_on_two_hosts(_SAMPLING_HOST, tmp_path)

    def apply_fn(params, x, t):
        return params * x

    # The same guided chain written out: (1 + w)(p x + 0.2 y) - w (p x + 0.2 * 3).
    guided_fn = lambda y: lambda x, t: 0.5 * x + 0.2 * (2.5 * y - 1.5 * 3.0)  # noqa: E731
    schedule, key = Schedule.create("linear", 10), jax.random.key(7)
    single = make_sampler(apply_fn, schedule, (4, 4, 4, 3), SamplerSpec(sampler="ddpm", steps=4))
    expected = sampling.draw_images(single, jnp.float32(0.5), key, 6, progress=False)
    labels = np.array([0, 1, 2, 0, 1, 2])
    expected_guided = np.concatenate([
        np.asarray(sampling.to_uint8(sample(guided_fn(labels[n]), schedule, (1, 4, 4, 3), key,
                                            steps=4, example_offset=n)["images"]))
        for n in range(6)])
    expected_solver = np.concatenate([
        np.asarray(sampling.to_uint8(sample(guided_fn(labels[n]), schedule, (1, 4, 4, 3), key,
                                            sampler="dpm++", steps=4, example_offset=n)["images"]))
        for n in range(6)])
    hosts = [np.load(out) for out in outs]
    assert hosts[0].shape == (3, 6, 4, 4, 3)
    assert np.abs(hosts[0][2].astype(int) - expected_solver.astype(int)).max() <= 1
    np.testing.assert_array_equal(hosts[0], hosts[1])
    assert np.abs(hosts[0][0].astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(hosts[0][1].astype(int) - expected_guided.astype(int)).max() <= 1
    assert np.abs(hosts[0][1].astype(int) - hosts[0][0].astype(int)).max() > 5


class _ClassShift(nn.Module):
    """eps(x_t, t, y) = 0.1 x_t + e[y], with y=None meaning the null label (as in the UNet); with
    learned_var also a per-class variance output v[y] (C more channels)."""

    num_classes: int = 2
    learned_var: bool = False

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        spread = lambda lo, hi: (lambda key, shape: jnp.linspace(lo, hi, shape[0])[:, None]  # noqa: E731
                                 * jnp.ones(shape))
        shape = (self.num_classes + 1, x.shape[-1])
        e = self.param("e", spread(-0.5, 0.5), shape)
        if y is None:
            y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        eps = 0.1 * x + e[y][:, None, None, :]
        if not self.learned_var:
            return eps
        v = self.param("v", spread(-0.8, 0.6), shape)
        return jnp.concatenate([eps, jnp.broadcast_to(v[y][:, None, None, :], x.shape)], -1)


def _class_shift(learned_var=False, shape=(2, 4, 4, 1)):
    model = _ClassShift(learned_var=learned_var)
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32),
                        train=False)["params"]
    return model, params


def test_class_conditional_samples_through_model_denoise_fn_and_null_label_through_model_apply():
    model, params = _class_shift()
    schedule = Schedule.create("linear", 20)
    key = jax.random.key(5)

    def images(y):
        fn = sampling.model_denoise_fn(model, params, y)
        return np.asarray(sample(fn, schedule, (2, 4, 4, 1), key, sampler="ddim", steps=5)["images"])

    first, second = images(jnp.zeros((2,), jnp.int32)), images(jnp.ones((2,), jnp.int32))
    null = images(jnp.full((2,), 2, jnp.int32))
    assert np.abs(first - second).max() > 1e-3  # the label reaches the chain
    sampler = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1),
                           SamplerSpec(sampler="ddim", steps=5))
    np.testing.assert_allclose(np.asarray(sampler(params, key)["images"]), null, atol=1e-6)


def test_labels_as_data_match_the_closure_and_do_not_retrace():
    model, params = _class_shift()
    schedule = Schedule.create("linear", 20)
    key, labels = jax.random.key(5), np.array([1, 0], np.int32)
    closure = sample(sampling.model_denoise_fn(model, params, jnp.asarray(labels)), schedule,
                     (2, 4, 4, 1), key, steps=5)["images"]
    sampler = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1), SamplerSpec(steps=5))
    np.testing.assert_allclose(np.asarray(sampler(params, key, labels=labels)["images"]),
                               np.asarray(closure), atol=1e-6)
    cached = reverse.chain_jit(True)._cache_size()
    sampler(params, key, labels=np.array([0, 0]))  # new labels: new data for the same program
    assert reverse.chain_jit(True)._cache_size() == cached


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
@pytest.mark.parametrize("learned_var", [False, True])
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_guidance_equals_a_model_with_the_guided_prediction(learned_var, w, sampler):
    """(1 + w) eps(y) - w eps(null) of the class-shift model is the class-shift model with offsets
    (1 + w) e[y] - w e[null] (the 0.1 x_t terms mix to themselves); a learned variance must stay
    the conditional one, so v is left as it is."""
    model, params = _class_shift(learned_var)
    e = np.asarray(params["e"], np.float64)
    guided = dict(params, e=jnp.asarray((1 + w) * e - w * e[-1:], jnp.float32))
    schedule = Schedule.create("linear", 20)
    key, labels = jax.random.key(8), np.array([0, 1], np.int32)
    options = dict(steps=6, var_type="learned_range" if learned_var else "fixedlarge",
                   sampler=sampler)
    reference = sample(sampling.model_denoise_fn(model, guided, jnp.asarray(labels)), schedule,
                       (2, 4, 4, 1), key, **options)["images"]
    sampler = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1),
                           **spec_and_options(guidance=w, **options))
    out = np.asarray(sampler(params, key, labels=labels)["images"])
    np.testing.assert_allclose(out, np.asarray(reference), atol=1e-5)
    if w:
        plain = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1),
                             **spec_and_options(**options))
        assert np.abs(out - np.asarray(plain(params, key, labels=labels)["images"])).max() > 1e-3


def test_bad_labels_and_guidance_are_named():
    model, params = _class_shift()
    schedule = Schedule.create("linear", 20)
    sampler = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1), SamplerSpec(steps=3))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"labels must be 2 integers"):
        sampler(params, key, labels=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must be 2 integers"):
        sampler(params, key, labels=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 \(or 2, the null label\)"):
        sampler(params, key, labels=np.array([0, 3]))
    for bad in (-1.0, float("inf"), float("nan"), 1e30):
        with pytest.raises(ValueError, match=re.escape(f"guidance={bad!r}: use a finite number "
                                                       ">= 0 and <= 1000")):
            make_sampler(ModelApply(model), schedule, (2, 4, 4, 1), guidance=bad)
    guided = make_sampler(ModelApply(model), schedule, (2, 4, 4, 1),
                          SamplerSpec(steps=3), guidance=1.0)
    with pytest.raises(ValueError, match=r"built with guidance: pass labels"):
        guided(params, key)
    unconditional, uparams = tiny()
    with pytest.raises(ValueError, match=r"guidance needs a class-conditional model"):
        make_sampler(ModelApply(unconditional), schedule, SHAPE, guidance=1.0)
    with pytest.raises(ValueError, match=r"guidance needs a class-conditional model"):
        make_sampler(lambda p, x, t: x, schedule, SHAPE, guidance=1.0)
    plain = make_sampler(ModelApply(unconditional), schedule, SHAPE, SamplerSpec(steps=3))
    with pytest.raises(ValueError, match=r"the model is unconditional"):
        plain(uparams, key, labels=np.zeros(SHAPE[0], np.int32))
    with pytest.raises(ValueError, match=r"one class per image, shape \[3\]"):
        sampling.draw_images(sampler, params, key, 3, labels=[0, 1], progress=False)


def test_draw_images_with_labels_does_not_depend_on_the_batch_size():
    model, params = _class_shift()
    schedule = Schedule.create("linear", 20)
    labels = np.array([0, 1, 1, 0, 1])
    key = jax.random.key(3)
    small, large = (make_sampler(ModelApply(model), schedule, (b, 4, 4, 1),
                                 SamplerSpec(steps=4), guidance=0.5)
                    for b in (2, 8))
    a = sampling.draw_images(small, params, key, 5, labels=labels, progress=False)
    b = sampling.draw_images(large, params, key, 5, labels=labels, progress=False)
    assert a.shape == (5, 4, 4, 1)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    other = sampling.draw_images(small, params, key, 5, labels=1 - labels, progress=False)
    assert np.abs(a.astype(int) - other.astype(int)).max() > 5  # the labels reach the images


def test_with_plan_runs_another_plan_in_the_same_compiled_chain():
    # A hand-made plan (DDIM at eta 1 instead of the sampler's 0) through with_plan equals the
    # sampler built for it, with one trace of the model for both; another length is refused.
    from ddpm_jax.spec import SamplerSpec
    schedule = Schedule.create("linear", 50)
    traces = []

    def apply_fn(params, x_t, t):
        traces.append(1)
        return 0.5 * x_t + params * t[:, None, None, None] / 50.0

    shape = (4, 2, 2, 1)
    base = make_sampler(apply_fn, schedule, shape, SamplerSpec(sampler="ddim", steps=10, eta=0.0))
    eta_one = SamplerSpec(sampler="ddim", steps=10, eta=1.0)
    moved = base.with_plan(eta_one.plan(schedule))
    key = jax.random.key(3)
    got = moved(jnp.float32(0.1), key)["images"]
    assert len(traces) == 1
    want = make_sampler(apply_fn, schedule, shape, eta_one)(jnp.float32(0.1), key)["images"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(base(jnp.float32(0.1), key)["images"]))
    with pytest.raises(ValueError, match="with_plan needs a plan with the fields and shapes"):
        base.with_plan(SamplerSpec(sampler="ddim", steps=12).plan(schedule))
    with pytest.raises(ValueError, match="fields and shapes"):
        base.with_plan(SamplerSpec(sampler="dpm++", steps=10).plan(schedule))
