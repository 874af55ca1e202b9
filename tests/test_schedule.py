"""Beta schedules and the Schedule pytree against an independent float64 NumPy derivation.

Every expected value is computed here from REFERENCE.md (the official `get_beta_schedule` and
`GaussianDiffusion2.__init__`), never by calling `ddpm_jax.schedule`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.schedule import Schedule, get_beta_schedule
from reference import reference_betas, reference_tables

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")
FIELDS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixedlarge_variance",
    "fixedlarge_log_variance",
)


# --------------------------------------------------------------------------- get_beta_schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 50, 1000])
def test_beta_schedule_matches_official_definition(name, T):
    betas = get_beta_schedule(name, T)
    assert isinstance(betas, np.ndarray)
    assert betas.dtype == np.float64
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas, reference_betas(name, T), rtol=1e-12, atol=0)
    assert np.all(betas > 0) and np.all(betas <= 1)


def test_beta_schedule_custom_endpoints():
    betas = get_beta_schedule("linear", 50, beta_start=1e-3, beta_end=0.05)
    np.testing.assert_allclose(betas, reference_betas("linear", 50, 1e-3, 0.05), rtol=1e-12)
    betas = get_beta_schedule("warmup50", 50, beta_start=1e-3, beta_end=0.05)
    np.testing.assert_allclose(betas, reference_betas("warmup50", 50, 1e-3, 0.05), rtol=1e-12)


def test_linear_schedule_paper_endpoints():
    betas = get_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_jsd_alphas_cumprod_closed_form():
    # jsd: beta_i = 1/(T - i), so alphabar_i = prod_{k<=i} (T-1-k)/(T-k) = (T-1-i)/T; last is 0.
    T = 50
    abar = np.cumprod(1 - get_beta_schedule("jsd", T))
    np.testing.assert_allclose(abar, (T - 1 - np.arange(T)) / T, rtol=1e-12, atol=1e-15)
    assert get_beta_schedule("jsd", T)[-1] == 1.0


def test_const_alphas_cumprod_closed_form():
    T = 50
    abar = np.cumprod(1 - get_beta_schedule("const", T))
    np.testing.assert_allclose(abar, (1 - 0.02) ** np.arange(1, T + 1), rtol=1e-12)


def test_cosine_alphas_cumprod_follows_the_cosine():
    # Away from the 0.999 clip, alphabar_i = f((i+1)/T) / f(0) with f(u) = cos^2((u+s)/(1+s) pi/2).
    T, s = 1000, 0.008
    betas = get_beta_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = np.cumprod(1 - betas)
    unclipped = betas < 0.999
    assert unclipped[: T - 5].all() and betas[-1] == pytest.approx(0.999)
    np.testing.assert_allclose(abar[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-9)
    assert np.all(np.diff(betas) > 0)


def test_warmup_shapes():
    T = 50
    w10, w50 = get_beta_schedule("warmup10", T), get_beta_schedule("warmup50", T)
    assert (
        np.all(w10[5:] == 0.02) and w10[0] == pytest.approx(1e-4) and w10[4] == pytest.approx(0.02)
    )
    assert np.all(w50[25:] == 0.02) and w50[0] == pytest.approx(1e-4)
    assert np.all(np.diff(w50[:25]) > 0)


def test_unknown_schedule_raises_naming_it():
    with pytest.raises(ValueError, match="sigmoidal"):
        get_beta_schedule("sigmoidal", 10)


@pytest.mark.parametrize("T", [0, -3])
def test_bad_num_timesteps_raises_naming_it(T):
    with pytest.raises(ValueError, match=str(T)):
        get_beta_schedule("linear", T)


@pytest.mark.parametrize("kwargs", [{"beta_start": 0.0}, {"beta_start": -1e-3}, {"beta_end": 1.5}])
def test_betas_outside_unit_interval_raise(kwargs):
    with pytest.raises(ValueError):
        get_beta_schedule("linear", 10, **kwargs)


def test_betas_equal_one_allowed():
    # jsd ends with beta = 1 exactly; the official code asserts 0 < beta <= 1.
    Schedule.from_betas(get_beta_schedule("jsd", 10))


@pytest.mark.parametrize("betas", [[0.1, 0.0], [0.1, 1.5], [-0.1, 0.2]])
def test_from_betas_rejects_betas_outside_unit_interval(betas):
    with pytest.raises(ValueError):
        Schedule.from_betas(np.array(betas))


# --------------------------------------------------------------------------- Schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_schedule_tables_match_float64_derivation(name, T):
    sched = Schedule.create(name, T)
    ref = reference_tables(reference_betas(name, T))
    assert sched.num_timesteps == T
    for field in FIELDS:
        value = getattr(sched, field)
        assert isinstance(value, jax.Array), field
        assert value.dtype == jnp.float32, field
        assert value.shape == (T,), field
        # float32 storage of float64 math: only the final cast's rounding is allowed.
        np.testing.assert_allclose(
            np.asarray(value, np.float64), ref[field], rtol=2e-6, atol=1e-30, err_msg=field
        )


def test_schedule_boundary_conventions():
    sched = Schedule.create("linear", 10)
    ref = reference_tables(reference_betas("linear", 10))
    assert float(sched.alphas_cumprod_prev[0]) == 1.0
    assert float(sched.posterior_variance[0]) == 0.0
    # log(beta~) at index 0 is clipped to index 1's value; fixedlarge uses beta~_1 at index 0.
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(
        float(sched.fixedlarge_variance[0]), ref["posterior_variance"][1], rtol=2e-6
    )
    np.testing.assert_allclose(
        np.asarray(sched.fixedlarge_variance[1:]), ref["betas"][1:], rtol=2e-6
    )
    # At the first step the posterior mean is x0 itself.
    assert float(sched.posterior_mean_coef1[0]) == pytest.approx(1.0, abs=1e-7)
    assert float(sched.posterior_mean_coef2[0]) == 0.0


def test_create_matches_from_betas_and_custom_endpoints():
    a = Schedule.create("quad", 50, beta_start=1e-3, beta_end=0.05)
    b = Schedule.from_betas(reference_betas("quad", 50, 1e-3, 0.05))
    for field in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))


def test_create_default_is_paper_linear_1000():
    sched = Schedule.create()
    assert sched.num_timesteps == 1000
    np.testing.assert_allclose(np.asarray(sched.betas), reference_betas("linear", 1000), rtol=2e-6)


def test_schedule_is_a_pytree_usable_under_jit():
    sched = Schedule.create("cosine", 10)
    leaves = jax.tree_util.tree_leaves(sched)
    assert len(leaves) >= len(FIELDS)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)

    @jax.jit
    def f(s, t):
        return s.sqrt_alphas_cumprod[t] * s.sqrt_recip_alphas_cumprod[t]

    np.testing.assert_allclose(np.asarray(f(sched, jnp.arange(10))), np.ones(10), rtol=1e-6)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, sched)
    np.testing.assert_allclose(np.asarray(doubled.betas), 2 * np.asarray(sched.betas))
