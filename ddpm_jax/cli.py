"""Parsing, checks and console output shared by the top-level scripts (train.py, sample.py,
evaluate.py). Library functions take the parsed values; only the scripts call these."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def parse_steps(text: str | None) -> int | str | None:
    """A command line's --steps: None stays None (all T), digits become an int S, anything else
    ('ddimS', 'S1,S2,...') is passed on to `plans.space_timesteps` as a string."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else text


def check_solver_flags(sampler: str, eta: float | None, order: int | None) -> None:
    """ValueError (one line) for a non-zero --eta with a sampler other than ddim, or an --order
    with one other than dpm++: options that would silently do nothing."""
    if eta and sampler != "ddim":
        raise ValueError(f"--eta={eta} only applies to --sampler=ddim.")
    if order is not None and sampler != "dpm++":
        raise ValueError(f"--order={order} only applies to --sampler=dpm++.")


def check_output_path(path: str, flag: str, *, directory: bool = False) -> None:
    """Raises ValueError (one line naming `flag` and the fix) when `path` cannot be written: a
    file (directory=False) or a directory to create or fill (directory=True). Runs before any
    work, so that a bad --out does not fail only after hours of sampling. Uses os.access, so
    root passes where permission bits alone would refuse; a read-only mount still refuses."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if os.path.isdir(path) and not directory:
            raise ValueError(f"{flag}: {path} is an existing directory: name a file inside it, "
                             f"e.g. {flag}={os.path.join(path, 'samples.png')}.")
        if directory and not os.path.isdir(path):
            raise ValueError(f"{flag}: {path} is a file, not a directory: move that file aside "
                             "or choose another path.")
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            raise ValueError(f"{flag}: {path} is not writable (read-only file system or no "
                             "permission): choose a writable location.")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag}: {path} lies under {ancestor}, which is a regular file: choose "
                         "a path under a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot create {path}, {ancestor} is not writable (read-only "
                         "file system or no permission): choose a writable location.")


def drop_closed_event_loop_noise() -> None:
    """Called at the start of the command lines: when a checkpoint restore fails, orbax leaves
    the other arrays' tensorstore reads in flight; each that finishes after orbax's event loop
    closed prints an unraisable 'Event loop is closed' traceback, and their failures are logged
    by asyncio as 'Task exception was never retrieved' (the same damage the one-line error
    already reports). Drops exactly those two; anything else is printed. We run no asyncio code
    of our own."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
            lambda record: not str(record.msg).startswith("Task exception was never retrieved"))


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors, and INFO records from this project only (the package and
    the script at `script_path`)."""

    def __init__(self, script_path: str):
        super().__init__()
        self.script_path = script_path

    def filter(self, record: logging.LogRecord) -> bool:
        own = "ddpm_jax" in record.pathname or record.pathname == self.script_path
        return record.levelno >= logging.WARNING or own


class ProgressBar:
    """tqdm bar with step, loss (the last logged), steps/s and ETA.

    Created at the first report, after the first dispatch: a resumed run starts at its step,
    and the rate leaves out compilation.
    """

    def __init__(self, total: int):
        self.total = total
        self.bar = None
        self.step = 0

    def __call__(self, step: int, scalars: dict | None) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True)
        else:
            self.bar.update(step - self.step)
        self.step = step
        if scalars is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_classifier_flags(classifier: str | None, scale: float | None, classes: Any,
                           guidance: float | None) -> None:
    """ValueError (one line) for classifier-guidance flags that cannot work: a scale without a
    classifier, a classifier dir that does not exist, no --labels to guide towards, or
    classifier-free --guidance as well."""
    if scale is not None and classifier is None:
        raise ValueError("--classifier_scale needs --classifier (a classifier run's work dir).")
    if classifier is None:
        return
    if not os.path.isdir(classifier):
        raise ValueError(f"--classifier={classifier} does not exist; train one with "
                         "train.py --config configs/digits.py:classifier.")
    if classes is None:
        raise ValueError("--classifier needs --labels: the classes to guide towards (e.g. "
                         "--labels 3,7 or --labels balanced).")
    if guidance is not None:
        raise ValueError("--guidance (classifier-free) and --classifier are two methods; pick one.")
