"""The work-dir lock: one holder, named to a second starter; stale locks of dead processes."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
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


def test_a_refused_lock_stops_every_process_of_a_multi_host_run(tmp_path):
    # A live holder (this test's own process) owns the work dir: process 0 is refused and must
    # tell process 1, which would otherwise wait in its first collective.
    from multihost import run_on_two_hosts

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
    (workdir / lock.LOCK_FILE).write_text(json.dumps(holder))
    outs = run_on_two_hosts(
            "import numpy as np\n"
            "from ddpm_jax import lock\n"
            "try:\n"
            "    with lock.hold_on_every_process(args[0]):\n"
            "        message = 'entered'\n"
            "except lock.WorkdirLockedError as e:\n"
            "    message = str(e)\n"
            "np.save(out, np.array(message))\n", tmp_path, str(workdir))
    messages = [str(np.load(o)) for o in outs]
    for message in messages:
        assert f"pid {os.getpid()}" in message and "in use by another trainer" in message, message
    assert "process 0's lock" in messages[1] and "process 0's lock" not in messages[0]
    assert json.loads((workdir / lock.LOCK_FILE).read_text()) == holder  # left alone


def test_every_process_enters_when_process_0_gets_the_lock(tmp_path):
    from multihost import run_on_two_hosts

    workdir = tmp_path / "run"
    outs = run_on_two_hosts(
            "import os\n"
            "import numpy as np\n"
            "from ddpm_jax import lock\n"
            "with lock.hold_on_every_process(args[0]):\n"
            "    # Process 0 holds the file here; process 1 only knows it was let in.\n"
            "    held = os.path.exists(os.path.join(args[0], lock.LOCK_FILE)) or jax.process_index()\n"
            "np.save(out, np.array(bool(held)))\n", tmp_path, str(workdir))
    assert all(bool(np.load(o)) for o in outs)
    assert not (workdir / lock.LOCK_FILE).exists()  # released on the way out


@pytest.mark.parametrize("pid", ["abc", "12x", None, 3.5, True, -4])
def test_a_hand_edited_lock_with_a_pid_that_is_no_process_id_is_named_in_one_line(tmp_path, pid):
    # Before: int("abc") raised a ValueError traceback out of the liveness check.
    _write_lock(str(tmp_path), pid=pid)
    with pytest.raises(lock.WorkdirLockedError) as refused:
        lock.acquire(str(tmp_path))
    message = str(refused.value)
    assert f"holds pid {pid!r}, which is not a process id" in message, message
    assert "delete the file" in message and "\n" not in message
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == pid  # left alone
