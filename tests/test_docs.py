"""The front door and the documentation site: README is short, its links resolve, its install
and test commands are the ones CI runs, its commands and Python run as written (on a tiny
model), and the MkDocs site builds with `--strict` (no broken link, every API page resolves)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 250
# What makes README's main job a tiny one: the digits config shrunk as configs/base.make_tiny
# does, a few steps (appended to the command, so the command's own flags are still parsed).
TINY_TRAINING = ["--config.model.ch=16", "--config.model.num_groups=8",
                 "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
                 "--config.model.attn_resolutions=(4,)", "--config.training.batch_size=8",
                 "--config.training.num_steps=4", "--config.training.checkpoint_every=4",
                 "--config.training.sample_every=4", "--config.training.num_sample_images=4",
                 "--config.sampling.batch_size=4", "--progress_bar=false",
                 "--preemption_service=false"]


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The command lines of a bash block, comments dropped and continuations joined."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _slug(heading: str) -> str:
    """GitHub's (and Python-Markdown's toc) anchor of a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_readme_is_a_short_front_door():
    text = _readme()
    assert len(text.splitlines()) <= MAX_README_LINES
    for word in ("session", "runs/q"):
        assert word not in text.lower(), f"README speaks of {word!r}"


def test_readme_links_and_anchors_resolve():
    text = _readme()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.join(REPO, path)
        assert os.path.exists(target), f"README links to a missing file: {link}"
        if anchor:
            with open(target, encoding="utf-8") as f:
                headings = re.findall(r"^#+ (.+)$", f.read(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"no heading for {link}"


def test_ci_runs_the_install_and_test_commands_that_readme_gives():
    bash = [c for block in _blocks(_readme(), "bash") for c in _commands(block)]
    install = [c for c in bash if c.startswith("pip install")]
    tests = [c for c in bash if c.startswith("python -m pytest")]
    assert len(install) == 1 and len(tests) == 1, (install, tests)
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert install[0] in ci and tests[0] in ci
    assert ci.index(install[0]) < ci.index(tests[0])


@pytest.mark.slow
def test_readme_commands_and_python_run_as_written(tmp_path):
    # README's work dir `runs/digits` becomes one under tmp_path (never the checkout's).
    text = _readme()
    workdir = str(tmp_path / "runs" / "digits")
    bash = [c for block in _blocks(text, "bash") for c in _commands(block)]
    scripts = [shlex.split(c.replace("runs/digits", workdir)) for c in bash
               if c.startswith("python ") and ".py" in c and "pytest" not in c]
    assert [argv[1] for argv in scripts] == ["train.py", "sample.py"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags())
    for argv in scripts:
        argv = [sys.executable, *argv[1:]] + (TINY_TRAINING if argv[1] == "train.py" else [])
        argv = [a.replace("samples.png", str(tmp_path / "samples.png")) for a in argv]
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "samples.png") and os.path.exists(tmp_path / "samples.npz")
    python = _blocks(text, "python")
    assert python
    for block in python:
        code = block.replace('"runs/digits"', repr(workdir))
        code += "\nprint('README-BLOCK-OK', images.shape, float(abs(images).max()))\n"
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The comment's promise: 16 images of the digits' shape, in [-1, 1].
        ok = [line for line in proc.stdout.splitlines() if line.startswith("README-BLOCK-OK")]
        assert ok and ok[0].startswith("README-BLOCK-OK (16, 8, 8, 1)"), proc.stdout
        assert float(ok[0].split()[-1]) <= 1.0


def test_the_documentation_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: "
                        "pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    # The API reference resolved the docstrings of a module, and the examples became pages.
    with open(site / "api" / "ddpm_jax.diffusion" / "index.html", encoding="utf-8") as f:
        assert "q_sample" in f.read()
    for name in ("two_d_math", "digits_tour", "new_sampler"):
        assert (site / "examples" / name / "index.html").exists()
