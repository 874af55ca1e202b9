"""Tests for the mesh, shardings and multi-host helpers (8 simulated CPU devices)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ddpm_jax import parallel


def run_with_devices(code: str, num_devices: int = 8, timeout: float = 120.0) -> str:
    """Runs `code` in a fresh Python with `num_devices` CPU devices; returns its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


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
