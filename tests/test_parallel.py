"""Tests for the mesh, shardings and multi-host helpers (8 simulated CPU devices)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ddpm_jax import parallel
from conftest import xla_flags


def run_with_devices(code: str, num_devices: int = 8, timeout: float = 120.0) -> str:
    """Runs `code` in a fresh Python with `num_devices` CPU devices; returns its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(num_devices))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_mesh_shardings_and_host_local_to_global_on_8_devices():
    out = run_with_devices("""
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from ddpm_jax import parallel
        mesh = parallel.make_mesh()
        assert mesh.axis_names == ("data",) and mesh.size == 8, mesh
        assert parallel.data_sharding(mesh).spec == P("data")
        assert parallel.replicated(mesh).spec == P()
        assert parallel.local_rows(mesh, 16) == (0, 16)
        local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
        batch = parallel.host_local_to_global(local, mesh)
        assert batch["x"].shape == (16, 3)
        assert len(batch["x"].addressable_shards) == 8
        assert all(s.data.shape == (2, 3) for s in batch["x"].addressable_shards)
        np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_single_process_skips_distributed_initialisation(monkeypatch):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(ValueError, match="num_processes=None"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_make_mesh_orders_devices_by_host_and_rejects_an_empty_list():
    mesh = parallel.make_mesh(jax.devices()[::-1])
    ids = [d.id for d in mesh.devices.flat]
    assert ids == sorted(ids)
    with pytest.raises(ValueError, match="empty"):
        parallel.make_mesh([])


def test_local_rows_of_a_single_device_mesh_is_the_whole_batch():
    assert parallel.local_rows(parallel.make_mesh(), 8) == (0, 8)
    assert np.asarray(parallel.host_local_to_global(
        np.ones((4, 2)), parallel.make_mesh())).shape == (4, 2)


@pytest.mark.slow
def test_microbatches_keep_every_slice_on_every_device_and_match_one_pass():
    # Slice i of a batch split over 8 devices is rows i, i+M, ...: one row per device here, so
    # the compiled step gathers no batch rows; the update equals the one-pass update.
    out = run_with_devices("""
        import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, pytest
        from ddpm_jax import loop, parallel, training
        from ddpm_jax.schedule import Schedule
        from configs import digits

        class Toy(nn.Module):
            @nn.compact
            def __call__(self, x, t, y=None, *, train):
                w = self.param("w", nn.initializers.constant(0.3), (x.shape[-1],))
                return nn.Conv(x.shape[-1], (3, 3))(x) * w

        mesh = parallel.make_mesh()
        model, opt = Toy(), training.make_optimizer(grad_clip=1.0)
        schedule = jax.device_put(Schedule.create("linear", 50), parallel.replicated(mesh))
        image = jax.random.uniform(jax.random.PRNGKey(1), (32, 4, 4, 2), minval=-1, maxval=1)
        batch = jax.device_put({"image": image, "label": jnp.zeros((32,), jnp.int32)},
                               parallel.data_sharding(mesh))
        step, states = loop.jitted_train_step(mesh), {}
        for m, unroll in ((1, None), (4, False), (4, True)):
            state = loop.jitted_create_train_state(mesh)(model, opt, jax.random.PRNGKey(0),
                                                         image_shape=(4, 4, 2))
            kw = dict(model=model, optimizer=opt, base_lr=0.1, warmup_steps=3, ema_decay=0.9,
                      microbatches=m, unroll_microbatches=unroll)
            hlo = step.jitted.lower(state, batch, schedule, training.StepConfig(**kw)).compile()
            assert "all-gather" not in hlo.as_text() and "all-to-all" not in hlo.as_text()
            for _ in range(2):
                state, _ = step(state, batch, schedule, training.StepConfig(**kw))
            states[m, unroll] = state
        for key in ((4, False), (4, True)):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         states[key], states[1, None])

        config = digits.get_config("tiny")
        config.training.batch_size, config.training.microbatches = 16, 4
        with pytest.raises(ValueError, match="slices the batch of 16 into 4 rows, which do not "
                                             "split over the 8 devices"):
            loop.train_and_evaluate(config, "/nonexistent/never-created")
        print("ok")
    """)
    assert out.strip().endswith("ok")
