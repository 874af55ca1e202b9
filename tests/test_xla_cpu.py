"""ddpm_jax.xla_cpu: the CPU compiler presets (and that they reach the compiler), and the
backend-dependent defaults that the model, the train step and the loop take from it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import loop, training, xla_cpu
from ddpm_jax.models.unet import GroupNorm
from ddpm_jax.spec import SamplerSpec


def test_xla_cpu_presets(monkeypatch):
    monkeypatch.delenv(xla_cpu.ENV_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert jax.default_backend() == "cpu"
    train, inference = xla_cpu.compiler_options("train"), xla_cpu.compiler_options("inference")
    assert train == {xla_cpu.OPTION: xla_cpu.PRESETS["train"]}
    assert inference == {xla_cpu.OPTION: ""}
    with pytest.raises(ValueError, match="kind"):
        xla_cpu.compiler_options("sampling")
    monkeypatch.setenv(xla_cpu.ENV_VAR, "xla")
    assert xla_cpu.compiler_options("train") is None
    monkeypatch.setenv(xla_cpu.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=xla_cpu.ENV_VAR):
        xla_cpu.compiler_options("train")
    monkeypatch.setenv(xla_cpu.ENV_VAR, "tuned")
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.OPTION}=-individual_convolution")
    assert xla_cpu.compiler_options("inference") is None  # the user's own XLA flag wins


def test_xla_cpu_inference_preset_reaches_the_compiler(monkeypatch):
    """Compiled under the inference preset, a conv + dot + reduction program holds no YNNPACK
    fusion, so the option is applied, not just returned."""
    monkeypatch.delenv(xla_cpu.ENV_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    x = jnp.ones((2, 8, 8, 4))
    k = jnp.ones((3, 3, 4, 4))

    def f(x, k):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y @ k[0, 0], axis=(1, 2))

    options = xla_cpu.compiler_options("inference")
    text = jax.jit(f, compiler_options=options).lower(x, k).compile().as_text()
    assert "__ynn_fusion" not in text
    np.testing.assert_allclose(jax.jit(f, compiler_options=options)(x, k), jax.jit(f)(x, k), rtol=1e-6)


def test_sampler_runs_inside_a_callers_jit():
    """The sampler's own jit carries compiler options; jax allows those only at top level, so
    traced inside another jit (inputs traced, or all concrete) it must still run, and agree."""
    from ddpm_jax.sampling import make_sampler
    from ddpm_jax.schedule import Schedule

    def apply_fn(params, x, t):
        return params * x + 0.01 * t[:, None, None, None].astype(x.dtype)

    sampler = make_sampler(apply_fn, Schedule.create("linear", 20), (2, 4, 4, 1),
                           SamplerSpec(sampler="ddpm", steps=5))
    params, key = jnp.float32(0.3), jax.random.key(3)
    top = sampler(params, key)["images"]
    inside = jax.jit(lambda p, k: sampler(p, k)["images"])(params, key)
    concrete = jax.jit(lambda: sampler(params, jax.random.key(3))["images"])()
    np.testing.assert_allclose(inside, top, atol=1e-6)
    np.testing.assert_allclose(concrete, top, atol=1e-6)


def test_backend_defaults_are_the_measured_cpu_choices_and_flip_elsewhere(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert xla_cpu.prefers_group_matmul() and xla_cpu.prefers_unrolled_gradient_loops()
    assert not xla_cpu.remat_pays()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not xla_cpu.prefers_group_matmul() and not xla_cpu.prefers_unrolled_gradient_loops()
    assert xla_cpu.remat_pays()
    assert xla_cpu.compiler_options("train") is None  # the presets are for the CPU only


@pytest.mark.parametrize("prefers", [True, False])
def test_model_step_and_loop_take_their_defaults_from_xla_cpu(monkeypatch, caplog, prefers):
    monkeypatch.setattr(xla_cpu, "prefers_group_matmul", lambda: prefers)
    monkeypatch.setattr(xla_cpu, "prefers_unrolled_gradient_loops", lambda: prefers)
    monkeypatch.setattr(xla_cpu, "remat_pays", lambda: not prefers)
    x = jnp.ones((2, 4, 4, 16))
    params = GroupNorm(4).init(jax.random.key(0), x)
    text = jax.jit(lambda p, x: GroupNorm(4).apply(p, x)).lower(params, x).as_text()
    assert ("dot_general" in text) == prefers
    assert training._unroll_loops(None) == prefers
    assert training._unroll_loops(not prefers) == (not prefers)  # an explicit choice wins
    from configs import digits
    config = digits.get_config()
    config.model.remat = True
    with caplog.at_level(logging.WARNING):
        assert loop.warn_if_remat_cannot_save_memory(config) == prefers
