"""The device suite's peer: diffusers' UNet2DModel (bench/bench_unet.py `Peer`) on the torch
device that matches the one JAX measured, or the reason there is none.

Used by bench/device_suite.py.
"""

from __future__ import annotations

from typing import Any

import jax

from bench.bench_unet import Peer
from bench.device_timing import seconds_per_unit, time_units


def peer_device() -> tuple[str | None, str | None]:
    """(torch device, None) for the peer on the device JAX measured, or (None, the reason
    why not). On a GPU it allows TF32, as JAX's default float32 precision does there."""
    if jax.process_count() > 1:
        return None, "several processes: the peer runs on one device; run it on one host"
    backend = jax.default_backend()
    if backend not in ("gpu", "cpu"):
        return None, f"no torch device for JAX's {backend} backend (torch_xla is not used)"
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as error:
        return None, f"torch / diffusers not importable: {error}"
    if backend == "cpu":
        return "cpu", None
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuda", None


def peer_memory(peer: Peer) -> dict[str, Any]:
    """torch's peak allocation since the last reset (CUDA only), as device_memory() words it."""
    if peer.device != "cuda":
        return dict(peak_bytes_in_use=None, memory_reason="torch reports memory for CUDA only")
    return dict(peak_bytes_in_use=peer.torch.cuda.max_memory_allocated(),
                memory_reason="torch.cuda.max_memory_allocated during this figure")


def peer_figures(peer: Peer, part: str, batch: int, *, rounds: int, window_s: float,
                 deadline: float, steps_run: int = 0, steps_total: int = 0) -> dict[str, Any]:
    """part "train": the peer's train steps/s (Adam, clipping; bench_unet's step) at `batch`;
    "sample": seconds of `steps_total` DDPMScheduler steps, extrapolated from chains of the
    first `steps_run`. Every Peer run returns after its device has finished."""
    if peer.device == "cuda":
        peer.torch.cuda.reset_peak_memory_stats()
    wait = lambda _: None  # noqa: E731
    if part == "train":
        rates = time_units(peer.train_fn(batch), wait, rounds=rounds, window_s=window_s,
                           deadline=deadline)  # train_fn's first step was the warm-up
        record = dict(steps_per_s=rates, images_per_s=rates["median"] * batch)
    else:
        run = peer.sample_fn(batch, steps_run)
        run()  # warm-up (cuDNN picks its kernels)
        rates = time_units(run, wait, rounds=rounds, window_s=window_s, deadline=deadline)
        seconds = seconds_per_unit(rates, steps_total / steps_run)
        record = dict(seconds=seconds, images_per_s=batch / seconds["median"],
                      steps_run=steps_run, steps=steps_total)
    return dict(record, batch=batch, params=peer.num_params, torch_device=peer.device,
                memory=peer_memory(peer))
