"""Metric writers: JSON lines (one valid JSON object per step) and TensorBoard event files,
process 0 only; a full disk turns the event files off and never ends the run."""

import errno
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import writers


def test_jsonl_records_are_valid_json_with_python_scalars(tmp_path):
    with writers.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write_scalars(10, {"loss": jnp.float32(0.5), "nonfinite_total": np.int32(2)})
        writer.write_scalars(20, {"loss": float("nan"), "grad_norm": float("inf")})
    text = (tmp_path / writers.METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON for any reader
    assert [json.loads(line)["step"] for line in text.splitlines()] == [10, 20]
    records = writers.read_metrics(str(tmp_path))
    assert records[0]["loss"] == 0.5 and records[0]["nonfinite_total"] == 2
    assert isinstance(records[0]["nonfinite_total"], int)
    assert records[1]["loss"] == "nan" and records[1]["grad_norm"] == "inf"


def test_other_processes_write_nothing(tmp_path):
    writer = writers.MetricWriter(str(tmp_path / "w"), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "w")


def test_drop_records_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / writers.METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 3, 4, 5)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # killed mid-write
    assert writers.drop_records_after(str(tmp_path), 3) == 3
    assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [1, 2, 3, 3]
    assert writers.drop_records_after(str(tmp_path), 3) == 0  # nothing to drop: untouched
    assert writers.drop_records_after(str(tmp_path / "fresh"), 0) == 0  # no file yet
    assert sorted(os.listdir(tmp_path)) == [writers.METRICS_FILE]  # no temporary left


def _event_scalars(logdir):
    """{(tag, step): value} read back from TensorBoard event files. Written from the TFRecord
    spec, not from the writer: each record is its length (uint64 LE), a 4-byte CRC, the Event
    proto, a 4-byte CRC; the proto is parsed with tensorboardX's generated Event class."""
    from tensorboardX.proto import event_pb2
    values = {}
    for name in sorted(os.listdir(logdir)):
        data = (logdir / name).read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                values[value.tag, event.step] = value.simple_value
        assert offset == len(data)  # no torn record
    return values


def test_event_files_are_written_by_default_and_hold_the_scalars(tmp_path):
    with writers.MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(10, {"loss": 0.5, "grad_norm": np.float32(2.0)})
        writer.write_text(10, "config", "lr: 2e-4")
        writer.write_scalars(20, {"loss": 0.25})
        # Readable while the run goes on: every write is flushed.
        assert _event_scalars(tmp_path / writers.TENSORBOARD_DIR)[("loss", 20)] == 0.25
    logdir = tmp_path / writers.TENSORBOARD_DIR
    assert [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents")]
    scalars = _event_scalars(logdir)
    assert scalars[("loss", 10)] == 0.5 and scalars[("loss", 20)] == 0.25
    assert scalars[("grad_norm", 10)] == 2.0


class _FullDisk:
    """A file object whose writes fail with ENOSPC (a disk that filled up mid-run)."""

    def write(self, data=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = write


def test_a_full_disk_turns_the_event_files_off_with_one_warning_and_the_run_goes_on(
        tmp_path, monkeypatch):
    from absl import logging as absl_logging
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    writer = writers.MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 1.0})
    writer._tb._writer._py_recordio_writer._writer = _FullDisk()  # the disk fills up
    writer.write_scalars(2, {"loss": 0.5})
    writer.write_scalars(3, {"loss": 0.25})
    writer.write_text(3, "note", "still running")
    writer.close()  # never raises: it runs in the loop's finally
    assert len(warnings) == 1 and "stopped at step 2" in warnings[0], warnings
    assert "No space left" in warnings[0] and writers.METRICS_FILE in warnings[0]
    assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [1, 2, 3]
    assert _event_scalars(tmp_path / writers.TENSORBOARD_DIR) == {("loss", 1): 1.0}


def test_close_on_a_full_disk_warns_instead_of_raising(tmp_path, monkeypatch):
    from absl import logging as absl_logging
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    writer = writers.MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 1.0})
    writer._jsonl.close()
    writer._jsonl = _FullDisk()
    writer._tb._writer._py_recordio_writer._writer = _FullDisk()
    writer.close()
    assert len(warnings) == 2 and all("Could not close" in w for w in warnings), warnings


def test_an_unwritable_log_dir_is_one_warning_not_an_error(tmp_path, monkeypatch):
    from absl import logging as absl_logging
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    (tmp_path / writers.TENSORBOARD_DIR).write_text("a file where the directory should be")
    with writers.MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"loss": 1.0})
    assert len(warnings) == 1 and "event files are off" in warnings[0], warnings
    assert writers.read_metrics(str(tmp_path))[0]["loss"] == 1.0
