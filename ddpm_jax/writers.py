"""Metric writers: JSON lines (always) and TensorBoard event files (when a writer is importable
without TensorFlow, i.e. `tensorboardX`). Only process 0 writes; on other processes every
method is a no-op, so callers need no `if process_index() == 0`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _tensorboard_writer(logdir: str) -> Any | None:
    """A tensorboardX SummaryWriter, or None (logged once at INFO) when it is not installed."""
    try:
        import tensorboardX
    except ImportError as e:
        logging.info("TensorBoard output is off: tensorboardX is not importable (%s). "
                     "`pip install tensorboardX` to get event files; metrics still go to %s.",
                     e, METRICS_FILE)
        return None
    return tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)


def _to_python(value: Any) -> float | int:
    """A scalar (Python, NumPy or a 0-d jax.Array) as a Python int or float."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int)):
        return int(value)
    return float(value)


class MetricWriter:
    """Writes flat dicts of scalars per step to workdir/metrics.jsonl and TensorBoard.

    Each JSON line is {"step": int, "time": unix seconds, name: value, ...}; non-finite floats
    are written as the strings "nan" / "inf" / "-inf" so that every line stays valid JSON.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, TENSORBOARD_DIR))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """step: the optimizer step the values belong to; scalars: name -> number."""
        if not self.enabled:
            return
        values = {name: _to_python(value) for name, value in scalars.items()}
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in values.items():
            record[name] = value if math.isfinite(value) else str(value)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))

    def write_text(self, step: int, name: str, text: str) -> None:
        """Text (e.g. the resolved config) to TensorBoard only; a no-op without it."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, int(step))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_records_after(workdir: str, step: int) -> int:
    """Rewrites workdir/metrics.jsonl (atomically, process 0 only) without the records of steps
    after `step`, and without a torn last line: a run resumed from the checkpoint of `step`
    writes those steps again, and the file stays monotonic. Returns how many lines it dropped."""
    path = os.path.join(workdir, METRICS_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill mid-write
            pass
    if len(kept) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info("Resuming at step %d: dropped %d later record(s) from %s.", step,
                 len(lines) - len(kept), path)
    return len(lines) - len(kept)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of workdir/metrics.jsonl, in order (for tests and notebooks)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
