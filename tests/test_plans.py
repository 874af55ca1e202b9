"""Respacing and sampling plans (`ddpm_jax.plans`) against improved-diffusion's semantics and a
float64 recomputation of the kept alphabar."""

import numpy as np
import pytest

from ddpm_jax import plans
from ddpm_jax.plans import space_timesteps
from ddpm_jax.schedule import Schedule

T = 50


def scaled_linear(num_timesteps: int) -> np.ndarray:
    """The paper's 1e-4..0.02 linear schedule stretched to T steps (abar_T ~ 4e-5 at any T)."""
    scale = 1000 / num_timesteps
    return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)


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
