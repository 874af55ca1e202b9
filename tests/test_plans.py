"""Respacing and sampling plans (`ddpm_jax.plans`) against improved-diffusion's semantics and a
float64 recomputation of the kept alphabar."""

import numpy as np
import pytest

from ddpm_jax import plans
from ddpm_jax.plans import space_timesteps
from ddpm_jax.schedule import Schedule
from reference import reference_dpm_weights, reference_sde_dpm_weights, scaled_linear

T = 50


def test_space_timesteps_follow_improved_diffusion():
    np.testing.assert_array_equal(space_timesteps(1000, "ddim10"), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(space_timesteps(1000, 4), [0, 333, 666, 999])
    np.testing.assert_array_equal(space_timesteps(100, "3,2"), [0, 24, 49, 50, 99])
    np.testing.assert_array_equal(space_timesteps(T, T), np.arange(T))
    for bad in ("ddim7x", "ddim999", "a,b", [0], [T + 1]):
        with pytest.raises(ValueError):
            space_timesteps(T, bad)


def test_respace_keeps_alphabar_and_maps_to_original_t():
    betas = scaled_linear(T)
    kept = np.array([0, 7, 19, 33, 49])
    spaced, timestep_map = plans.respace(Schedule.from_betas(betas), kept)
    np.testing.assert_array_equal(timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=2e-6)
    assert spaced.num_timesteps == kept.size


def half_log_snr(betas: np.ndarray) -> np.ndarray:
    abar = np.cumprod(1.0 - betas)
    return np.log(np.sqrt(abar) / np.sqrt(1.0 - abar))


@pytest.mark.parametrize("num_steps", [2, 10, 20, 400])
def test_logsnr_spacing_is_uniform_in_log_snr(num_steps):
    betas = np.linspace(1e-4, 0.02, 1000)
    kept = plans.logsnr_timesteps(Schedule.from_betas(betas), num_steps)
    assert kept.size == num_steps and np.all(np.diff(kept) > 0)
    assert kept[0] == 0 and kept[-1] == 999
    lam = half_log_snr(betas)
    targets = np.linspace(lam[0], lam[-1], num_steps)
    if num_steps <= 20:  # few steps: no collisions, each kept t is the nearest in lambda
        nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
        np.testing.assert_array_equal(kept, nearest)
    # Many steps crowd near t = 0 (lambda moves fastest there): those take the consecutive
    # t = 0, 1, ..., m-1; past them every kept t is within one t-step's lambda change of its target.
    m = int(np.argmax(kept > np.arange(num_steps)))
    np.testing.assert_array_equal(kept[:m], np.arange(m))
    gap = np.abs(lam[kept] - targets)[m:]
    local = np.abs(np.diff(lam))[np.minimum(kept[m:], len(lam) - 2)] + np.abs(np.diff(lam))[
        np.maximum(kept[m:] - 1, 0)]
    assert np.all(gap <= local), (gap - local).max()
    assert num_steps < 400 or 100 < m < 300  # the crowded prefix exists and ends


@pytest.mark.parametrize("order, num_steps, spacing", [(1, 7, "time"), (2, 10, "logsnr"),
                                                       (2, 16, "time")])
def test_dpm_solver_weights_follow_the_published_update(order, num_steps, spacing):
    betas = scaled_linear(T)
    schedule = Schedule.from_betas(betas)
    plan = plans.make_plan(schedule, steps=num_steps, spacing=spacing, order=order)
    kept = np.asarray(plan.timesteps)
    coef_xt, coef_x0 = np.asarray(plan.dpm_coef_xt), np.asarray(plan.dpm_coef_x0)
    assert coef_x0.shape == (num_steps, order)
    for i, (xt, w) in enumerate(reference_dpm_weights(betas, kept, order)):
        np.testing.assert_allclose(coef_xt[i], xt, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(coef_x0[i], w[:order], rtol=1e-5, atol=1e-7)
    # The weights of x0_hat sum to alpha_{i-1} (1 - e^{-h}) whatever the order: consistency.
    if order == 1:  # order 1 is DDIM with eta = 0 on the same grid
        np.testing.assert_allclose(coef_xt, plan.ddim_coef_xt, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(coef_x0[:, 0], plan.ddim_coef_x0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order, num_steps, spacing", [(1, 7, "time"), (2, 10, "logsnr"),
                                                       (2, 16, "time")])
def test_sde_dpm_solver_weights_follow_the_published_update(order, num_steps, spacing):
    betas = scaled_linear(T)
    plan = plans.make_plan(Schedule.from_betas(betas), steps=num_steps, spacing=spacing,
                           order=order, sde=True)
    kept = np.asarray(plan.timesteps)
    coef_xt, coef_x0 = np.asarray(plan.dpm_coef_xt), np.asarray(plan.dpm_coef_x0)
    coef_z = np.asarray(plan.dpm_coef_z)
    assert coef_x0.shape == (num_steps, order)
    for i, (xt, w, z) in enumerate(reference_sde_dpm_weights(betas, kept, order)):
        np.testing.assert_allclose(coef_xt[i], xt, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(coef_x0[i], w[:order], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(coef_z[i], z, rtol=1e-5, atol=1e-7)
    if order == 1:  # order 1 is DDIM with eta = 1 on the same grid
        ddim = plans.make_plan(Schedule.from_betas(betas), steps=num_steps, spacing=spacing,
                               eta=1.0)
        np.testing.assert_allclose(coef_xt, ddim.ddim_coef_xt, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(coef_x0[:, 0], ddim.ddim_coef_x0, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(coef_z[1:], ddim.ddim_sigma[1:], rtol=1e-5, atol=1e-7)
    # The ODE solver's plan carries no noise.
    ode = plans.make_plan(Schedule.from_betas(betas), steps=num_steps, spacing=spacing, order=order)
    assert not np.asarray(ode.dpm_coef_z).any()


def test_sde_dpm_solver_refuses_order_three():
    with pytest.raises(ValueError, match="SDE-DPM-Solver\\+\\+ has orders 1 and 2; got order 3"):
        plans.make_plan(Schedule.from_betas(scaled_linear(T)), steps=10, order=3, sde=True)


def test_dpm_solver_order_rules_warm_up_and_lower_order_final():
    schedule = Schedule.from_betas(scaled_linear(T))
    for num_steps, second_last_order in ((10, 2), (20, 3)):
        coef_x0 = np.asarray(plans.make_plan(schedule, steps=num_steps, order=3).dpm_coef_x0)
        used = (coef_x0 != 0).sum(axis=1)[::-1]  # effective order per step, in chain order
        assert list(used[:3]) == [1, 2, 3] and used[-1] == 1
        assert used[-2] == second_last_order  # diffusers' lower_order_final below 15 steps
        assert np.all(used[3:-2] == 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=10, order=4), "order must be 1, 2 or 3"), (dict(steps=10, order=0), "order"),
    (dict(steps=2, order=3), "needs at least 3 steps"),
    (dict(steps=10, spacing="karras"), "Unknown spacing"),
    (dict(steps="ddim10", spacing="logsnr"), "needs an int number of steps"),
])
def test_bad_solver_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plans.make_plan(Schedule.from_betas(scaled_linear(T)), **kwargs)


def test_a_plan_started_part_way_keeps_the_spaced_timesteps_below_its_start():
    schedule = Schedule.from_betas(scaled_linear(1000))
    plan = plans.make_plan(schedule, steps=10, start_t=500)
    full = np.round(np.linspace(0, 999, 10)).astype(int)
    np.testing.assert_array_equal(plan.timesteps, np.append(full[full < 500], 500))
    abar = np.cumprod(1.0 - scaled_linear(1000))
    np.testing.assert_allclose(plan.schedule.alphas_cumprod, abar[np.asarray(plan.timesteps)],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="start_t"):
        plans.make_plan(schedule, start_t=1000)


def test_plan_for_sampler_maps_sampler_options_to_the_plan():
    """Orders only for the DPM-Solver++ samplers (default 2), the SDE noise only for dpm++sde."""
    schedule = Schedule.create("linear", 100)

    def same(a: plans.SamplingPlan, b: plans.SamplingPlan) -> bool:
        fields = ("timesteps", "ddim_coef_xt", "dpm_coef_xt", "dpm_coef_x0", "dpm_coef_z")
        pairs = [(getattr(a, f), getattr(b, f)) for f in fields]
        return all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
                   for x, y in pairs)

    assert same(plans.plan_for_sampler(schedule, "dpm++", steps=10, spacing="logsnr"),
                plans.make_plan(schedule, steps=10, spacing="logsnr", order=2))
    assert same(plans.plan_for_sampler(schedule, "dpm++sde", steps=10, order=1),
                plans.make_plan(schedule, steps=10, order=1, sde=True))
    ddim = plans.plan_for_sampler(schedule, "ddim", steps=10, eta=0.5, order=3)
    assert ddim.dpm_coef_xt is None and same(ddim, plans.make_plan(schedule, steps=10, eta=0.5))
    sde = plans.plan_for_sampler(schedule, "dpm++sde", steps=10)
    assert sde.dpm_coef_z is not None and np.sum(np.asarray(sde.dpm_coef_z) > 0) >= 9
    assert not np.any(np.asarray(plans.plan_for_sampler(schedule, "dpm++", steps=10).dpm_coef_z))
