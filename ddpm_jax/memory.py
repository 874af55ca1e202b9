"""The memory a training or sampling batch needs, estimated up front from shapes alone, and
the memory this machine has: a batch that cannot fit is refused in one line with the estimate,
instead of growing until the kernel kills the process (or until a SIGTERM waits minutes for a
step that never finishes).

How the estimate is made (a lower bound: a batch refused here cannot fit, one that passes may
still not). The network's forward pass is traced at batch 1 with `jax.make_jaxpr` (shapes
only: nothing is compiled, allocated or run), and the bytes of its largest convolution output
are taken per image: a convolution's output is always materialised (XLA fuses elementwise work
into it, never two convolutions into one buffer), and it grows linearly with the batch. Then
  training: parameters x 5 (weights, EMA, Adam's two moments, gradients)
            + the float32 batch + microbatch x 2 x that activation (its value and its gradient
            in the backward pass);
  sampling: parameters + batch x that activation + the images kept (uint8, every sample).
The machine's memory: the accelerator's `bytes_limit` where the backend reports one, else the
host's MemAvailable (/proc/meminfo), else its physical memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.config import ConfigError


class BatchTooLargeError(ConfigError):
    """A batch (or sample count) whose estimated memory exceeds the machine's: one line."""


def _shards() -> int:
    """How many ways a global batch is split before it meets one memory: each accelerator has
    its own; the CPU devices of a host share the host's."""
    cpu = jax.devices()[0].platform == "cpu"
    return jax.process_count() if cpu else jax.device_count()


def available_bytes() -> int:
    """Bytes the arrays can use: this process's first device's `bytes_limit` (GPU, TPU), else
    the host's MemAvailable, else its physical memory. (A local device: in a multi-process run
    jax.devices()[0] may belong to another process, whose memory cannot be queried.)"""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _largest_output(jaxpr: Any, primitive: str) -> int:
    """Bytes of the largest output of `primitive` in a (closed) jaxpr and its sub-jaxprs."""
    largest = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            for var in eqn.outvars:
                largest = max(largest, math.prod(var.aval.shape) * var.aval.dtype.itemsize)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_output(inner, primitive))
    return largest


def activation_bytes_per_image(model: Any, image_shape: Sequence[int]) -> int:
    """Bytes of the largest convolution output of `model`'s forward pass, per image (see the
    module docstring); traced from shapes only."""
    from ddpm_jax import training  # here: the estimate needs the model only when asked
    params = jax.eval_shape(lambda rng: training.init_params(model, rng, tuple(image_shape)),
                            jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    def forward(p: Any, x: Any, t: Any) -> Any:
        if hasattr(model, "latent_channels"):  # a latent-diffusion first stage: (x, key)
            return model.apply({"params": p}, x, jax.random.PRNGKey(0))
        return model.apply({"params": p}, x, t, train=False)
    closed = jax.make_jaxpr(forward)(params, x, t)
    largest = _largest_output(closed.jaxpr, "conv_general_dilated")
    return largest or _largest_output(closed.jaxpr, "dot_general")


def param_bytes(model: Any, image_shape: Sequence[int]) -> int:
    from ddpm_jax import training
    params = jax.eval_shape(lambda rng: training.init_params(model, rng, tuple(image_shape)),
                            jax.random.PRNGKey(0))
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:,.1f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:,.1f} MB"


def _refuse_unless_it_fits(what: str, needed: int, how: str, fix: str) -> int:
    available = available_bytes()
    if needed > available:
        raise BatchTooLargeError(f"{what} needs at least {_gb(needed)} ({how}), more than the "
                                 f"{_gb(available)} this machine has free: {fix}.")
    return needed


def check_training_batch(model: Any, image_shape: Sequence[int], batch_size: int,
                         microbatches: int = 1) -> int:
    """The estimated bytes of a train step at `batch_size` (split into `microbatches`);
    BatchTooLargeError (one line, naming --config.training.batch_size) when they cannot fit."""
    per_image = activation_bytes_per_image(model, image_shape)
    micro = -(-batch_size // (max(microbatches, 1) * _shards()))
    data = -(-batch_size // _shards()) * math.prod(image_shape) * 4
    needed = 5 * param_bytes(model, image_shape) + data + micro * 2 * per_image
    fits = max(1, available_bytes() // (2 * per_image + 4 * math.prod(image_shape))) * _shards()
    return _refuse_unless_it_fits(
            f"training.batch_size={batch_size:,}", needed,
            f"{_gb(2 * per_image * micro)} of activations: {2 * per_image:,} bytes per image x "
            f"{micro:,} images per microbatch, plus the batch and 5 copies of the parameters",
            f"lower --config.training.batch_size (about {fits:,} at most could fit) or raise "
            "--config.training.microbatches")


def check_sampling_batch(model: Any, image_shape: Sequence[int], batch_size: int,
                         num_samples: int, *, batch_flag: str = "--batch_size",
                         count_flag: str = "--num_samples") -> int:
    """The estimated bytes of drawing `num_samples` images in batches of `batch_size`;
    BatchTooLargeError (one line, naming the flags) when they cannot fit."""
    per_image = activation_bytes_per_image(model, image_shape)
    kept = num_samples * math.prod(image_shape)  # uint8, on every host
    needed = param_bytes(model, image_shape) + -(-batch_size // _shards()) * per_image + kept
    return _refuse_unless_it_fits(
            f"{count_flag}={num_samples:,} at {batch_flag}={batch_size:,}", needed,
            f"{_gb(batch_size * per_image)} of activations ({per_image:,} bytes per image in a "
            f"batch) plus {_gb(kept)} for the samples kept",
            f"lower {batch_flag}, or draw fewer {count_flag} per run")


def repaint_route_bytes(num_moves: int) -> int:
    """Bytes to build and hold a RePaint route of `num_moves` moves: two Python lists (a
    pointer each, and an int object per index) while it is built, then bool + int32 arrays."""
    return num_moves * (8 + 8 + 28 + np.dtype(bool).itemsize + 4)
