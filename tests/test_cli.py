"""Command-line helpers: --steps parsing, and output paths checked before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_jax import cli

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
