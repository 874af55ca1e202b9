"""Command-line helpers: --steps parsing, and output paths checked before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_jax import cli
from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]


def test_parse_steps_keeps_strings_and_makes_digits_ints():
    assert cli.parse_steps(None) is None
    assert cli.parse_steps(" 50 ") == 50
    assert cli.parse_steps("ddim50") == "ddim50"


def test_writable_output_paths_pass(tmp_path):
    cli.check_output_path(str(tmp_path / "new" / "deeper" / "s.png"), "--out")
    (tmp_path / "old.png").write_bytes(b"")
    cli.check_output_path(str(tmp_path / "old.png"), "--out")  # overwritten
    cli.check_output_path(str(tmp_path), "--workdir", directory=True)


def test_output_under_a_regular_file_is_refused_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out: .*/file/sub/s.png lies under .*/file, which is "
                                         r"a regular file: choose a path under a directory\.$"):
        cli.check_output_path(str(tmp_path / "file" / "sub" / "s.png"), "--out")
    with pytest.raises(ValueError, match=r"^--workdir: .*/file is a file, not a directory"):
        cli.check_output_path(str(tmp_path / "file"), "--workdir", directory=True)


def test_output_naming_an_existing_directory_is_refused_with_a_file_inside_it(tmp_path):
    with pytest.raises(ValueError, match=rf"^--out: {tmp_path} is an existing directory: name a "
                                         rf"file inside it, e.g. --out={tmp_path}/samples.png\.$"):
        cli.check_output_path(str(tmp_path), "--out")


def test_output_in_a_read_only_place_is_refused(tmp_path, monkeypatch):
    # As root every directory is writable by mode bits, so os.access is what the check asks.
    (tmp_path / "old.png").write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=rf"^--out: cannot create .*, {tmp_path} is not writable"):
        cli.check_output_path(str(tmp_path / "new.png"), "--out")
    with pytest.raises(ValueError, match=r"^--out: .*old.png is not writable"):
        cli.check_output_path(str(tmp_path / "old.png"), "--out")


def _run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("script,args,message", [
    ("sample.py", ["--out={tmp}/file/s.png"], "--out: {tmp}/file/s.png lies under {tmp}/file"),
    ("sample.py", ["--out={tmp}/dir.png"], "--out: {tmp}/dir.png is an existing directory"),
    ("evaluate.py", [], "--workdir: {tmp}/run/eval is a file, not a directory"),
    ("evaluate.py", ["--cache_dir={tmp}/file"], "--cache_dir: {tmp}/file is a file, not"),
])
def test_scripts_stop_on_a_bad_output_path_in_one_line_before_loading(tmp_path, script, args,
                                                                      message):
    # The work dir holds no checkpoint: a late check would fail with "No checkpoint" instead.
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / ("eval" if script == "evaluate.py" else "notes.txt")).write_text("x")
    if args and script == "evaluate.py":
        (run / "eval").unlink()
    proc = _run(script, f"--workdir={run}", *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode in (1, 2), proc.stderr[-2000:]
    assert message.format(tmp=tmp_path) in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "No checkpoint" not in proc.stderr


# ------------------------------------------- train.py: expected mistakes in one line, exit 1/2

TINY_TRAIN = ["--config", f"{REPO}/configs/digits.py:tiny", "--progress_bar=false",
              "--preemption_service=false", "--config.data.image_size=8",
              "--config.model.attn_resolutions=(4,)"]


def _one_line_failure(proc, *messages):
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for message in messages:
        assert message in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_train_py_names_an_unknown_config_field(tmp_path):
    proc = _run("train.py", *TINY_TRAIN, f"--workdir={tmp_path}/run", "--config.training.nope=1")
    _one_line_failure(proc, "--config.training.nope: the config has no field `nope`",
                      "unknown field")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_py_refuses_an_empty_workdir_and_creates_nothing(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY_TRAIN, "--workdir="],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    _one_line_failure(proc, "--workdir is empty: name the run's directory")
    assert not os.listdir(tmp_path)  # no ./checkpoints


@pytest.mark.slow
def test_train_py_refuses_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    proc = _run("train.py", *TINY_TRAIN, f"--workdir={tmp_path}/run")
    _one_line_failure(proc, f"--workdir: {tmp_path}/run is a file, not a directory")


@pytest.mark.slow
def test_train_py_says_the_data_is_not_prepared(tmp_path):
    proc = _run("train.py", *TINY_TRAIN, f"--workdir={tmp_path}/run",
                "--config.data.dataset=cifar10", f"--config.data.data_dir={tmp_path}/tfds",
                "--config.data.channels=3")
    _one_line_failure(proc, "Data set 'cifar10' is not prepared in",
                      "python -m ddpm_jax.data cifar10")


@pytest.mark.slow
def test_train_py_tells_to_change_the_batch_size_when_the_devices_do_not_divide_it(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(3))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY_TRAIN,
                           f"--workdir={tmp_path}/run", "--config.training.batch_size=16"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    _one_line_failure(proc, "training.batch_size=16 does not split over the 3 devices: set "
                            "--config.training.batch_size to a multiple of 3")
    assert "microbatches" not in proc.stderr.strip().splitlines()[-1]


_REFUSED_SAVE = """
import runpy, sys
from ddpm_jax import checkpoint, loop
def refused(*args, **kwargs):
    raise checkpoint.NonFiniteStateError("Refused to save the checkpoint of step 3: ['ema_params']"
                                         "['w'] hold NaN or inf; there is no checkpoint yet.")
loop.train_and_evaluate = refused
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_train_py_reports_a_refused_non_finite_save_in_one_line(tmp_path):
    # The refusal itself is tested in test_loop; here only how train.py reports it.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _REFUSED_SAVE, str(REPO / "train.py"),
                           *TINY_TRAIN, f"--workdir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    _one_line_failure(proc, "Refused to save the checkpoint of step 3")


# --------------------------------------- issue 29: the last tracebacks and misleading messages

def test_a_regular_file_as_workdir_is_named_a_file_not_missing(tmp_path):
    # Before: "--workdir=... does not exist; train into it with train.py first".
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match=rf"^--workdir={tmp_path}/run is a file, not a run "
                                         r"directory: pass the directory that train.py wrote"):
        cli.check_run_dir(str(tmp_path / "run"), "--workdir")


def test_a_dangling_symlink_as_output_is_refused_before_any_work(tmp_path):
    # Before: accepted, then PIL's open failed with a FileNotFoundError traceback at the end.
    os.symlink(tmp_path / "gone" / "x.png", tmp_path / "link.png")
    with pytest.raises(ValueError, match=rf"^--out: {tmp_path}/link.png is a dangling symlink "
                                         rf"\(to {tmp_path}/gone/x.png, which does not exist\): "
                                         r"remove the link, or choose another path\.$"):
        cli.check_output_path(str(tmp_path / "link.png"), "--out")


@pytest.mark.parametrize("out, message", [
    ("{tmp}/.png", "--out={tmp}/.png has no file name before .png: name the file, e.g. "
                   "--out={tmp}/samples.png."),
    ("{tmp}/s.jpg", "--out={tmp}/s.jpg must end in .png (the .npz goes beside it)."),
])
def test_a_png_output_needs_a_name_before_its_suffix(tmp_path, out, message):
    # Before: --out DIR/.png passed and PIL failed after sampling ("unknown file extension").
    with pytest.raises(ValueError) as refused:
        cli.check_png_output(out.format(tmp=tmp_path), "--out")
    assert str(refused.value) == message.format(tmp=tmp_path)
    cli.check_png_output(str(tmp_path / "s.png"), "--out")


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.py", "--config={tmp}/missing.py: no such file '{tmp}/missing.py'; pass an "
                         "experiment file"),
    ("{tmp}/notes.txt", "--config={tmp}/notes.txt: {tmp}/notes.txt is not a Python config file"),
    ("{tmp}/broken.py", "--config={tmp}/broken.py: NameError: name 'x' is not defined"),
    ("{repo}/configs/digits.py:nosuch", "--config={repo}/configs/digits.py:nosuch: ValueError: "
                                        "unknown variant 'nosuch' for configs/digits.py: use one "
                                        "of '', 'tiny'"),
])
def test_a_config_file_that_cannot_load_is_named_in_one_line(tmp_path, spec, message):
    # Before: ml_collections' tracebacks (an OSError, the file's NameError, a ValueError).
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.py").write_text("x\n")
    with pytest.raises(ValueError) as refused:
        cli.check_config_file(spec.format(tmp=tmp_path, repo=REPO))
    assert str(refused.value).startswith(message.format(tmp=tmp_path, repo=REPO))
    assert "\n" not in str(refused.value)
    cli.check_config_file(f"{REPO}/configs/digits.py:tiny")


def _digits(variant):
    sys.path.insert(0, str(REPO))
    from configs import digits
    return digits.get_config(variant)


def test_learned_variance_on_a_fixed_variance_run_is_refused_naming_the_run(tmp_path):
    # Before: a ValueError traceback from inside the traced sampler.
    config = _digits("tiny")
    with pytest.raises(ValueError, match=r"^--var_type=learned needs a network trained to output "
                                         r"a variance; this run's is fixed \(diffusion.var_type="
                                         r"'fixedlarge', 1 output channels\): use "
                                         r"--var_type=fixedlarge or fixedsmall"):
        cli.check_var_type("learned", config)
    for allowed in (None, "fixedsmall", "fixedlarge"):
        cli.check_var_type(allowed, config)


def test_a_classifier_run_given_as_the_model_is_named_with_the_fix():
    # Before: "var_type 'fixedlarge' needs a model output of C = 1 channels ...; got 10".
    with pytest.raises(ValueError, match=r"^--workdir=runs/clf is a classifier run "
                                         r"\(model.kind='classifier'\), not a denoiser: .* as "
                                         r"--classifier=runs/clf"):
        cli.check_denoiser(_digits("classifier_tiny"), "--workdir", "runs/clf")
    cli.check_denoiser(_digits("tiny"), "--workdir", "runs/digits")
