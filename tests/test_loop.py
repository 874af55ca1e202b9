"""The training loop end to end on digits with a tiny UNet (8x8, ch 16, 1 res block).

Costly parts run concurrently: an 8-device run and a two-process run start (as train.py
subprocesses) when the first test asks for them, are sent SIGTERM once they pass step 3, and
are compared with one-device runs in this process at the step they saved. The in-process runs
share one compilation (the jitted step is cached per mesh).
"""

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

from configs import digits
from ddpm_jax import checkpoint, data, images, lock, loop, parallel, runs, sampling, writers
from ddpm_jax import config as config_lib
from ddpm_jax.spec import SamplerSpec
from conftest import xla_flags

# The tiny setting, as command-line overrides and as config changes.
TINY = {"data.image_size": 8, "model.attn_resolutions": (4,), "training.batch_size": 16,
        "training.num_sample_images": 0, "training.checkpoint_every": 3}
LONG_RUN = {"training.num_steps": 100_000, "training.checkpoint_every": 100_000}
PREEMPT_AFTER_STEP = 3


def tiny_config(data_dir: str, **changes):
    config = digits.get_config("tiny")
    for key, value in {**TINY, "data.data_dir": data_dir, **changes}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def train_command(data_dir: str, workdir: str, **changes) -> list[str]:
    overrides = {**TINY, "data.data_dir": data_dir, **changes}
    return [sys.executable, str(REPO / "train.py"), "--config", f"{REPO}/configs/digits.py:tiny",
            "--workdir", workdir, "--progress_bar=false",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, writers.METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


class PreemptedRun:
    """train.py process(es) for LONG_RUN steps; SIGTERM to process 0 once past the step."""

    def __init__(self, name, tmp, data_dir, num_processes=1, devices_per_process=1):
        self.workdir = str(tmp / name)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices_per_process))
        command = train_command(data_dir, self.workdir, **LONG_RUN)
        if num_processes > 1:
            port = _free_port()
            self.coordinator = f"127.0.0.1:{port}"
            command += [f"--coordinator_address={self.coordinator}",
                        f"--num_processes={num_processes}", "--library_logs"]
        self.logs, self.procs = [], []
        for i in range(num_processes):
            log = open(tmp / f"{name}_{i}.log", "w+")
            extra = [f"--process_id={i}"] if num_processes > 1 else []
            self.procs.append(subprocess.Popen(command + extra, cwd=REPO, env=env, stdout=log,
                                               stderr=subprocess.STDOUT))
            self.logs.append(log)
        self.signalled_at = None
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self):
        deadline = time.time() + 400
        while time.time() < deadline and self.procs[0].poll() is None:
            if _last_logged_step(self.workdir) >= PREEMPT_AFTER_STEP:
                self.signalled_at = _last_logged_step(self.workdir)
                self.procs[0].send_signal(signal.SIGTERM)
                return
            time.sleep(0.1)

    def wait(self):
        """(return codes, the joined logs) once every process exited."""
        codes = [proc.wait(timeout=500) for proc in self.procs]
        text = []
        for log in self.logs:
            log.seek(0)
            text.append(log.read())
        return codes, "\n".join(text)

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def data_dir(digits_data_dir):
    return digits_data_dir


@pytest.fixture(scope="module")
def preempted_runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("preempted")
    runs = {"8_devices": PreemptedRun("eight", tmp, data_dir, devices_per_process=8),
            "2_processes": PreemptedRun("two", tmp, data_dir, num_processes=2)}
    yield runs
    for run in runs.values():
        run.kill()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    """6 steps in one go: (workdir, final state)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    state = loop.train_and_evaluate(tiny_config(data_dir, **{"training.num_steps": 6}), workdir)
    return workdir, state


def _params_close(state, workdir, step, atol):
    for weights, params in (("raw", state.params), ("ema", state.ema_params)):
        _, _, loaded = runs.load_for_sampling(workdir, weights, step=step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol),
                     loaded, params)


# ----------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_loss_falls_on_digits_and_sample_grid_is_written(tmp_path, data_dir, preempted_runs):
    workdir = str(tmp_path)
    # Two steps per dispatch here (one lax.scan): the other runs cover one.
    config = tiny_config(data_dir, **{"training.num_steps": 120, "training.log_every": 10,
                                      "training.checkpoint_every": 120,
                                      "training.sample_every": 120,
                                      "training.num_sample_images": 4,
                                      "training.steps_per_dispatch": 2})
    loop.train_and_evaluate(config, workdir)
    records = writers.read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(10, 121, 10))
    losses = np.array([r["loss"] for r in records])
    assert losses[0] > 0.8, losses  # the zero-initialised output predicts eps = 0: loss ~ 1
    # Measured on 2026-12-07: below 0.35 from step 60, about 0.19 over steps 110-150 (the mean
    # of steps 80-120 checked here).
    assert losses[-5:].mean() < 0.35, losses
    for key in ("grad_norm", "lr", "nonfinite_total", "steps_per_sec", "examples_per_sec"):
        assert key in records[-1]
    assert records[-1]["nonfinite_total"] == 0
    grid = os.path.join(workdir, loop.SAMPLES_DIR, "step_00000120.png")
    assert sorted(os.listdir(os.path.dirname(grid))) == [os.path.basename(grid)]
    with open(os.path.join(workdir, loop.CONFIG_FILE)) as f:
        assert json.load(f)["training"]["num_steps"] == 120


@pytest.mark.slow
def test_periodic_evaluation_writes_a_report_and_eval_scalars(tmp_path, data_dir):
    workdir = str(tmp_path)
    config = tiny_config(data_dir, **{"training.num_steps": 2, "training.checkpoint_every": 2,
                                      "eval.every_steps": 2, "eval.metrics": "bpd",
                                      "eval.bpd_num_images": 2, "eval.bpd_batch_size": 2})
    loop.train_and_evaluate(config, workdir)
    reports = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json")]
    assert len(reports) == 1, reports
    with open(os.path.join(workdir, "eval", reports[0])) as f:
        assert json.load(f)["bpd"]["total"] > 0
    eval_records = [r for r in writers.read_metrics(workdir) if "eval/bpd" in r]
    assert [r["step"] for r in eval_records] == [2]
    assert np.isfinite(eval_records[0]["eval/bpd"]) and eval_records[0]["eval/bpd"] > 0


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical_and_compiles_once(tmp_path, data_dir, straight_run):
    _, straight = straight_run
    workdir = str(tmp_path)
    loop.train_and_evaluate(tiny_config(data_dir, **{"training.num_steps": 3}), workdir)
    resumed = loop.train_and_evaluate(tiny_config(data_dir, **{"training.num_steps": 6}), workdir)
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    assert loop.jitted_train_step(parallel.make_mesh(), 1).jitted._cache_size() == 1


@pytest.mark.slow
def test_metrics_stay_monotonic_when_resuming_from_an_earlier_checkpoint(tmp_path, data_dir,
                                                                        straight_run):
    # Back to the checkpoint of step 3 (as if the run had died before saving step 6); the
    # resumed run logs steps 4-6 again, and each step must appear once.
    workdir = str(tmp_path / "rewound")
    shutil.copytree(straight_run[0], workdir)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "6"))
    assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    loop.train_and_evaluate(tiny_config(data_dir, **{"training.num_steps": 6}), workdir)
    assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_load_for_sampling_returns_the_saved_weights_and_model(data_dir, straight_run):
    workdir, state = straight_run
    config, model, ema = runs.load_for_sampling(workdir)
    assert model == config_lib.model_from_config(tiny_config(data_dir))
    assert config.model.ch == 16
    jax.tree.map(np.testing.assert_array_equal, ema, state.ema_params)
    _params_close(state, workdir, 6, atol=0)


def _flip_byte(path: str, offset: int) -> bytes:
    """XORs the byte at `offset` with 0xFF; returns the file's original content."""
    original = Path(path).read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 0xFF
    Path(path).write_bytes(bytes(damaged))
    return original


@pytest.mark.slow
def test_a_flipped_byte_in_any_checkpoint_file_fails_naming_the_step_or_changes_nothing(
        tmp_path, data_dir, straight_run):
    # Every file of the checkpoint in turn, one byte each (the original put back after): a
    # restore either refuses the step or returns exactly the saved state, never other weights.
    workdir = str(tmp_path / "flipped")
    shutil.copytree(straight_run[0], workdir)
    state, config = straight_run[1], tiny_config(data_dir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), "6")
    # Every file but the empty ones and orbax's commit markers, whose content nothing reads.
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir)
                   for name in names if os.path.getsize(os.path.join(root, name))
                   and name != "commit_success.txt")
    assert sum("/d/" in f for f in files) > 3, files  # the array data files are among them
    outcomes = {}
    manager = checkpoint.make_manager(workdir, max_to_keep=1, read_only=True)
    for path in files:
        original = _flip_byte(path, os.path.getsize(path) // 2)
        name = os.path.relpath(path, step_dir)
        try:
            restored = checkpoint.restore(manager, 6, abstract, config)
        except checkpoint.CheckpointError as e:
            assert "step 6 " in str(e) and "Nothing was deleted" in str(e), (name, str(e))
            outcomes[name] = "refused: " + str(e)
        else:  # a byte nothing reads (padding, an unused field): the very same state
            jax.tree.map(np.testing.assert_array_equal, restored, state)
            outcomes[name] = "unchanged"
        finally:
            Path(path).write_bytes(original)
    manager.close()
    refused = {name: why for name, why in outcomes.items() if why.startswith("refused")}
    assert len(refused) > 3, outcomes
    # Among them flips that only the checksums catch (tensorstore decoded changed values). Which
    # array a mid-file flip lands in depends on the write order of the async save.
    caught = {name: why for name, why in refused.items() if "is corrupt: array " in why}
    assert caught, outcomes
    # The sampling path verifies too, and names the array: flip bytes of the data files until
    # one lands in a parameter array (EMA or raw), which load_for_sampling reads.
    data_files = [f for f in files if "/ocdbt.process_0/d/" in f]
    for path, fraction in itertools.product(data_files, (0.5, 0.25, 0.75, 0.1, 0.9)):
        original = _flip_byte(path, int(os.path.getsize(path) * fraction))
        manager = checkpoint.make_manager(workdir, max_to_keep=1, read_only=True)
        try:
            checkpoint.restore(manager, 6, abstract, config)
        except checkpoint.CheckpointError as e:
            array = str(e).split("array ")[1].split(" ")[0] if "array " in str(e) else ""
            if array.startswith(("ema_params/", "params/")):
                break
        finally:
            manager.close()
        Path(path).write_bytes(original)
    else:
        pytest.fail(f"no flip in {len(data_files)} data files landed in a parameter array")
    weights = "ema" if array.startswith("ema_params/") else "raw"
    with pytest.raises(checkpoint.CheckpointError, match=rf"step 6 .*corrupt: array {array} "):
        runs.load_for_sampling(workdir, weights)


@pytest.mark.slow
def test_sample_py_draws_from_a_trained_workdir(tmp_path, straight_run):
    workdir, _ = straight_run
    out = tmp_path / "grid.png"
    for weights in ("ema", "raw"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "sample.py"), "--workdir", workdir, "--num_samples", "3",
             "--batch_size", "3", "--steps", "5", f"--weights={weights}", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        images = np.load(out.with_suffix(".npz"))["images"]
        assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
        assert out.stat().st_size > 0
        assert images.std() > 0  # not a blank image


def _sample_py(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_sample_py_draws_chosen_classes_of_a_conditional_run(tmp_path, data_dir, straight_run):
    # Also the v mean type and the hybrid / learned_range pair end to end (this run compiles its
    # own step anyway). sample.py draws with a fixed variance, which a learned-variance run
    # accepts: once a crash, the model's variance channels taken for the mean.
    workdir = str(tmp_path / "conditional")
    loop.train_and_evaluate(tiny_config(data_dir, **{
            "training.num_steps": 2, "model.num_classes": 10, "diffusion.mean_type": "v",
            "diffusion.var_type": "learned_range", "diffusion.loss_type": "hybrid"}), workdir)
    records = writers.read_metrics(workdir)
    assert records and all(np.isfinite(r["vb"]) and r["vb"] > 0 for r in records), records
    out = tmp_path / "grid.png"
    proc = _sample_py("--workdir", workdir, "--num_samples", "5", "--batch_size", "4", "--steps",
                      "3", "--labels", "3,7", "--guidance", "1.5", "--sampler", "ddpm",
                      "--var_type", "fixedlarge", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = np.load(out.with_suffix(".npz"))
    assert saved["images"].shape == (5, 8, 8, 1) and saved["images"].dtype == np.uint8
    np.testing.assert_array_equal(saved["labels"], [3, 7, 3, 7, 3])
    for args, message in ((["--labels", "10"], "this model has classes 0..9"),
                          (["--labels", "3,x"], "comma-separated class numbers"),
                          (["--guidance", "1"], "--guidance=1.0 needs --labels")):
        proc = _sample_py("--workdir", workdir, *args, "--out", str(out))
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    proc = _sample_py("--workdir", straight_run[0], "--labels", "1", "--out", str(out))
    assert proc.returncode != 0 and "this model is unconditional" in proc.stderr, proc.stderr[-2000:]

    # Sample grids follow config.eval.labels / guidance: image n of class n mod 10, guided.
    config, model, params = runs.load_for_sampling(workdir, "ema")
    # Two steps leave the zero-initialised output conv near zero, so the output would not depend
    # on the label: perturb every weight so that it does.
    leaves, treedef = jax.tree.flatten(params)
    params = jax.tree.unflatten(treedef, [
            leaf + 0.2 * jax.random.normal(jax.random.PRNGKey(i), leaf.shape, leaf.dtype)
            for i, leaf in enumerate(leaves)])
    config.training.num_sample_images, config.sampling.steps = 5, 3
    config.eval.labels, config.eval.guidance = "balanced", 1.5
    mesh, schedule = parallel.make_mesh(), config_lib.schedule_from_config(config)
    loop.write_sample_grid(config, model, schedule, params, mesh, str(tmp_path / "loop.png"))
    sampler = sampling.make_sampler(sampling.ModelApply(model), schedule, (5, 8, 8, 1),
                                    SamplerSpec(sampler=config.sampling.sampler, steps=3, mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type),
                                    guidance=1.5)
    expected = sampling.draw_images(sampler, params, jax.random.PRNGKey(config.training.seed + 1),
                                    5, labels=np.arange(5) % 10, progress=False)
    images.save_image_grid(expected, str(tmp_path / "expected.png"))
    loop_grid = np.asarray(Image.open(tmp_path / "loop.png"))
    np.testing.assert_array_equal(loop_grid, np.asarray(Image.open(tmp_path / "expected.png")))
    config.eval.labels, config.eval.guidance = "none", None  # the null label: other images
    loop.write_sample_grid(config, model, schedule, params, mesh, str(tmp_path / "null.png"))
    assert (np.asarray(Image.open(tmp_path / "null.png")) != loop_grid).any()


@pytest.mark.slow
def test_train_py_refuses_a_wrong_config_value_in_one_line_and_creates_nothing(tmp_path, data_dir):
    workdir = tmp_path / "never"
    proc = subprocess.run(train_command(data_dir, str(workdir), **{"training.microbatches": 3}),
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.training.microbatches=3: it must divide training.batch_size=16" in proc.stderr
    assert "Traceback" not in proc.stderr and not workdir.exists()


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_and_left_intact(tmp_path, data_dir, straight_run):
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight_run[0], workdir)
    before = sorted(os.listdir(checkpoint.checkpoint_dir(workdir)))
    config_json = Path(workdir, loop.CONFIG_FILE).read_text()
    other = tiny_config(data_dir, **{"training.num_steps": 9, "model.ch": 32})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"(?s)step 6 .*model\.ch: saved 16, now 32.*Nothing was deleted"):
        loop.train_and_evaluate(other, workdir)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == before
    assert Path(workdir, loop.CONFIG_FILE).read_text() == config_json


@pytest.fixture(scope="module")
def corrupt_workdir(tmp_path_factory, straight_run):
    """A copy of the straight run whose latest checkpoint (step 6) has garbage array files."""
    workdir = str(tmp_path_factory.mktemp("corrupt") / "run")
    shutil.copytree(straight_run[0], workdir)
    for root, _, names in os.walk(os.path.join(checkpoint.checkpoint_dir(workdir), "6", "state")):
        for name in names:
            if "/d" in root:
                Path(root, name).write_bytes(b"garbage")
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("script,changes,message", [
    ("train.py", {"model.ch": 32}, "model.ch: saved 16, now 32"),
    ("train.py", {}, "The checkpoint is incomplete or corrupt. Nothing was deleted: move or delete"),
    ("evaluate.py", {}, "The checkpoint is incomplete or corrupt. Nothing was deleted: move or "
                        "delete"),
])
def test_scripts_refuse_an_incompatible_or_corrupt_checkpoint_in_one_line(
        data_dir, corrupt_workdir, script, changes, message):
    if script == "train.py":
        command = train_command(data_dir, corrupt_workdir, **changes)
    else:
        command = [sys.executable, str(REPO / script), f"--workdir={corrupt_workdir}",
                   "--metrics=bpd"]
    before = sorted(os.listdir(checkpoint.checkpoint_dir(corrupt_workdir)))
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "step 6" in line and message in line
            and "tensorstore_spec" not in line], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(checkpoint.checkpoint_dir(corrupt_workdir))) == before


@pytest.mark.slow
def test_nonfinite_losses_stop_training_with_a_clear_message(tmp_path, data_dir, monkeypatch):
    real = data.make_input_iterator

    def poisoned(*args, **kwargs):
        iterator = real(*args, **kwargs)

        class Poisoned:
            def __next__(self):
                batch = next(iterator)
                return dict(batch, image=batch["image"] * np.nan)
        return Poisoned()

    monkeypatch.setattr(data, "make_input_iterator", poisoned)
    workdir = str(tmp_path)
    config = tiny_config(data_dir, **{"training.num_steps": 50,
                                      "training.max_nonfinite_in_a_row": 3})
    with pytest.raises(loop.NonFiniteError, match=r"non-finite for 3 steps in a row"):
        loop.train_and_evaluate(config, workdir)
    records = writers.read_metrics(workdir)
    assert [r["nonfinite_total"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == "nan" for r in records)


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed_and_the_stop_claims_no_clean_step(
        tmp_path, data_dir, monkeypatch):
    # Values that validate refuses, forced past it: lr=nan turns the parameters NaN at step 1
    # (the loss of step 1 is still finite, so that update is not skipped); ema_decay=nan the EMA.
    monkeypatch.setattr(config_lib, "validate", lambda config: None)
    config = tiny_config(data_dir, **{"training.lr": float("nan"), "training.num_steps": 50,
                                      "training.checkpoint_every": 100,
                                      "training.max_nonfinite_in_a_row": 2})
    with pytest.raises(loop.NonFiniteError, match=r"non-finite for 2 steps in a row") as error:
        loop.train_and_evaluate(config, str(tmp_path / "lr"))
    assert "those of step" not in str(error.value)
    assert str(error.value).endswith("Newest checkpoint (every checkpoint is finite: non-finite "
                                     "saves are refused): none.")

    workdir = str(tmp_path / "ema")
    config = tiny_config(data_dir, **{"training.ema_decay": float("nan"), "training.num_steps": 6})
    with pytest.raises(checkpoint.NonFiniteStateError,
                       match=r"step 3: .*ema_params.* hold NaN or inf; there is no checkpoint"):
        loop.train_and_evaluate(config, workdir)
    assert not [name for name in os.listdir(checkpoint.checkpoint_dir(workdir))
                if not name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("name,mesh_line", [("8_devices", "Mesh: 8 devices on 1 processes"),
                                            ("2_processes", "Mesh: 2 devices on 2 processes")])
def test_sigterm_saves_and_exits_0_and_runs_agree_with_one_device(
        tmp_path, data_dir, preempted_runs, name, mesh_line):
    run = preempted_runs[name]
    codes, log = run.wait()
    assert run.signalled_at is not None, f"never reached step {PREEMPT_AFTER_STEP}:\n{log[-3000:]}"
    assert codes == [0] * len(codes), log[-5000:]
    assert mesh_line in log and "Preempted: saved the checkpoint of step" in log
    if len(codes) > 1:  # the coordinator listens on the address given, not on every interface
        assert f"Starting JAX distributed service on {run.coordinator}" in log, log[-5000:]
    manager = checkpoint.make_manager(run.workdir, max_to_keep=1, read_only=True)
    step = manager.latest_step()
    manager.close()
    assert PREEMPT_AFTER_STEP <= step < 100, step
    # The same number of steps on this process's single device.
    state = loop.train_and_evaluate(tiny_config(data_dir, **{"training.num_steps": step}),
                                    str(tmp_path))
    _params_close(state, run.workdir, step, atol=1e-5)


def _lock_holder(workdir: str) -> dict | None:
    try:
        with open(os.path.join(workdir, lock.LOCK_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_trainer_stops_at_once_and_a_killed_ones_lock_is_taken_over(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    command = train_command(data_dir, workdir, **LONG_RUN)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    procs = []

    def start(name):
        log = open(tmp_path / f"{name}.log", "w+")
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        return procs[-1], log
    try:
        first, _ = start("first")
        _wait_for(lambda: (_lock_holder(workdir) or {}).get("pid") == first.pid, 200,
                  "the first trainer's lock")
        began = time.time()
        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=200)
        assert second.returncode in (1, 2), second.stderr[-3000:]
        assert time.time() - began < 100  # before any compile
        assert (f"in use by another trainer (host {socket.gethostname()}, pid {first.pid}, "
                "since ") in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr and first.poll() is None

        first.send_signal(signal.SIGKILL)
        first.wait()
        third, third_log = start("third")
        _wait_for(lambda: (_lock_holder(workdir) or {}).get("pid") == third.pid, 200,
                  "the third trainer to take over the lock")
        third_log.seek(0)
        assert "Took over the stale lock of a trainer that is gone (host " in third_log.read()
        assert third.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_remat_on_the_cpu_is_warned_about_because_it_saves_no_memory(caplog):
    config = digits.get_config()
    config.model.remat = False
    assert not loop.warn_if_remat_cannot_save_memory(config)
    config.model.remat = True
    with caplog.at_level("WARNING"):
        assert loop.warn_if_remat_cannot_save_memory(config)
    assert "model.remat=False" in caplog.text
    # The premise, so that this warning goes when a jaxlib starts keeping the barriers: on the
    # CPU, jax.checkpoint leaves XLA's temporary memory of a gradient no smaller.

    def loss(ws, x, block):
        for w in ws:
            x = block(x, w)
        return (x ** 2).sum()

    def layer(x, w):
        for _ in range(4):
            x = jax.numpy.tanh(x @ w)
        return x

    ws, x = [np.full((64, 64), 0.01, np.float32)] * 6, np.ones((512, 64), np.float32)
    temp = {name: jax.jit(jax.grad(lambda ws, x, b=block: loss(ws, x, b))).lower(ws, x).compile()
            .memory_analysis().temp_size_in_bytes
            for name, block in (("plain", layer), ("remat", jax.checkpoint(layer)))}
    assert temp["remat"] >= temp["plain"], temp


def test_due_fires_when_a_multiple_falls_in_the_dispatch_or_at_the_last_step():
    def brute(prev, step, every, last):  # written out: any multiple of every in (prev, step]
        return step == last or (every > 0 and any(m % every == 0 for m in range(prev + 1, step + 1)))

    for every, last, k in itertools.product((0, 1, 3, 4, 10), (7, 10, 12), (1, 2, 3, 5)):
        dispatches = [(p, min(p + k, last)) for p in range(0, last, k)]
        got = [s for p, s in dispatches if loop.due(s, every, last, prev_step=p)]
        assert got == [s for p, s in dispatches if brute(p, s, every, last)], (every, last, k)
        if k == 1:  # prev_step defaults to step - 1
            assert got == [s for s in range(1, last + 1) if loop.due(s, every, last)]
    assert [s for p, s in ((0, 3), (3, 6), (6, 9), (9, 10)) if loop.due(s, 4, 10, prev_step=p)] \
        == [6, 9, 10]
    assert [s for s in range(1, 11) if loop.due(s, 0, 10)] == [10]


@pytest.mark.slow
def test_an_edited_data_iterator_position_fails_the_restore_naming_the_step(
        tmp_path, data_dir, straight_run):
    # The iterator file is JSON that still parses after a change of its position: only the
    # checksum saved with the step can tell (a resume would silently skip or repeat batches).
    workdir = str(tmp_path / "edited")
    shutil.copytree(straight_run[0], workdir)
    state, config = straight_run[1], tiny_config(data_dir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    manager = checkpoint.make_manager(workdir, max_to_keep=1, read_only=True)

    def iterator():
        return data.make_input_iterator(
                "digits", "train", global_batch_size=config.training.batch_size,
                seed=config.training.seed, image_size=8, channels=1, random_flip=False,
                mesh=parallel.make_mesh(), data_dir=data_dir)
    intact = iterator()
    checkpoint.restore(manager, 6, abstract, config, data_iterator=intact)
    position = intact.get_state()["grain"]
    path = Path(checkpoint.checkpoint_dir(workdir)) / "6" / "data" / "process_0-of-1.json"
    saved = json.loads(path.read_text())
    assert saved["grain"] == position  # the position that was saved, restored
    saved["grain"] = {key: value + 1 if isinstance(value, int) else value
                      for key, value in saved["grain"].items()}
    path.write_text(json.dumps(saved))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 6 .*data iterator state"):
        checkpoint.restore(manager, 6, abstract, config, data_iterator=iterator())
    manager.close()


def test_a_config_json_with_other_values_is_kept_aside_not_overwritten_silently(tmp_path,
                                                                                caplog):
    # Before: train.py rewrote config.json on every start; a hand edit there vanished silently.
    config = tiny_config(str(tmp_path / "data"))
    loop.save_resolved_config(config, str(tmp_path))
    written = (tmp_path / loop.CONFIG_FILE).read_text()
    loop.save_resolved_config(config, str(tmp_path))  # the same values: nothing to keep
    assert os.listdir(tmp_path) == [loop.CONFIG_FILE] and not caplog.text
    edited = written.replace('"lr": ', '"lr": 9')
    (tmp_path / loop.CONFIG_FILE).write_text(edited)
    with caplog.at_level("WARNING"):
        loop.save_resolved_config(config, str(tmp_path))
    kept = [name for name in os.listdir(tmp_path) if name != loop.CONFIG_FILE]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == edited
    assert (tmp_path / loop.CONFIG_FILE).read_text() == written
    assert f"kept it as {tmp_path / kept[0]}" in caplog.text
    assert "Training uses --config and its overrides, never config.json" in caplog.text
