"""The device suite's report: what machine ran it, the peak FLOP/s of known accelerators, and the
JSON + Markdown files, rewritten whole (atomically) after every measurement.

Used by bench/device_suite.py; see docs/device_suite.md for what each figure means.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from typing import Any

import jax

JSON_NAME = "device_suite.json"
MARKDOWN_NAME = "device_suite.md"

# Dense (no 2:4 sparsity) peak TFLOP/s per JAX device, by the precision a program's matmuls and
# convolutions run in. JAX's default precision computes float32 matmuls and convolutions as
# TF32 on Ampere / Hopper GPUs and as one bfloat16 pass on TPUs, so a float32 program's share is
# taken against that rate ("float32" below); "bfloat16" is bfloat16 compute. Sources: NVIDIA's
# H100 datasheet (SXM5: BF16 1,979 / TF32 989 TFLOP/s with sparsity, half that dense; PCIe: 1,513
# / 756; NVL: 1,671 / 835), the H200 datasheet (SXM: as H100 SXM; NVL: as H100 NVL), the A100
# datasheet (BF16 312, TF32 156 dense, SXM and PCIe alike), Google Cloud's TPU system
# architecture pages (per chip, bf16: v3 123 with 2 cores, each a JAX device; v4 275; v5e 197;
# v5p 459; v6e 918).
# Patterns are matched in order against the lower-cased `device_kind`; the first whose words all
# occur wins, so specific names come before general ones.
PEAKS: tuple[tuple[tuple[str, ...], str, float, float], ...] = (
    # (words in device_kind, name, float32 (TF32 / bf16-pass) TFLOP/s, bfloat16 TFLOP/s)
    (("h100", "pcie"), "NVIDIA H100 PCIe", 378.0, 756.0),
    (("h100", "nvl"), "NVIDIA H100 NVL", 417.5, 835.0),
    (("h100",), "NVIDIA H100 SXM", 494.7, 989.4),
    (("h200", "nvl"), "NVIDIA H200 NVL", 417.5, 835.0),
    (("h200",), "NVIDIA H200 SXM", 494.7, 989.4),
    (("a100",), "NVIDIA A100", 156.0, 312.0),
    (("tpu", "v6"), "TPU v6e", 918.0, 918.0),
    (("tpu", "v5", "lite"), "TPU v5e", 197.0, 197.0),
    (("tpu", "v5e"), "TPU v5e", 197.0, 197.0),
    (("tpu", "v5"), "TPU v5p", 459.0, 459.0),
    (("tpu", "v4"), "TPU v4", 275.0, 275.0),
    (("tpu", "v3"), "TPU v3 (one core)", 61.5, 61.5),
)


def peak_tflops(device_kind: str, override: float | None = None) -> dict[str, Any]:
    """{"name", "float32", "bfloat16" (TFLOP/s per device), "source"}, or {"reason"} with the
    other fields None for a device not in PEAKS. override: one dense peak for both dtypes (a
    device missing from the table)."""
    if override is not None:
        return dict(name=device_kind, float32=override, bfloat16=override,
                    source="--peak_tflops", reason=None)
    kind = device_kind.lower()
    for words, name, fp32, bf16 in PEAKS:
        if all(word in kind for word in words):
            return dict(name=name, float32=fp32, bfloat16=bf16, source="datasheet (PEAKS)",
                        reason=None)
    return dict(name=None, float32=None, bfloat16=None, source=None,
                reason=f"no peak FLOP/s known for device kind {device_kind!r}: add it to "
                       "bench/device_report.py PEAKS or pass --peak_tflops")


def share_of_peak(flops_per_device: float | None, units_per_s: float, peak: dict[str, Any],
                  dtype: str) -> dict[str, Any]:
    """Achieved TFLOP/s per device (XLA's FLOPs of one unit on one device x units/s) and its
    share of the device's peak for `dtype`; share None with the reason when no peak is known."""
    if flops_per_device is None or not flops_per_device > 0:
        return dict(achieved_tflops=None, share_of_peak=None,
                    share_reason="XLA's cost analysis reported no FLOP count")
    achieved = flops_per_device * units_per_s / 1e12
    if peak[dtype] is None:
        return dict(achieved_tflops=achieved, share_of_peak=None, share_reason=peak["reason"])
    return dict(achieved_tflops=achieved, share_of_peak=achieved / peak[dtype],
                peak_tflops=peak[dtype], share_reason=None)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def describe_machine() -> dict[str, Any]:
    """The devices JAX sees, the driver and the library versions."""
    device = jax.devices()[0]
    packages = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax",
                "optax", "numpy", "torch", "diffusers")
    return dict(
            backend=jax.default_backend(), device_kind=device.device_kind,
            device_count=jax.device_count(), local_device_count=jax.local_device_count(),
            process_count=jax.process_count(),
            platform_version=" ".join(str(getattr(getattr(device, "client", None),
                                                  "platform_version", "")).split()) or None,
            driver=_nvidia_driver() if device.platform == "gpu" else None,
            cpu_count=os.cpu_count(), python=platform.python_version(),
            versions={name: v for name in packages if (v := _version(name)) is not None},
            default_matmul_precision=getattr(jax.config, "jax_default_matmul_precision", None),
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            xla_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            date=time.strftime("%Y-%m-%d"))


class Report:
    """The suite's results, written to `out_dir` (process 0 only) after every change, under a
    lock shared with the deadline watchdog."""

    def __init__(self, out_dir: str, header: dict[str, Any], names: tuple[str, ...],
                 started: float):
        self.out_dir, self.started, self.lock = out_dir, started, threading.RLock()
        self.data = dict(header, finished=False, stopped=None,
                         measurements={name: dict(status="pending") for name in names})
        self.write_enabled = jax.process_index() == 0
        if self.write_enabled:
            os.makedirs(out_dir, exist_ok=True)

    def set(self, name: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.data["measurements"][name] = record
            self.write()

    def write(self) -> None:
        """Both files, each through a temporary file in the same directory and os.replace, so
        a kill at any moment leaves the last complete pair."""
        if not self.write_enabled:
            return
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
            texts = {JSON_NAME: json.dumps(self.data, indent=2, default=float) + "\n",
                     MARKDOWN_NAME: markdown(self.data)}
            for name, text in texts.items():
                fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{name}.")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, os.path.join(self.out_dir, name))


# ----------------------------------------------------------------------------------- Markdown

def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _result(record: dict[str, Any]) -> tuple[str, str]:
    """(the median with its unit and images/s, the min-max of the rounds) of a finished
    measurement."""
    images = f"{record['images_per_s']:,.{1 if record['images_per_s'] < 100 else 0}f} img/s"
    if "seconds" in record:
        s = record["seconds"]
        return f"{s['median']:.2f} s ({images})", f"{s['min']:.2f}-{s['max']:.2f}"
    r = record["steps_per_s"]
    return f"{r['median']:.1f} steps/s ({images})", f"{r['min']:.1f}-{r['max']:.1f}"


def markdown(data: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md: one row per measurement, skipped ones with their reason."""
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    peak = data["peak"]
    peak_text = (f"{peak['name']}: {peak['float32']:g} TFLOP/s float32 (TF32 / bf16 pass), "
                 f"{peak['bfloat16']:g} bfloat16, dense, per device ({peak['source']})"
                 if peak["name"] else f"none ({peak['reason']})")
    status = ("finished" if data["finished"] else
              f"stopped: {data['stopped']}" if data["stopped"] else "running")
    lines = [f"**{m['device_count']} x {m['device_kind']}** ({m['backend']}, "
             f"{m['process_count']} process(es); driver {m['driver'] or '-'}; platform "
             f"{m['platform_version'] or '-'}; {m['cpu_count']} CPUs), {m['date']}. {versions}.",
             "",
             f"Peak FLOP/s: {peak_text}. Budget {data['budget_s']:g} s, used "
             f"{data.get('elapsed_s', 0):.0f} s ({status})"
             + ("; SMOKE RUN (tiny shapes)." if data["smoke"] else "."),
             "",
             "| figure | result | rounds (min-max) | compile s | peak device memory "
             "| share of peak | reference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    skipped = []
    for name, record in data["measurements"].items():
        if record["status"] != "done":
            skipped.append(f"- `{name}`: {record['status']}"
                           + (f" ({record['reason']})" if record.get("reason") else ""))
            continue
        result, spread = _result(record)
        if record.get("ratio_to_ours") is not None:
            result += f"; ours {record['ratio_to_ours']:.2f}x as fast"
        memory = record.get("peak_bytes_in_use")
        memory = "-" if memory is None else f"{memory / 2**30:.1f} GiB"
        share = record.get("share_of_peak")
        share = "-" if share is None else \
            f"{100 * share:.0f}% ({record['achieved_tflops']:.3g} TFLOP/s)"
        reference = "; ".join(filter(None, (record.get("reference"), record.get("ratio_reason"))))
        lines.append(f"| {record['what']} | {result} | {spread} | {_fmt(record.get('compile_s'))} "
                     f"| {memory} | {share} | {reference} |")
    if skipped:
        lines += ["", "Not measured:", *skipped]
    return "\n".join(lines) + "\n"
