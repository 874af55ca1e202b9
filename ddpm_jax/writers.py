"""Metric writers: JSON lines (workdir/metrics.jsonl) and TensorBoard event files
(workdir/tensorboard; `tensorboard --logdir WORKDIR` opens a run). Only process 0 writes; on other
processes every method is a no-op, so callers need no `if process_index() == 0`.

The event files are written synchronously with `tensorboardX`'s record writer and protos (no
TensorFlow, and no background thread: tensorboardX's `SummaryWriter` writes from a thread that
dies on a full disk, after which its bounded queue blocks the training loop). A failed event-file
write (a full disk, a vanished directory) turns the event files off with one warning; the run and
metrics.jsonl go on.
"""

from __future__ import annotations

import contextlib
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


class _EventFile:
    """One TensorBoard event file in `logdir`, appended synchronously; raises OSError on I/O
    failure (the caller turns the event files off)."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(logdir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(logdir, "events"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=name, simple_value=value)
            for name, value in values.items()])
        self._write(step, summary)

    def text(self, step: int, name: str, text: str) -> None:
        from tensorboardX.summary import text as text_summary
        self._write(step, text_summary(name, text))

    def _write(self, step: int, summary: Any) -> None:
        self._writer.write_event(
            self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _open_event_file(logdir: str) -> _EventFile | None:
    """An event file in `logdir`, or None with one warning when tensorboardX cannot be imported
    (an install without the package's declared dependencies) or the file cannot be created."""
    try:
        return _EventFile(logdir)
    except ImportError as e:
        logging.warning("TensorBoard event files are off: tensorboardX is not importable (%s); "
                        "reinstall with `pip install -e .`. Metrics still go to %s.",
                        e, METRICS_FILE)
    except OSError as e:
        logging.warning("TensorBoard event files are off: cannot create one in %s (%s). "
                        "Metrics still go to %s.", logdir, e, METRICS_FILE)
    return None


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
            self._tb = _open_event_file(os.path.join(workdir, TENSORBOARD_DIR))

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
            self._event_file_call(step, lambda: self._tb.scalars(int(step), values))

    def write_text(self, step: int, name: str, text: str) -> None:
        """Text (e.g. the resolved config) to TensorBoard only; a no-op without it."""
        if self.enabled and self._tb is not None:
            self._event_file_call(step, lambda: self._tb.text(int(step), name, text))

    def _event_file_call(self, step: int, write: Any) -> None:
        """Runs an event-file write; on OSError turns the event files off with one warning."""
        try:
            write()
        except OSError as e:
            logging.warning("TensorBoard event files stopped at step %d: %s. The run goes on; "
                            "its metrics still go to %s.", step, e, METRICS_FILE)
            tb, self._tb = self._tb, None
            with contextlib.suppress(OSError):
                tb.close()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        """Closes both files. Never raises OSError: it runs in the loop's `finally`, where an
        error of its own (a full disk) would hide the error that ended the run."""
        jsonl, self._jsonl = self._jsonl, None
        tb, self._tb = self._tb, None
        for handle, what in ((jsonl, METRICS_FILE), (tb, "the TensorBoard event file")):
            if handle is None:
                continue
            try:
                handle.close()
            except OSError as e:
                logging.warning("Could not close %s: %s.", what, e)

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
