"""The docs' examples (examples/*.py) run top to bottom as `python examples/X.py` in tiny mode
(DDPM_EXAMPLE_TINY=1) and pass the checks they print; each writes its images.

The examples are compile-bound subprocesses, so all of them start at once when the first test
asks (as test_loop.py's runs do) and each test waits for its own. The digits tour reads a
denoiser run and a classifier run holding their initial weights at step 0
(`conftest.write_untrained_run`, as the editing and guidance tests do): compiling a train step
would cost more than the tour itself, and its tiny-mode check (RePaint keeps the known pixels
exactly) holds for any weights. Its trained-model checks run in full mode only.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_untrained_run, xla_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

pytestmark = pytest.mark.slow

TIMEOUT_S = 400


class Example:
    """`python examples/<name>.py` started in tiny mode, its images going to `out`."""

    def __init__(self, name: str, out: Path, **env: str):
        self.out = out
        full_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
                        PYTHONPATH=str(REPO), DDPM_EXAMPLE_TINY="1", DDPM_EXAMPLE_OUT=str(out),
                        **env)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "examples" / f"{name}.py")],
                                     cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it exits."""
        if self._result is None:
            stdout, stderr = self.proc.communicate(timeout=TIMEOUT_S)
            self._result = (self.proc.returncode, stdout, stderr)
        return self._result

    def passed(self) -> str:
        """Its stdout, after asserting a clean exit and the example's own check line."""
        code, stdout, stderr = self.result()
        assert code == 0, stdout[-2000:] + stderr[-3000:]
        assert "check passed" in stdout, stdout[-2000:]
        return stdout


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every example started: the two that need nothing first, then the runs the tour reads."""
    from configs import digits

    tmp = tmp_path_factory.mktemp("examples")
    started = {name: Example(name, tmp / name) for name in ("two_d_math", "new_sampler")}
    started["missing_run"] = Example("digits_tour", tmp / "missing",
                                     DDPM_EXAMPLE_WORKDIR=str(tmp / "no_run"))
    run, classifier = tmp / "run", tmp / "classifier"
    write_untrained_run(digits.get_config("tiny"), str(run))
    write_untrained_run(digits.get_config("classifier_tiny"), str(classifier))
    started["digits_tour"] = Example("digits_tour", tmp / "digits_tour",
                                     DDPM_EXAMPLE_WORKDIR=str(run),
                                     DDPM_EXAMPLE_CLASSIFIER=str(classifier))
    yield started
    for example in started.values():
        if example.proc.poll() is None:
            example.proc.kill()
            example.proc.wait()


def test_two_d_math_samples_the_ring_and_plots_data_and_samples(examples):
    example = examples["two_d_math"]
    stdout = example.passed()
    assert "ancestral, 1000 steps:" in stdout and "DDIM, 50 steps:" in stdout
    plot = np.asarray(Image.open(example.out / "two_d_math.png").convert("L"))
    # Three square panels (data, ancestral, DDIM), each with points drawn inside it.
    height, width = plot.shape
    assert width == 3 * (height - 24)
    for k in range(3):
        inside = plot[30:height - 10, k * width // 3 + 10:(k + 1) * width // 3 - 10]
        assert (inside < 200).sum() > 100, k


def test_new_sampler_runs_custom_plans_on_one_compiled_chain_against_the_closed_form(examples):
    stdout = examples["new_sampler"].passed()
    assert "4 plans ran; the model was traced 1 time(s)" in stdout
    assert "quadratic timesteps: [0, 12, 49, 111, 197, 308, 444, 604, 789, 999]" in stdout


def test_digits_tour_samples_edits_and_guides_a_run(examples):
    example = examples["digits_tour"]
    stdout = example.passed()
    assert "classifier guidance, scale 2" in stdout
    for name in ("samples_default", "samples_ddim50", "inpaint", "sdedit", "guided"):
        grid = Image.open(example.out / f"digits_{name}.png")
        assert min(grid.size) >= 64, name   # 8x8 tiles upscaled to 64 pixels


def test_digits_tour_without_a_run_names_the_command_that_makes_one(examples):
    code, stdout, stderr = examples["missing_run"].result()
    assert code == 1, stdout + stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "python train.py --config configs/digits.py --workdir" in stderr, stderr[-2000:]
    assert "no_run" in stderr
