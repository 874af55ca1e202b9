"""bench/device_suite.py --smoke: the device suite's code paths on the CPU, so that it cannot rot
between the rare runs on an accelerator; and its budget: a tiny one stops it in time."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.device_report import peak_tflops, share_of_peak  # noqa: E402
from bench.device_suite import MEASUREMENTS  # noqa: E402
from bench.device_timing import time_units  # noqa: E402
from configs import cifar10  # noqa: E402

PEAK_TFLOPS = 0.05  # a made-up peak for the CPU, so that the share arithmetic runs


def run_suite(out: Path, *args: str, timeout: float = 480) -> tuple[dict, str, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device_suite.py"), "--smoke",
                           "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "device_suite.json", encoding="utf-8") as f:
        report = json.load(f)
    return report, (out / "device_suite.md").read_text(encoding="utf-8"), wall


def unet_forward_macs(ch, ch_mult, num_res_blocks, attn_resolutions, image_size, channels):
    """Multiply-adds of one image through the paper's UNet (REFERENCE.md's layout), counted from
    the architecture: every conv tap (padding included), the 1x1 maps, attention's two matmuls
    and the time-embedding dense layers."""
    temb = 4 * ch
    macs = ch * temb + temb * temb                          # time_dense_0, time_dense_1

    def res_block(size, c_in, c_out):
        shortcut = size * size * c_in * c_out if c_in != c_out else 0
        return size * size * 9 * (c_in * c_out + c_out * c_out) + shortcut + temb * c_out

    def attn(size, c):
        n = size * size
        return 4 * n * c * c + 2 * n * n * c                # q, k, v, proj_out; q k^T, weights v

    size, c = image_size, ch
    macs += size * size * 9 * channels * ch                 # conv_in
    skips = [c]
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            macs += res_block(size, c, ch * mult)
            macs += attn(size, ch * mult) if size in attn_resolutions else 0
            c = ch * mult
            skips.append(c)
        if level != len(ch_mult) - 1:
            size //= 2
            macs += size * size * 9 * c * c                 # stride-2 conv, counted at the output
            skips.append(c)
    macs += 2 * res_block(size, c, c) + attn(size, c)        # middle
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            c_out = ch * ch_mult[level]
            macs += res_block(size, c + skips.pop(), c_out)
            macs += attn(size, c_out) if size in attn_resolutions else 0
            c = c_out
        if level != 0:
            size *= 2
            macs += size * size * 9 * c * c                 # conv after the nearest x2
    return macs + size * size * 9 * c * channels            # conv_out


def test_unet_mac_count_matches_the_reference_cifar10_figure():
    # REFERENCE.md: 12.44 GFLOP per 32x32 image (2 FLOP per multiply-add).
    gflop = 2 * unet_forward_macs(128, (1, 2, 2, 2), 2, (16,), 32, 3) / 1e9
    assert gflop == pytest.approx(12.44, abs=0.005)


def test_rounds_queue_enough_units_to_fill_the_window_and_stop_at_the_deadline():
    queued = []

    def queue_one():  # a unit of 20 ms whose wait is the sleep itself
        queued.append(time.sleep(0.02))
    rates = time_units(queue_one, lambda _: None, rounds=3, window_s=0.1,
                       deadline=time.monotonic() + 60)
    assert len(rates["rounds"]) == 3 and all(2 <= n <= 5 for n in rates["units_per_round"])
    assert len(queued) == 1 + sum(rates["units_per_round"])  # the calibration unit first
    assert all(20 < r <= 50 for r in rates["rounds"]), rates  # 1 / 20 ms, less the overhead
    # Past the deadline only the first round runs, with as many units as fit (one).
    late = time_units(queue_one, lambda _: None, rounds=3, window_s=0.1,
                      deadline=time.monotonic() - 1)
    assert late["units_per_round"] == [1]
    # A unit that fills the window alone is a round of its own, the calibration included.
    long = time_units(queue_one, lambda _: None, rounds=2, window_s=0.01,
                      deadline=time.monotonic() + 60)
    assert long["units_per_round"] == [1, 1]


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"), ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"), ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"),
    ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"), ("cpu", None)])
def test_peak_table_names_the_device_or_says_why_not(kind, name):
    peak = peak_tflops(kind)
    assert peak["name"] == name
    share = share_of_peak(2e12, 50.0, peak, "bfloat16")  # 2 TFLOP per step at 50 steps/s
    assert share["achieved_tflops"] == pytest.approx(100.0)
    if name is None:
        assert share["share_of_peak"] is None and kind in share["share_reason"]
    else:
        assert share["share_of_peak"] == pytest.approx(100.0 / peak["bfloat16"])
        assert peak["float32"] <= peak["bfloat16"]


@pytest.mark.slow
def test_smoke_run_measures_everything_and_writes_the_table(tmp_path):
    # A budget that fits everything even on a loaded machine (the smoke run's default is 240 s).
    report, table, wall = run_suite(tmp_path, "--budget_s", "400",
                                    "--peak_tflops", str(PEAK_TFLOPS))
    print(f"smoke run: {wall:.1f} s wall")
    records = report["measurements"]
    assert list(records) == [m.name for m in MEASUREMENTS]
    assert report["finished"] and report["stopped"] is None
    assert report["elapsed_s"] <= report["budget_s"]
    for name, record in records.items():
        if record["status"] != "done":  # only the peer may be missing, and only with a reason
            assert name.startswith("peer_") and record["status"] == "skipped", (name, record)
            assert "torch" in record["reason"], record
            continue
        rate = record.get("steps_per_s") or record.get("seconds")
        assert 0 < rate["min"] <= rate["median"] <= rate["max"] < math.inf, (name, rate)
        assert len(rate["rounds"]) >= 1
        assert record["wall_s"] > 0 and record["what"] in table, name
        if not name.startswith("peer_"):
            assert 0 <= record["compile_s"] < record["wall_s"], (name, record)
            # The CPU reports no memory_stats(): None, with the reason.
            assert record["peak_bytes_in_use"] is None and record["memory_reason"]
            # The share is XLA's FLOPs per device x units/s over the peak.
            units = rate["median"] if "steps_per_s" in record else 1 / rate["median"]
            assert record["share_of_peak"] == pytest.approx(record["achieved_tflops"] / PEAK_TFLOPS)
            assert record["achieved_tflops"] > 0
            if "steps_per_s" in record:
                assert record["achieved_tflops"] == pytest.approx(
                        record["gflop_per_step_per_device"] * units / 1e3)
                assert math.isfinite(record["final_loss"])
    assert records["train_cifar10_bf16"]["dtype"] == "bfloat16"

    # The smoke model's FLOPs: the dense count against the architecture's multiply-adds, XLA's
    # forward count (it leaves out the padding taps, adds the elementwise work) close to it, and
    # the train step about three forward passes (backward: two) per image.
    config = cifar10.get_config("tiny")
    m = config.model
    expected = 2 * unet_forward_macs(m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions,
                                     config.data.image_size, config.data.channels) / 1e9
    model = report["models"]["cifar10"]
    assert model["forward_gflop_dense"] == pytest.approx(expected, rel=0.01)
    assert 0.85 < model["forward_gflop_xla"] / expected < 1.1
    per_image = records["train_cifar10_fp32"]["gflop_per_image"]
    assert 2.5 < per_image / expected < 3.6

    peer = records["peer_train"]
    if peer["status"] == "done":
        ours = records["train_cifar10_fp32"]["steps_per_s"]["median"]
        assert peer["ratio_to_ours"] == pytest.approx(ours / peer["steps_per_s"]["median"])
        assert peer["params"] == model["params"]  # the same network on both sides

    # The table names the device and the versions; no temporary files are left behind.
    machine = report["machine"]
    assert f"{machine['device_count']} x {machine['device_kind']}" in table
    assert f"jax {machine['versions']['jax']}" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_suite.json", "device_suite.md"]


@pytest.mark.slow
def test_a_tiny_budget_stops_the_suite_in_time_with_reasons(tmp_path):
    budget = 15.0
    report, table, wall = run_suite(tmp_path, "--budget_s", str(budget))
    assert wall < budget + 8  # the watchdog exits; interpreter start-up and exit are the rest
    assert report["elapsed_s"] <= budget + 1.5
    records = report["measurements"]
    assert list(records) == [m.name for m in MEASUREMENTS]
    missing = [name for name, r in records.items() if r["status"] != "done"]
    assert missing and missing[-1] == MEASUREMENTS[-1].name  # later figures go first
    for name in missing:
        record = records[name]
        assert record["status"] in ("skipped", "stopped"), record
        assert "budget" in record["reason"] or "deadline" in record["reason"], record
        assert f"`{name}`: {record['status']}" in table
    assert "no peak FLOP/s known for device kind 'cpu'" in report["peak"]["reason"]
