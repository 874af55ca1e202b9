"""JSON-lines metrics: one valid JSON object per step, process 0 only."""

import json
import os

import jax.numpy as jnp
import numpy as np

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
