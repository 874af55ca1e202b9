"""One trainer per work dir: an exclusive lock file, `workdir/trainer.lock`.

The file is created with O_CREAT | O_EXCL (atomic on local and on NFS-style shared file systems)
and holds JSON {host, pid, start}. A second trainer finds it and stops at once, naming the
holder. A lock whose holder ran on this host and is no longer alive (killed, crashed) is stale
and taken over; a holder on another host cannot be checked from here, so its lock is only ever
removed by hand. Only process 0 of a multi-host run takes the lock, and tells every other
process whether it got it (`hold_on_every_process`). Whatever cleans the work
dir at start-up (orbax's removal of half-written checkpoints) must run under it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

LOCK_FILE = "trainer.lock"


class WorkdirLockedError(RuntimeError):
    """Another live trainer (or an unreadable lock) holds the work dir."""


def _holder_is_dead(holder: dict[str, Any]) -> bool:
    """Whether `holder` ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _read(path: str) -> dict[str, Any] | None:
    """The lock's holder {host, pid, start}; None when the file cannot be read as one."""
    return None if _unreadable_because(path) else _load(path)


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _unreadable_because(path: str) -> str:
    """'' for a lock file that names its holder; else what is wrong with it, for the message."""
    try:
        holder = _load(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except ValueError:
        return "is empty or not JSON (a trainer may be starting, or one died while writing it)"
    if not isinstance(holder, dict) or "pid" not in holder:
        return "names no holder (no 'pid')"
    pid = holder["pid"]
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return f"holds pid {pid!r}, which is not a process id (edited by hand?)"
    return ""


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.get("start", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


def acquire(workdir: str) -> dict[str, Any]:
    """Takes workdir's lock (creating workdir) and returns what it wrote; raises
    WorkdirLockedError naming the holder when a live trainer holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                why = _unreadable_because(path) or "was being written"
                raise WorkdirLockedError(
                        f"{path} exists but is unreadable: it {why}. If no trainer uses this "
                        "--workdir, delete the file and start again.") from None
            if not _holder_is_dead(holder):
                raise WorkdirLockedError(
                        f"--workdir={workdir} is in use by another trainer ({_describe(holder)}; "
                        f"lock file {path}): wait for it or stop it, or use another --workdir. "
                        "If that trainer is gone, delete the lock file.") from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me
    raise WorkdirLockedError(f"{path}: other trainers keep taking this --workdir; start one only.")


def _take_over(path: str, holder: dict[str, Any]) -> None:
    """Moves a stale lock aside. Another starter may have taken it over first: the moved file
    is checked and put back when it is not the stale one."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another starter moved it first; retry the O_EXCL create
    if _read(aside) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # not ours to remove: back, unless a newer lock is there
        os.remove(aside)
        return
    os.remove(aside)
    logging.warning("Took over the stale lock of a trainer that is gone (%s).", _describe(holder))


def release(workdir: str, mine: dict[str, Any]) -> None:
    """Removes workdir's lock if it still is the one `acquire` wrote."""
    path = os.path.join(workdir, LOCK_FILE)
    if _read(path) == mine:
        os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True) -> Iterator[None]:
    """`with hold(workdir):` the lock for the block (a no-op when not enabled: processes > 0)."""
    if not enabled:
        yield
        return
    mine = acquire(workdir)
    try:
        yield
    finally:
        release(workdir, mine)


MESSAGE_BYTES = 2048  # the refusal as process 0 wrote it, shared with every process


@contextlib.contextmanager
def hold_on_every_process(workdir: str) -> Iterator[None]:
    """The lock of a (multi-process) run: process 0 takes it, and every process learns the
    outcome through one collective (`broadcast_one_to_all`), so a refused lock stops all of them
    at once with process 0's message (the holder named) instead of leaving the others waiting
    in their first collective. One process: `hold`."""
    import jax  # here: the lock itself needs no jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        with hold(workdir):
            yield
        return
    mine, refusal = None, b""
    if jax.process_index() == 0:
        try:
            mine = acquire(workdir)
        except WorkdirLockedError as e:
            refusal = str(e).encode()[:MESSAGE_BYTES]
    buffer = np.zeros(MESSAGE_BYTES, np.uint8)
    buffer[:len(refusal)] = np.frombuffer(refusal, np.uint8)
    shared = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8))
    message = shared.rstrip(b"\0").decode(errors="replace")
    if message:
        where = "" if jax.process_index() == 0 else " (process 0's lock; this process stops too)"
        raise WorkdirLockedError(message + where)
    try:
        yield
    finally:
        if mine is not None:
            release(workdir, mine)
