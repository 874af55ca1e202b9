"""Fault drills: a run is damaged on purpose and nothing finished may be lost, nothing damaged
may load. The drills that need a trained run live with it, and run once in CI:

    SIGTERM mid-training saves and exits 0    test_loop.py::test_sigterm_saves_and_exits_0_...
    two trainers on one work dir (the lock)   test_loop.py::test_a_second_trainer_stops_at_once_...
    a flipped byte in every checkpoint file   test_loop.py::test_a_flipped_byte_in_any_...
    kill -9 in the middle of one async save   test_checkpoint.py::test_kill_9_during_async_save_...

Here: repeated kill -9 at random moments of a run of saves, then resume; a full disk (ENOSPC)
at a write of a save. Small states and no model: seconds each.
"""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from ddpm_jax import checkpoint

CONFIG = {"model": {"ch": 16}}
SIZE = 1_000_000  # floats per saved array: a save takes long enough to be killed inside


def _abstract():
    return {"w": jax.ShapeDtypeStruct((SIZE,), jnp.float32)}


def _state(step):
    return {"w": jnp.full((SIZE,), float(step), jnp.float32)}


_SAVE_UNTIL_KILLED = textwrap.dedent(f"""
    import os, random, signal, sys, threading
    import jax.numpy as jnp
    from ddpm_jax import checkpoint
    workdir, seed = sys.argv[1], int(sys.argv[2])
    manager = checkpoint.make_manager(workdir, max_to_keep=1000)  # removes half-written saves
    start = manager.latest_step() or 0
    if start:  # resume: the newest listed checkpoint restores, checksums verified
        restored = checkpoint.restore(manager, start, {{"w": jax.ShapeDtypeStruct(({SIZE},),
                                                        jnp.float32)}}, {CONFIG!r})
        assert float(restored["w"][0]) == start
    delay = random.Random(seed).uniform(0.1, 1.0)
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    for step in range(start + 1, start + 10_000):
        checkpoint.save(manager, step, {{"w": jnp.full(({SIZE},), float(step), jnp.float32)}},
                        {CONFIG!r})  # async: returns while the files are written
        manager.wait_until_finished()
        print("finished", step, flush=True)
""").replace("import jax.numpy", "import jax, jax.numpy")


@pytest.mark.slow
def test_random_kill_9_during_saves_then_resume_loses_no_finished_checkpoint(tmp_path):
    workdir = str(tmp_path)
    finished = []
    for seed in range(3):
        proc = subprocess.run([sys.executable, "-c", _SAVE_UNTIL_KILLED, workdir, str(seed)],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        finished += [int(line.split()[1]) for line in proc.stdout.splitlines()
                     if line.startswith("finished ")]
    assert finished, "no save finished before a kill: nothing tested"
    manager = checkpoint.make_manager(workdir, max_to_keep=1000)
    steps = list(manager.all_steps())
    # Every save that finished is there; at most the one in flight at each kill is missing.
    assert set(finished) <= set(steps), (finished, steps)
    for step in steps:
        restored = checkpoint.restore(manager, step, _abstract(), CONFIG)
        np.testing.assert_array_equal(restored["w"], np.full((SIZE,), float(step)))
    manager.close()


def _files(root: str) -> set[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file under root, tolerating files that vanish."""
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(path)
                found.add((path, info.st_size, info.st_mtime_ns))
    return found


def _wait_until_files_settle(root: str, *, quiet_s: float, timeout_s: float) -> None:
    """Returns once no file under root was added, removed or changed for quiet_s seconds."""
    deadline, last, quiet_since = time.monotonic() + timeout_s, _files(root), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _files(root)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
    raise AssertionError(f"files under {root} still changing after {timeout_s} s")


def test_a_full_disk_during_a_save_loses_no_finished_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    manager = checkpoint.make_manager(workdir, max_to_keep=5)
    checkpoint.save(manager, 1, _state(1), CONFIG)
    manager.wait_until_finished()

    real_write = epath.Path.write_text

    def disk_full(self, *args, **kwargs):
        if checkpoint.CHECKSUMS in str(self):  # a write of step 2's items
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(manager, 2, _state(2), CONFIG)
        manager.wait_until_finished()
    monkeypatch.undo()  # space freed
    # A real crash ends the process with its writer threads; here they live on, so let the other
    # items' writes finish before the "restarted" manager removes the half-written step.
    with contextlib.suppress(OSError):
        manager.wait_until_finished()
    manager.close()
    # The save's writer threads (Python ones and tensorstore's native ones) may still be writing
    # the other items' files: wait until the work dir's files stop changing, or the restart's
    # cleanup races them ('Directory not empty', seen in 2 of 4 runs of this file under load).
    _wait_until_files_settle(workdir, quiet_s=1.5, timeout_s=60)

    manager = checkpoint.make_manager(workdir, max_to_keep=5)  # as a restarted trainer
    assert list(manager.all_steps()) == [1]
    restored = checkpoint.restore(manager, 1, _abstract(), CONFIG)
    np.testing.assert_array_equal(restored["w"], np.full((SIZE,), 1.0))
    checkpoint.save(manager, 2, _state(2), CONFIG)  # and saving works again
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [1, 2]
    manager.close()


# ------------------------------------------------------------------------------- issue 29
# Each drill below failed before its fix (the old behaviour is named in a comment) and passes
# after. The command lines' drills start sample.py / evaluate.py / train.py (slow).

def test_a_full_disk_during_a_save_is_one_checkpoint_error_naming_the_intact_step(tmp_path,
                                                                                monkeypatch):
    # Simulated in process (ENOSPC raised by the checksums write). Before: orbax's OSError (and
    # in train.py five tracebacks); recovery itself was already correct (the drill above).
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    checkpoint.save(manager, 1, _state(1), CONFIG)
    checkpoint.wait_until_finished(manager)
    real_write = epath.Path.write_text

    def disk_full(self, *args, **kwargs):
        if checkpoint.CHECKSUMS in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)
    monkeypatch.setattr(epath.Path, "write_text", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as failed:
        checkpoint.save(manager, 2, _state(2), CONFIG)
        checkpoint.wait_until_finished(manager)
    monkeypatch.undo()
    assert str(failed.value) == (
            f"Could not write a checkpoint in {checkpoint.checkpoint_dir(str(tmp_path))}: the disk "
            "is full (No space left on device). Nothing finished was lost: the finished "
            "checkpoints (newest: step 1) are intact; free space, then rerun the same command to "
            "resume from step 1.")
    with contextlib.suppress(checkpoint.CheckpointError):
        checkpoint.wait_until_finished(manager)
    manager.close()
    _wait_until_files_settle(str(tmp_path), quiet_s=1.5, timeout_s=60)


def _tiny_evaluation(tmp_path, apply_fn, monkeypatch, metrics):
    """run_evaluation of a tiny digits config with `apply_fn`, the feature net and the data
    replaced by stand-ins (what is tested is what gets written)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs import digits
    from ddpm_jax import evaluate, features
    config = digits.get_config("tiny")
    config.data.image_size, config.diffusion.timesteps = 8, 4
    stub = features.FeatureNet(kind="digits", name="stub", weights_sha256="0" * 64,
                               score_prefix="digits-", channels=1, batch_size=8,
                               apply=lambda x: dict(features=x.reshape(len(x), -1)[:, :4],
                                                    logits=x.reshape(len(x), -1)[:, :10]))
    monkeypatch.setattr(features, "make_feature_net", lambda *a, **k: stub)
    monkeypatch.setattr(features, "reference_statistics", lambda *a, **k: {"protocol": {}})
    options = evaluate.EvalOptions.from_config(config, metrics=metrics, num_samples=4,
                                               sample_batch_size=4,
                                               sampler=dict(sampler="ddim", steps=2))
    workdir = tmp_path / "run"
    return evaluate.run_evaluation(evaluate.RunData.from_config(config), apply_fn, None, options, workdir=str(workdir), step=3,
                                   progress=False), workdir


class _NaNModel:
    """An apply_fn whose every prediction is NaN (a diverged or over-guided model)."""

    def __call__(self, params, x_t, t, y=None):
        return jnp.full(x_t.shape, jnp.nan)


def test_no_report_is_written_from_non_finite_samples(tmp_path, monkeypatch):
    # Before: NaN samples became black uint8 images and a report with their scores was written.
    from ddpm_jax import evaluate
    with pytest.raises(evaluate.NonFiniteSamplesError,
                       match=r"^The samples from image 0 on hold 256 NaN or inf values: no score "
                             r"and no report are written from them\. Check the sampler options"):
        _tiny_evaluation(tmp_path, _NaNModel(), monkeypatch, ("fid",))
    eval_dir = tmp_path / "run" / "eval"
    assert not eval_dir.exists() or not [p for p in eval_dir.iterdir() if p.suffix == ".json"]


def test_a_work_dir_deleted_during_evaluation_still_gets_its_report(tmp_path, monkeypatch):
    # Before: FileNotFoundError when the report was written, after all the work was done.
    import shutil

    from ddpm_jax import evaluate
    real = evaluate.evaluate_bpd

    def deleted_meanwhile(*args, **kwargs):
        shutil.rmtree(tmp_path / "run")  # e.g. `rm -r` of the run while its bits/dim run
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "evaluate_bpd", deleted_meanwhile)
    monkeypatch.setattr("ddpm_jax.data.load_split_uint8",
                        lambda *a, **k: np.zeros((2, 8, 8, 1), np.uint8))
    model = lambda params, x_t, t, y=None: jnp.zeros_like(x_t)  # noqa: E731
    report, workdir = _tiny_evaluation(tmp_path, model, monkeypatch, ("bpd",))
    assert os.path.isfile(report["path"]) and report["path"].startswith(str(workdir / "eval"))
    assert os.path.isfile(report["path"].replace(".json", "_bpd_terms.npz"))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Untrained tiny runs: a denoiser, a classifier, and a copy of the denoiser whose
    state/array_metadatas is truncated; plus a folder of inputs."""
    import shutil
    import sys
    sys.path.insert(0, REPO)
    from conftest import write_untrained_run
    from configs import digits
    root = tmp_path_factory.mktemp("runs")
    for name, variant in (("run", "tiny"), ("clf", "classifier_tiny")):
        config = digits.get_config(variant)
        config.data.image_size, config.model.attn_resolutions = 8, (4,)
        write_untrained_run(config, str(root / name))
    shutil.copytree(root / "run", root / "truncated")
    metadata = root / "truncated" / "checkpoints" / "0" / "state" / "array_metadatas" / "process_0"
    metadata.write_bytes(metadata.read_bytes()[:1000])
    np.savez(root / "x.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    np.savez(root / "mask.npz", mask=mask)
    (root / "notes.txt").write_text("not weights")
    return root


def _script(name, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    # Before: a traceback ending in "var_type 'fixedlarge' needs a model output of C = 1 ...".
    ("sample.py", ["--workdir={r}/clf", "--num_samples=2"],
     "--workdir={r}/clf is a classifier run (model.kind='classifier'), not a denoiser"),
    ("sample.py", ["--workdir={r}/clf", "--sdedit={r}/x.npz"],
     "--workdir={r}/clf is a classifier run"),
    ("evaluate.py", ["--workdir={r}/clf", "--metrics=fid", "--num_samples=2"],
     "--workdir={r}/clf is a classifier run"),
    # Before: a traceback from inside the traced sampler.
    ("sample.py", ["--workdir={r}/run", "--var_type=learned", "--sampler=ddpm"],
     "--var_type=learned needs a network trained to output a variance"),
    # Before: ~1,300 lines of "Exception ignored in: <coroutine ...>" around the one-liner.
    ("sample.py", ["--workdir={r}/truncated"], "could not restore the ema parameters"),
    # Before: tracebacks (a missing weights file, a file of other weights).
    ("evaluate.py", ["--workdir={r}/run", "--metrics=fid", "--feature_net=inception"],
     "FID/IS with feature_net='inception' need the Inception weights"),
    ("evaluate.py", ["--workdir={r}/run", "--metrics=fid", "--feature_net=inception",
                     "--inception_weights={r}/notes.txt"], "not the FID weights'"),
    ("evaluate.py", ["--workdir={r}/run", "--metrics=fid", "--feature_net=inception",
                     "--inception_weights={r}/x.npz"], "inception weights lack"),
    # Before: PIL's "unknown file extension" traceback after sampling; FileNotFoundError.
    ("sample.py", ["--workdir={r}/run", "--out={r}/.png"], "has no file name before .png"),
    ("sample.py", ["--workdir={r}/run", "--out={r}/dangling.png"], "is a dangling symlink"),
    # Before: the route was built until the kernel killed the process at ~24 GB.
    ("sample.py", ["--workdir={r}/run", "--inpaint={r}/x.npz", "--mask={r}/mask.npz",
                   "--sampler=ddpm", "--steps=250", "--resamplings=1000000"],
     "makes a RePaint route of 479,999,770 moves (about 23.5 GB to build"),
    # Before: accepted; the input pipeline grew to 5.5 GB and a SIGTERM went unanswered.
    ("train.py", ["--workdir={r}/big", "--config=configs/digits.py:tiny",
                  "--config.training.batch_size=100000000", "--preemption_service=false"],
     "training.batch_size=100,000,000 needs at least"),
    # Before: a traceback from the data pipeline.
    ("train.py", ["--workdir={r}/rgb", "--config=configs/digits.py:tiny",
                  "--config.data.channels=3", "--preemption_service=false"],
     "set --config.data.image_size=8 and --config.data.channels=1"),
    # Before: ml_collections' tracebacks.
    ("train.py", ["--workdir={r}/t", "--config={r}/missing.py"], "no such file"),
    ("train.py", ["--workdir={r}/t", "--config={r}/notes.txt"], "is not a Python config file"),
    ("train.py", ["--workdir={r}/t", "--config=configs/digits.py:nosuch"], "unknown variant"),
])
def test_the_command_lines_stop_in_one_line_naming_the_problem_and_the_fix(runs, script, args,
                                                                          message):
    if not os.path.lexists(runs / "dangling.png"):
        os.symlink(runs / "nowhere" / "x.png", runs / "dangling.png")
    proc = _script(script, *[a.format(r=runs) for a in args],
                   *(["--steps=3", f"--out={runs}/out/s.png"] if script == "sample.py"
                     and not any(a.startswith(("--steps", "--out")) for a in args) else []))
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    for noise in ("Traceback", "Exception ignored"):
        assert noise not in proc.stderr, proc.stderr[-5000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert message.format(r=runs).lower() in last.lower(), proc.stderr[-3000:]
    assert not os.path.exists(runs / "out" / "s.png")


def _tmpfs(path, size):
    """A small tmpfs at `path` (root only), or skip: a full disk without filling the real one."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the in-process "
                    "ENOSPC drills cover the same code")
    return path


@pytest.mark.slow
def test_sample_py_on_a_full_disk_is_one_line_and_leaves_the_old_pair(runs, tmp_path):
    # A real full disk: a 64 KiB tmpfs. Before: a traceback and a 0-byte (or torn) PNG.
    full = _tmpfs(tmp_path / "full", "64k")
    try:
        (full / "s.png").write_bytes(b"old png")
        (full / "s.npz").write_bytes(b"old npz")
        with contextlib.suppress(OSError):
            (full / "filler").write_bytes(b"\0" * 128 * 1024)
        proc = _script("sample.py", f"--workdir={runs}/run", "--steps=3", "--num_samples=4",
                       f"--out={full}/s.png")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
                f"Could not write {full}/s.png: the disk is full ([Errno 28]); nothing was "
                "replaced (any previous file there is intact): free some space or choose another "
                "location.")
        assert (full / "s.png").read_bytes() == b"old png"
        assert (full / "s.npz").read_bytes() == b"old npz"
        assert sorted(os.listdir(full)) == ["filler", "s.npz", "s.png"]
    finally:
        subprocess.run(["umount", str(full)], check=False)


@pytest.mark.slow
def test_train_py_on_a_disk_that_fills_during_a_save_is_one_line_and_resumable(tmp_path):
    # A real full disk: a tmpfs with room for one tiny checkpoint (1.4 MB) but not two.
    # Before: five tracebacks from orbax's threads and the main thread; the recovery was right.
    full = _tmpfs(tmp_path / "full", "2200k")
    try:
        proc = _script("train.py", "--config=configs/digits.py:tiny", f"--workdir={full}/run",
                       "--config.data.image_size=8", "--config.model.attn_resolutions=(4,)",
                       "--config.training.checkpoint_every=2", "--config.training.num_steps=6",
                       "--config.training.sample_every=100", "--progress_bar=false",
                       "--preemption_service=false", timeout=600)
        assert proc.returncode == 1, proc.stderr[-3000:]
        for noise in ("Traceback", "Exception ignored", "exception was never retrieved"):
            assert noise not in proc.stderr, proc.stderr[-5000:]
        assert proc.stderr.strip().splitlines()[-1] == (
                f"Could not write a checkpoint in {full}/run/checkpoints: the disk is full (No "
                "space left on device). Nothing finished was lost: the finished checkpoints "
                "(newest: step 2) are intact; free space, then rerun the same command to resume "
                "from step 2.")
        manager = checkpoint.make_manager(f"{full}/run", max_to_keep=3, read_only=True)
        assert list(manager.all_steps()) == [2]
        manager.close()
    finally:
        subprocess.run(["umount", str(full)], check=False)
