"""The work-dir lock: one holder, named to a second starter; stale locks of dead processes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ddpm_jax import lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **holder):
    with open(os.path.join(workdir, lock.LOCK_FILE), "w") as f:
        json.dump({"host": socket.gethostname(), "start": 0.0, **holder}, f)


def test_second_acquire_names_the_holder_and_release_frees_it(tmp_path):
    workdir = str(tmp_path / "run")
    mine = lock.acquire(workdir)
    assert mine["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirLockedError,
                       match=rf"in use by another trainer \(host {socket.gethostname()}, pid "
                             rf"{os.getpid()}, since \d{{4}}-\d\d-\d\d "):
        lock.acquire(workdir)
    lock.release(workdir, mine)
    assert not os.listdir(workdir)
    with lock.hold(workdir):
        assert os.listdir(workdir) == [lock.LOCK_FILE]
    assert not os.listdir(workdir)


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    _write_lock(str(tmp_path), pid=_dead_pid())
    mine = lock.acquire(str(tmp_path))
    with open(tmp_path / lock.LOCK_FILE) as f:
        assert json.load(f) == mine
    assert os.listdir(tmp_path) == [lock.LOCK_FILE]  # nothing left aside


def test_lock_of_another_host_or_a_live_process_is_kept(tmp_path):
    _write_lock(str(tmp_path), pid=_dead_pid(), host="elsewhere")  # cannot be checked: kept
    with pytest.raises(lock.WorkdirLockedError, match="host elsewhere"):
        lock.acquire(str(tmp_path))
    _write_lock(str(tmp_path), pid=1)  # init: alive
    with pytest.raises(lock.WorkdirLockedError, match="pid 1,"):
        lock.acquire(str(tmp_path))
    (tmp_path / lock.LOCK_FILE).write_text("")  # died between create and write
    with pytest.raises(lock.WorkdirLockedError, match="unreadable.*delete the file"):
        lock.acquire(str(tmp_path))


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    mine = lock.acquire(str(tmp_path))
    _write_lock(str(tmp_path), pid=1)
    lock.release(str(tmp_path), mine)
    assert os.listdir(tmp_path) == [lock.LOCK_FILE]
