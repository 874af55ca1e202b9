"""Editing on the chain (ddpm_jax/editing/chain.py and the sampler's start options): RePaint, SDEdit,
DDIM inversion, interpolation. The distributions are checked against closed forms: for Gaussian
data the optimal noise predictor is analytic, so the true conditional law of the unknown pixels,
the law of an SDEdit output and the ODE's encoding are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import editing
from ddpm_jax.editing import (ddim_encode, q_interpolate, repaint, repaint_moves, sdedit_start_t,
                              slerp)
from ddpm_jax.images import to_uint8
from ddpm_jax.plans import make_plan
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec, spec_and_options
from reference import assert_follows_gaussian, gaussian_chain_law, scaled_linear


class GaussianEps:
    """The optimal eps for data x0 ~ N(mu, cov) over the D = H*W*C pixels of an image:
    E[eps | x_t] = sqrt(1 - a) (a cov + (1 - a) I)^-1 (x_t - sqrt(a) mu), a = abar_t.
    Hashable by identity of its tables, as the sampler's compile cache needs."""

    def __init__(self, betas, mu, cov):
        self.abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
        self.mu = np.asarray(mu, np.float64)
        dim = self.mu.size
        self.mats = np.stack([np.sqrt(1 - a) * np.linalg.inv(a * cov + (1 - a) * np.eye(dim))
                              for a in self.abar])

    def __call__(self, params, x_t, t):
        del params
        a = jnp.asarray(self.abar, jnp.float32)[t][:, None]
        flat = x_t.reshape(x_t.shape[0], -1) - jnp.sqrt(a) * jnp.asarray(self.mu, jnp.float32)[None, :]
        eps = jnp.einsum("bij,bj->bi", jnp.asarray(self.mats, jnp.float32)[t], flat)
        return eps.reshape(x_t.shape)


# 2x2 images, one channel: strongly correlated pixels; the top row is known.
MU = np.array([0.2, -0.1, 0.3, 0.0])
COV = 0.25 * np.array([[1.0, 0.8, 0.6, 0.5], [0.8, 1.0, 0.7, 0.6],
                       [0.6, 0.7, 1.0, 0.8], [0.5, 0.6, 0.8, 1.0]])
KNOWN, UNKNOWN = [0, 1], [2, 3]


def _walk(moves):
    """Replays a route: each reverse move at i must leave X_i, each forward move at i leave
    X_{i-1}. Returns the final state index and how often each X_k was landed on downwards."""
    state = int(moves["index"][0])
    landings = {}
    for reverse, i in zip(moves["reverse"], moves["index"]):
        if reverse:
            assert i == state, (i, state)
            state -= 1
            landings[state] = landings.get(state, 0) + 1
        else:
            assert i == state + 1, (i, state)
            state += 1
    return state, landings


@pytest.mark.parametrize("steps, jump, resamplings", [(20, 2, 3), (25, 10, 10), (30, 1, 4),
                                                      (12, 5, 1), (250, 10, 10)])
def test_repaint_route_walks_the_chain_and_resamples_every_jth_step(steps, jump, resamplings):
    moves = repaint_moves(steps, jump, resamplings)
    final, landings = _walk(moves)
    assert final == -1 and moves["index"][0] == steps - 1 and moves["reverse"][0]
    jump_points = [k for k in range(steps) if k % jump == 0 and k + jump <= steps - 1]
    for k in range(-1, steps - 1):
        # X_k is reached once per pass over it: r passes for every k of a jump segment below
        # a jump point's top (k in [p, p + j) ... counted from p's resamplings), else once.
        resampled = sum(1 for p in jump_points if p <= k < p + jump) if resamplings > 1 else 0
        assert landings[k] == 1 + resampled * (resamplings - 1), k
    expected = steps + 2 * (resamplings - 1) * jump * len(jump_points)
    assert len(moves["index"]) == expected
    if resamplings == 1:
        np.testing.assert_array_equal(moves["index"], np.arange(steps - 1, -1, -1))


def test_repaint_route_refuses_bad_values():
    with pytest.raises(ValueError, match="jump_length"):
        repaint_moves(10, 10, 2)
    with pytest.raises(ValueError, match="resamplings"):
        repaint_moves(10, 2, 0)


def _inpaint_gaussian(resamplings, num, key, timesteps=250):
    betas = scaled_linear(timesteps)
    plan = make_plan(Schedule.from_betas(betas))
    given = np.array([0.6, 0.1])
    images = np.zeros((num, 2, 2, 1), np.float32)
    images[:, 0, :, 0] = given
    mask = np.zeros((num, 2, 2, 1), bool)
    mask[:, 0] = True
    out = repaint(GaussianEps(betas, MU, COV), None, plan, repaint_moves(timesteps, 10, resamplings),
                  jax.random.key(key), images, mask, clip_denoised=False, var_type="fixedsmall")
    return np.asarray(out, np.float64).reshape(num, 4), given


def test_repaint_keeps_the_known_pixels_exactly():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 2, 2, 1)).astype(np.uint8)
    mask = rng.random((8, 2, 2, 1)) < 0.5
    betas = scaled_linear(40)
    plan = make_plan(Schedule.from_betas(betas))
    out = repaint(GaussianEps(betas, MU, COV), None, plan, repaint_moves(40, 5, 3),
                  jax.random.key(1), pixels / 127.5 - 1.0, mask)
    np.testing.assert_array_equal(to_uint8(out)[mask], pixels[mask])
    np.testing.assert_array_equal(np.asarray(out)[mask], (pixels / 127.5 - 1.0).astype(np.float32)[mask])
    assert np.abs(to_uint8(out)[~mask].astype(int) - pixels[~mask]).max() > 0  # the rest is drawn


@pytest.mark.slow
def test_repaint_samples_the_true_conditional_law_of_gaussian_data():
    # x_u | x_k ~ N(mu_u + C_uk C_kk^-1 (x_k - mu_k), C_uu - C_uk C_kk^-1 C_ku), in float64.
    num = 3000
    out, given = _inpaint_gaussian(10, num, key=2)
    c_uk, c_kk = COV[np.ix_(UNKNOWN, KNOWN)], COV[np.ix_(KNOWN, KNOWN)]
    mean = MU[UNKNOWN] + c_uk @ np.linalg.solve(c_kk, given - MU[KNOWN])
    cov = COV[np.ix_(UNKNOWN, UNKNOWN)] - c_uk @ np.linalg.solve(c_kk, c_uk.T)
    stderr = np.sqrt(np.diag(cov) / num)
    np.testing.assert_allclose(out[:, KNOWN], np.broadcast_to(given, (num, 2)), atol=1e-6)
    assert np.all(np.abs(out[:, UNKNOWN].mean(0) - mean) < 4 * stderr), (out[:, UNKNOWN].mean(0), mean)
    # RePaint approximates the conditional: the resampled chain's covariance was measured 6-8%
    # under the true one (T = 250, j = r = 10); without resampling it is 15% over and the mean
    # misses by 7 standard errors (below).
    sample_cov = np.cov(out[:, UNKNOWN].T)
    assert np.linalg.norm(sample_cov - cov) / np.linalg.norm(cov) < 0.1, (sample_cov, cov)
    plain, _ = _inpaint_gaussian(1, num, key=2)
    assert np.any(np.abs(plain[:, UNKNOWN].mean(0) - mean) > 4 * stderr), plain[:, UNKNOWN].mean(0)


def test_repaint_compiles_once_for_two_routes_of_equal_length():
    a, b = repaint_moves(20, 2, 2), repaint_moves(20, 3, 2)
    assert len(a["index"]) == len(b["index"]) == 56 and not np.array_equal(a["index"], b["index"])
    betas = scaled_linear(20)
    plan = make_plan(Schedule.from_betas(betas))
    eps = GaussianEps(betas, MU, COV)
    images, mask = np.zeros((4, 2, 2, 1), np.float32), np.ones((4, 2, 2, 1), bool)
    mask[:, 1] = False
    before = editing.chain._repaint_jit()._cache_size()
    outs = [repaint(eps, None, plan, moves, jax.random.key(3), images, mask) for moves in (a, b)]
    assert editing.chain._repaint_jit()._cache_size() == before + 1
    assert not np.allclose(outs[0], outs[1])  # the routes differ, and so do their draws


def test_repaint_refuses_moves_of_another_chain():
    plan = make_plan(Schedule.from_betas(scaled_linear(50)))
    with pytest.raises(ValueError, match="repaint_moves"):
        repaint(None, None, plan, repaint_moves(60, 2, 2), jax.random.key(0),
                np.zeros((1, 2, 2, 1)), np.ones((1, 2, 2, 1)))


# --------------------------------------------------------------------------------- SDEdit

def _independent_gaussian(timesteps, mu=0.3, s=0.2):
    betas = scaled_linear(timesteps)
    return betas, GaussianEps(betas, np.full(4, mu), s**2 * np.eye(4))


def test_sdedit_start_t_maps_strength_to_a_timestep():
    assert sdedit_start_t(1000, 1.0) == 999 and sdedit_start_t(1000, 0.5) == 499
    assert sdedit_start_t(1000, 1e-6) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sdedit_start_t(1000, bad)


@pytest.mark.parametrize("sampler, options", [("ddpm", dict(var_type="fixedsmall")),
                                              ("ddim", dict(steps=50))])
def test_sdedit_output_follows_the_law_of_the_chain_started_at_the_guide(sampler, options):
    mu, s, guide = 0.3, 0.2, -0.6
    betas, eps = _independent_gaussian(1000, mu, s)
    t0 = sdedit_start_t(1000, 0.1)
    num = 512
    chain = make_sampler(eps, Schedule.from_betas(betas), (num, 2, 2, 1),
                         **spec_and_options(sampler=sampler, start_t=t0, clip_denoised=False, **options))
    kept = np.asarray(chain.plan.timesteps)
    assert kept[-1] == t0 and np.all(np.diff(kept) > 0)
    x = np.asarray(chain(None, jax.random.key(4), init=np.full((num, 2, 2, 1), guide, np.float32),
                         start="q_x0")["images"], np.float64).ravel()
    abar = np.cumprod(1.0 - betas)[t0]
    mean, var = gaussian_chain_law(betas, kept, mu, s, sampler,
                                   start=(np.sqrt(abar) * guide, 1.0 - abar))
    # The guide shows: the same chain started from N(0, 1) ends elsewhere (0.22 against 0.07).
    from_noise, _ = gaussian_chain_law(betas, kept, mu, s, sampler)
    assert abs(mean - from_noise) > 20 * np.sqrt(var / x.size), (mean, from_noise)
    # ... and the samples follow the chain's law: 2048 draws, 5 standard errors.
    assert_follows_gaussian(x, mean, var)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_sdedit_at_strength_near_zero_returns_the_input(sampler):
    betas, eps = _independent_gaussian(1000)
    rng = np.random.default_rng(5)
    guide = rng.uniform(-0.9, 0.9, (16, 2, 2, 1)).astype(np.float32)
    options = dict(order=1) if sampler == "dpm++" else {}
    chain = make_sampler(eps, Schedule.from_betas(betas), guide.shape,
                         **spec_and_options(sampler=sampler, start_t=sdedit_start_t(1000, 1e-3), **options))
    out = np.asarray(chain(None, jax.random.key(6), init=guide, start="q_x0")["images"])
    # One step at t = 0: noise of std sqrt(beta_0) = 0.01, then x0_hat (shrunk ~0.25% to mu).
    assert np.abs(out - guide).max() < 0.05
    assert np.abs(out - guide).max() > 0  # noise was added and removed, not skipped


def test_the_sampler_checks_its_start_arguments():
    betas, eps = _independent_gaussian(50)
    chain = make_sampler(eps, Schedule.from_betas(betas), (2, 2, 2, 1))
    with pytest.raises(ValueError, match="needs init"):
        chain(None, jax.random.key(0), start="q_x0")
    with pytest.raises(ValueError, match="takes no init"):
        chain(None, jax.random.key(0), init=np.zeros((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="shape"):
        chain(None, jax.random.key(0), init=np.zeros((3, 2, 2, 1)), start="x_t")
    with pytest.raises(ValueError, match="start"):
        chain(None, jax.random.key(0), init=np.zeros((2, 2, 2, 1)), start="x0")
    with pytest.raises(ValueError, match="start_t"):
        make_sampler(eps, Schedule.from_betas(betas), (2, 2, 2, 1), start_t=50)


# ------------------------------------------------------------------------ DDIM inversion

def test_ddim_inversion_converges_to_the_ode_solution_and_decodes_back():
    mu, s = 0.3, 0.2
    betas, eps = _independent_gaussian(1000, mu, s)
    schedule = Schedule.from_betas(betas)
    data = (mu + s * np.random.default_rng(7).standard_normal((256, 2, 2, 1))).astype(np.float32)
    # For Gaussian data the probability-flow ODE is affine: x_t = sqrt(a) mu + sqrt(a s^2 + 1 - a)
    # (x_0 - mu) / s, a = abar_t; the encoder must approach it at t = T-1 as the steps grow.
    a = np.cumprod(1.0 - betas)[-1]
    exact = np.sqrt(a) * mu + np.sqrt(a * s**2 + 1 - a) * (data - mu) / s
    errors = {}
    for steps in (100, 1000):
        decoder = make_sampler(eps, schedule, data.shape,
                               SamplerSpec(sampler="ddim", steps=steps, clip_denoised=False))
        latents = ddim_encode(eps, None, decoder.plan, data)
        back = decoder(None, jax.random.key(0), init=latents, start="x_t")["images"]
        errors[steps] = (np.abs(np.asarray(latents, np.float64) - exact).max(),
                         np.abs(np.asarray(back) - data).max())
    # First order in the step (measured: latents 0.153 -> 0.0114, round trip 0.069 -> 0.0071).
    assert errors[1000][0] < 0.02 and errors[1000][1] < 0.015, errors
    for k in (0, 1):
        assert 5 < errors[100][k] / errors[1000][k] < 20, errors


# ------------------------------------------------------------------------- interpolation

def test_q_interpolate_mixes_two_forward_samples_with_shared_noise():
    rng = np.random.default_rng(8)
    a, b, z = (rng.standard_normal((2, 2, 1)).astype(np.float32) for _ in range(3))
    s = np.sqrt(0.7)
    out = np.asarray(q_interpolate(s, a, b, z, [0.0, 0.25, 1.0]))
    np.testing.assert_allclose(out[0], s * a + np.sqrt(0.3) * z, rtol=1e-6)
    np.testing.assert_allclose(out[2], s * b + np.sqrt(0.3) * z, rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.75 * out[0] + 0.25 * out[2], rtol=1e-5, atol=1e-6)


def test_slerp_keeps_the_norm_between_orthogonal_latents():
    z0 = np.zeros((2, 2, 1), np.float32)
    z1 = np.zeros((2, 2, 1), np.float32)
    z0[0, 0, 0], z1[1, 1, 0] = 3.0, 3.0
    out = np.asarray(slerp(z0, z1, np.linspace(0, 1, 5)))
    np.testing.assert_allclose(np.linalg.norm(out.reshape(5, -1), axis=1), 3.0, rtol=1e-5)
    np.testing.assert_allclose(out[0], z0, atol=1e-6)
    np.testing.assert_allclose(out[-1], z1, atol=1e-6)
    np.testing.assert_allclose(out[2, 0, 0, 0], 3.0 * np.sqrt(0.5), rtol=1e-5)


def test_rows_that_share_an_index_share_their_noise():
    betas, eps = _independent_gaussian(50)
    chain = make_sampler(eps, Schedule.from_betas(betas), (4, 2, 2, 1),
                         SamplerSpec(var_type="fixedlarge"), start_t=20)
    init = np.full((4, 2, 2, 1), 0.4, np.float32)
    out = np.asarray(chain(None, jax.random.key(9), init=init, start="x_t",
                           rows=np.array([7, 7, 8, 8]))["images"])
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[2], out[3])
    assert not np.allclose(out[0], out[2])


def test_an_unbounded_repaint_route_is_refused_up_front_with_its_length_and_memory():
    # Before: --resamplings 1000000 built the route in Python lists until the kernel killed the
    # process at about 24 GB. Now its length comes from arithmetic, nothing is built.
    from ddpm_jax.editing.chain import MAX_REPAINT_MOVES, repaint_route_length
    for steps, jump, resamplings in [(20, 2, 3), (25, 10, 10), (12, 5, 1), (7, 3, 2)]:
        moves = repaint_moves(steps, jump, resamplings)
        assert repaint_route_length(steps, jump, resamplings) == (len(moves["index"]),
                                                                  int(moves["reverse"].sum()))
    # 250 + 2 (r - 1) 10 ceil(240 / 10) moves, 44 + 5 bytes each while built and held.
    length = 250 + 2 * (1_000_000 - 1) * 10 * 24
    with pytest.raises(ValueError) as refused:
        repaint_moves(250, 10, 1_000_000)
    assert str(refused.value) == (
            f"--resamplings=1000000 with --jump_length=10 over 250 steps makes a RePaint route of "
            f"{length:,} moves (about {length * 49 / 1e9:,.1f} GB to build; 240,000,010 network "
            f"calls per image), over the bound of {MAX_REPAINT_MOVES:,} moves: lower "
            "--resamplings (RePaint uses 10), --jump_length or --steps.")
