"""Device mesh, shardings and multi-host start-up.

Training is data parallel: one mesh axis named "data" runs over every device of every host.
Parameters are replicated (`replicated(mesh)`), batches are split over the axis
(`data_sharding(mesh)`), and each host feeds only the rows that live on its own devices
(`host_local_to_global`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that announce a multi-process launch, with the process count they
# hold (None: the count is a comma-separated host list). These are the launchers that
# `jax.distributed.initialize()` detects by itself.
_PROCESS_COUNT_ENV = (
    ("SLURM_NTASKS", int),
    ("OMPI_COMM_WORLD_SIZE", int),
    ("TPU_WORKER_HOSTNAMES", lambda hosts: len(hosts.split(","))),
)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list; pass None to use jax.devices().")
    # Keep each host's devices contiguous so that a host's rows of a batch are contiguous.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the "data" axis, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device of the mesh (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, mesh: Mesh | None, spec: P = P(DATA_AXIS)) -> jax.Array:
    """x inside a jitted function, constrained to `spec` over `mesh` (default: the batch, the
    leading axis, split over "data"); x as it is without a mesh."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def round_up_to_devices(n: int, num_devices: int) -> int:
    """The smallest multiple of num_devices >= n: a batch of n rows that splits over the mesh."""
    return -(-n // num_devices) * num_devices


def _process_count_from_env() -> int | None:
    for name, parse in _PROCESS_COUNT_ENV:
        value = os.environ.get(name)
        if value:
            return parse(value)
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when this run has more than one process.

    Call before any other JAX call. With no arguments the process count comes from the
    launcher's environment (Slurm, Open MPI, Cloud TPU, or JAX_COORDINATOR_ADDRESS); a single
    process skips initialisation. Returns whether the distributed system is running.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            "initialize_distributed needs all of coordinator_address, num_processes and "
            f"process_id or none of them; got {coordinator_address=}, {num_processes=}, "
            f"{process_id=}. Pass all three, or none to detect them from the launcher."
        )
    if num_processes is None:
        num_processes = _process_count_from_env()
        if num_processes is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
            num_processes = -1  # jax reads the address and the rest from its own variables
    if num_processes is None or num_processes == 1:
        logging.info("Single process: jax.distributed not initialised.")
        return False
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        # Bind the coordinator service to the given address only, not every interface ([::]).
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   coordinator_bind_address=coordinator_address)
    logging.info("jax.distributed: process %d of %d, %d local of %d devices.",
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf as a jax.Array replicated over the mesh (params, keys, schedules).

    With one process this is device_put. With several, each process passes the same host-local
    values and they become one global array (device_put accepts only addressable shardings);
    leaves that are global arrays already are returned as they are.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))
    from jax.experimental import multihost_utils

    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf
        return multihost_utils.host_local_array_to_global_array(leaf, mesh, P())

    return jax.tree.map(one, tree)


def gather_to_host(tree: Any) -> Any:
    """Every leaf (a global array, e.g. sharded over "data") as a whole numpy array on every
    process; with one process, the device-to-host copy."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def map_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int, *,
                desc: str = "batches", progress: bool = True,
                to_host: Callable[[Any], Any] = gather_to_host) -> Any:
    """fn(start, *chunks) on consecutive batches of `arrays` (each [N, ...], the same N), the
    one "pad, run, gather, trim" loop of the package: the last batch is padded to batch_size by
    repeating its last row (so fn compiles once), each output pytree is brought to the host with
    `to_host` (default `gather_to_host`: a global array from every process; pass jax.device_get
    for arrays each process computed alone), its padding rows dropped, and the batches
    concatenated along axis 0. A tqdm bar counts batches on process 0 when progress is set."""
    from tqdm import tqdm

    total = len(arrays[0])
    if total == 0 or any(len(a) != total for a in arrays):
        raise ValueError(f"map_batches needs arrays of one non-zero length; got "
                         f"{[len(a) for a in arrays]}.")
    out = []
    for start in tqdm(range(0, total, batch_size), desc=desc, leave=False,
                      disable=not progress or jax.process_index() != 0):
        chunks = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - len(chunks[0])
        if pad:
            chunks = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunks]
        out.append(jax.tree.map(lambda x: np.asarray(x)[:batch_size - pad],
                                to_host(fn(start, *chunks))))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
    """Joins each host's rows into global arrays sharded over "data".

    batch: a pytree of host-local numpy arrays [B_local, ...]; every host passes the same
    structure with B_local = B / process_count rows. Returns global jax.Arrays [B, ...].
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def local_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(first row, row count) of a global batch that this host's devices hold."""
    sharding = data_sharding(mesh)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_batch_size if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    if sum(b - a for a, b in zip(starts, stops)) != stop - start:
        raise ValueError(
            f"This host's devices hold non-contiguous rows of the batch ({starts} .. {stops}); "
            "build the mesh with make_mesh(), which orders devices by host."
        )
    return start, stop - start
