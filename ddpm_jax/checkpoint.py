"""Orbax checkpoints of a training run: save, resume, verification and preemption (loading a
run for sampling: `runs`).

A run's work dir holds `checkpoints/<step>/` with four items:
  state      the whole `TrainState` (params, EMA, Adam, step, rng, non-finite counters);
  data       the grain iterator's position (one JSON file per process), when the input has one;
  config     the resolved config as JSON, checked on resume and used to rebuild the model;
  checksums  per array of `state`: its path in the tree, shape, dtype and the CRC-32 of its
             bytes, and the CRC-32 of the config, computed from the values being saved
             (orbax and tensorstore checksum no array data) and verified on every restore.

The checksums are an orbax item, written inside the step's temporary directory like the others,
so a step is listed only once its checksums are complete too. They are computed by every
process from its first addressable copy of each array (the state is replicated; an array of
which no process holds a whole copy is recorded without a checksum) and written by process 0.

Saves are asynchronous: orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a crash (even `kill -9`) mid-save leaves the previous checkpoint intact; the
half-written directory is never listed as a step and is removed when the next manager opens
(the trainer opens it only under the work-dir lock, ddpm_jax/lock.py, so that cleanup never
removes a live trainer's save in progress).
Preemption: with `jax.distributed` running, orbax's preemption sync point fires when a SIGTERM
arrives (JAX catches SIGTERM itself: do not install a Python SIGTERM handler).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocp_managers

from ddpm_jax import checksums as checksums_lib
from ddpm_jax import config as config_lib

Array = jax.Array
PyTree = Any

CHECKPOINT_DIR = "checkpoints"
STATE, DATA, CONFIG, CHECKSUMS = "state", "data", "config", "checksums"
# Config sections that fix what a checkpoint's weights mean; a resume must not change them.
# Compute-only knobs (the compute dtype, rematerialisation) may change between runs.
COMPATIBILITY_SECTIONS = ("model", "diffusion")
COMPATIBILITY_KEYS = ("data.image_size", "data.channels")
COMPUTE_ONLY_KEYS = ("model.dtype", "model.remat")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: from another config, or unreadable. Nothing deleted."""


class NonFiniteStateError(CheckpointError):
    """A save refused because the state holds NaN or inf: no checkpoint is ever non-finite."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax manager of workdir/checkpoints.

    Keeps the latest `max_to_keep` checkpoints plus every multiple of `keep_period` steps (the
    milestones; None or 0: none). When to save is decided by the caller (`save(..., step)`
    always writes): the loop knows its steps per dispatch and the preemption sync point.
    Leftover temporary directories of an interrupted save are removed on creation (unless
    read_only): open a writing manager only under the work-dir lock (`lock.hold`).
    """
    if max_to_keep < 1:
        raise ValueError(f"max_to_keep={max_to_keep}: keep at least 1 checkpoint "
                         "(config.training.keep_checkpoints).")
    policies: list[Any] = [ocp_managers.LatestN(n=max_to_keep)]
    if keep_period:
        policies.append(ocp_managers.EveryNSteps(interval_steps=keep_period))
    options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), as saved in the checkpoint."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _compatibility_view(config: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten(config_to_dict(config))
    keep = {k: v for k, v in flat.items()
            if k.split(".")[0] in COMPATIBILITY_SECTIONS or k in COMPATIBILITY_KEYS}
    return {k: v for k, v in keep.items() if k not in COMPUTE_ONLY_KEYS}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines `key: saved X, now Y` for every compatibility key that differs (sorted)."""
    old, new = _compatibility_view(saved), _compatibility_view(current)
    missing = object()

    def fmt(value: Any) -> str:
        return "(absent)" if value is missing else json.dumps(value)

    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            lines.append(f"{key}: saved {fmt(a)}, now {fmt(b)}")
    return lines


def check_config_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], *, step: int,
                            directory: str) -> None:
    """Raises CheckpointError naming the step and every differing key of model / diffusion /
    data image shape between a checkpoint's config and the current one."""
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointError(
                f"The checkpoint at step {step} in {directory} was written by a different "
                f"configuration ({len(diffs)} difference(s)):\n  " + "\n  ".join(diffs) +
                "\nResume with the original config (saved as config.json in the work dir), or "
                "start this config in a new --workdir. Nothing was deleted.")


@jax.jit
def _finite_leaves(tree: PyTree) -> Array:
    """[number of leaves] bool: whether each floating leaf is all finite (other leaves: True).
    One reduction per leaf on the devices; only this small vector goes to the host."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.asarray(True) for x in jax.tree.leaves(tree)])


def check_finite(manager: ocp.CheckpointManager, step: int, state: PyTree) -> None:
    """Raises NonFiniteStateError, naming the first non-finite array and the newest checkpoint
    (finite: every save passed this check), when any floating array of `state` holds NaN/inf."""
    finite = np.asarray(jax.device_get(_finite_leaves(state)))
    if finite.all():
        return
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
    bad = [path for path, ok in zip(paths, finite) if not ok]
    latest = manager.latest_step()
    newest = (f"the newest checkpoint, step {latest} in {manager.directory}, is finite: resume "
              "from it" if latest is not None else f"there is no checkpoint in {manager.directory}"
              " yet")
    raise NonFiniteStateError(
            f"Refused to save the checkpoint of step {step}: {bad[0]}"
            f"{f' and {len(bad) - 1} more arrays' if len(bad) > 1 else ''} hold NaN or inf; "
            f"{newest}. Lower training.lr, check training.ema_decay and the data for NaN/inf.")


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, config: Mapping[str, Any], *,
         data_iterator: Any | None = None) -> None:
    """Starts an (async) save of step `step`; all processes call it. Returns once the arrays
    are copied off the devices; `manager.wait_until_finished()` waits for the files.
    A state with NaN or inf anywhere is refused (NonFiniteStateError), nothing written."""
    check_finite(manager, step, state)
    config_dict = config_to_dict(config)
    # From the arrays being saved, before the (async) write starts.
    checksums = {"arrays": checksums_lib.array_checksums(state),
                 "config_crc32": checksums_lib.config_crc32(config_dict)}
    if data_iterator is not None:
        # One CRC per process (each writes its own iterator file), gathered on every process.
        checksums["data_crc32"] = _gather_ints(
                checksums_lib.config_crc32(data_iterator.get_state()))
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict),
             CHECKSUMS: ocp.args.JsonSave(checksums)}
    if data_iterator is not None:
        items[DATA] = _grain_args(save=True)(data_iterator)
    try:  # waits for the previous save first: its failure surfaces here
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
        raise _write_failed(manager, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; a failed write (a full disk) raises CheckpointError."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _write_failed(manager, e) from e


def _write_failed(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
    """The one-line error of a save whose files could not be written. orbax wrote into a
    temporary directory, so the finished checkpoints are intact and the half-written one is
    never listed (and is removed when the trainer next starts)."""
    reason = " ".join(str(error).split())
    if "No space left on device" in reason or getattr(error, "errno", None) == errno.ENOSPC:
        reason = "the disk is full (No space left on device)"
    else:
        reason = f"{type(error).__name__}: {reason[:300]}"
    latest = manager.latest_step()
    kept = (f"the finished checkpoints (newest: step {latest}) are intact; free space, then "
            f"rerun the same command to resume from step {latest}" if latest is not None else
            "no checkpoint was finished yet; free space, then rerun the same command")
    return CheckpointError(f"Could not write a checkpoint in {manager.directory}: {reason}. "
                           f"Nothing finished was lost: {kept}.")


def _gather_ints(value: int) -> list[int]:
    """[value of process 0, value of process 1, ...] on every process (a collective)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array([value], np.int64))
    return [int(v) for v in np.asarray(gathered).reshape(-1)]


def _grain_args(*, save: bool) -> Any:
    import grain.checkpoint
    return grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore


# ------------------------------------------------------------------------------ checksums

def read_checksums(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The checksums saved with step `step`; None for a checkpoint written before them."""
    if not (manager.directory / str(step)).exists():  # removed meanwhile (a trainer's rotation)
        raise CheckpointError(f"The checkpoint at step {step} in {manager.directory} is gone.")
    if not (manager.directory / str(step) / CHECKSUMS).exists():
        logging.warning("The checkpoint at step %d in %s has no checksums (written by an older "
                        "version): its arrays are not verified.", step, manager.directory)
        return None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
                **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
        if not isinstance(restored.get("arrays"), dict):
            raise ValueError("no 'arrays' entry")
    except Exception as e:
        raise unreadable(manager, step, "its checksums", e) from e
    return restored


def _corrupt(manager: ocp.CheckpointManager, step: int, what: str) -> CheckpointError:
    return CheckpointError(
            f"The checkpoint at step {step} in {manager.directory} is corrupt: {what}. Nothing "
            f"was deleted: move or delete {manager.directory / str(step)} to fall back to the "
            "previous checkpoint, or use a new --workdir.")


def verify_checksums(manager: ocp.CheckpointManager, step: int, tree: PyTree,
                     saved: Mapping[str, Any] | None) -> None:
    """Raises CheckpointError naming the step and the first array of the restored `tree`
    whose shape, dtype or bytes differ from what was saved (`saved`: _read_checksums)."""
    if saved is None:
        return
    for name, entry in checksums_lib.array_checksums(tree).items():
        expected = saved["arrays"].get(name)
        if not isinstance(expected, dict):
            raise _corrupt(manager, step, f"its checksums list no array {name}")
        if entry["crc32"] is None or expected.get("crc32") is None:
            continue  # no whole copy here, or none at save time: not verifiable
        for key in ("shape", "dtype", "crc32"):
            if entry[key] != expected.get(key):
                raise _corrupt(manager, step, f"array {name} has {key} {entry[key]}, but "
                               f"{expected.get(key)} was saved")


def restore_weights(manager: ocp.CheckpointManager, step: int, shapes: PyTree, weights: str,
                    sharding: jax.sharding.Sharding,
                    checksums: Mapping[str, Any] | None = None) -> PyTree:
    """One parameter tree of a checkpoint's state: `weights` "ema" (ema_params) or "raw"
    (params), of the structure and shapes of `shapes`, placed with `sharding`, checked against
    the saved checksums (`verify_checksums`). Reads nothing else of the state."""
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes)
    field = {"ema": "ema_params", "raw": "params"}[weights]
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item={field: abstract}, restore_args={field: restore_args},
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    verify_checksums(manager, step, restored[STATE], checksums)
    return restored[STATE][field]


def restore_config(manager: ocp.CheckpointManager, step: int,
                   checksums: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config saved with step `step` (plain JSON types), checked against `checksums`
    (default: read them, `_read_checksums`)."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    except Exception as e:
        raise unreadable(manager, step, "its config", e) from e
    saved = read_checksums(manager, step) if checksums is None else checksums
    if saved is not None and saved.get("config_crc32") != checksums_lib.config_crc32(restored[CONFIG]):
        raise _corrupt(manager, step, "its config does not match the checksum saved with it")
    return restored[CONFIG]


def unreadable(manager: ocp.CheckpointManager, step: int, what: str, error: Exception) -> CheckpointError:
    # tensorstore appends its whole JSON spec to the reason: keep the reason only.
    reason = str(error).split(" [tensorstore_spec")[0]
    reason = f"{reason[:400]}..." if len(reason) > 400 else reason
    return CheckpointError(
            f"Could not restore {what} from the checkpoint at step {step} in {manager.directory}: "
            f"{type(error).__name__}: {reason}\nThe checkpoint is incomplete or corrupt. Nothing "
            f"was deleted: move or delete {manager.directory / str(step)} to fall back to the "
            "previous checkpoint, or use a new --workdir.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree,
            config: Mapping[str, Any], *, data_iterator: Any | None = None) -> PyTree:
    """Restores the train state (and the data iterator, in place) of step `step`.

    abstract_state: the state's tree of jax.ShapeDtypeStruct with the target shardings.
    First checks that the saved config matches `config` (`check_config_compatible`). Raises
    CheckpointError, naming the step, when the checkpoint cannot be read; nothing is deleted.
    """
    checksums = read_checksums(manager, step)
    # Both sides brought up to date: a field added since the run was made is no difference.
    check_config_compatible(config_lib.upgrade(restore_config(manager, step, checksums)),
                            config_lib.upgrade(config_to_dict(config)), step=step,
                            directory=str(manager.directory))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state)}))
    except Exception as e:
        raise unreadable(manager, step, "the train state", e) from e
    verify_checksums(manager, step, restored[STATE], checksums)
    if data_iterator is not None:
        if not (manager.directory / str(step) / DATA).exists():
            raise CheckpointError(
                    f"The checkpoint at step {step} in {manager.directory} holds no data iterator "
                    "state, but this run's input pipeline needs one. Nothing was deleted; use a "
                    "new --workdir.")
        try:
            manager.restore(step, args=ocp.args.Composite(
                    **{DATA: _grain_args(save=False)(data_iterator)}))
        except Exception as e:
            raise CheckpointError(
                    f"Could not restore the data iterator from the checkpoint at step {step} in "
                    f"{manager.directory}: {type(e).__name__}: {e}\nThe input settings (data set, "
                    "batch size, seed, image shape) must match the run that wrote it. Nothing was "
                    "deleted.") from e
        expected = (checksums or {}).get("data_crc32")
        if expected is not None:
            mine = checksums_lib.config_crc32(data_iterator.get_state())
            if jax.process_index() >= len(expected) or expected[jax.process_index()] != mine:
                raise _corrupt(manager, step, "its data iterator state (the input position) does "
                               "not match the checksum saved with it")
    return restored[STATE]


# ----------------------------------------------------------------------------- preemption

def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_single_process_preemption_service() -> None:
    """Starts `jax.distributed` for this one process on 127.0.0.1 (bound there only) so that
    a SIGTERM reaches orbax's preemption sync point: the loop then saves and exits 0.

    Call before any other JAX call, only when no multi-process run was initialised.
    """
    address = f"127.0.0.1:{_free_local_port()}"
    jax.distributed.initialize(address, num_processes=1, process_id=0,
                               coordinator_bind_address=address)
    logging.info("Preemption service on %s: SIGTERM will checkpoint and exit 0.", address)


def reached_preemption(manager: ocp.CheckpointManager, steps: Iterable[int]) -> bool:
    """Whether the preemption sync point is among `steps`, every step since the last call.

    JAX's sync point is the step after the fastest process's latest reported step, and only an
    exact match fires; a loop running K steps per dispatch therefore reports all K.
    """
    reached = False
    for step in steps:
        reached |= manager.reached_preemption(step)
    return reached
