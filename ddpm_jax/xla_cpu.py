"""What this package does differently on XLA's CPU backend, each choice measured.

The backend-dependent defaults, named so that the model and step code read as math (each
function's docstring says what was measured):

  prefers_group_matmul             GroupNorm moves between channels and groups by tiny matmuls
  prefers_dense_conv               convolutions on images of <= 4 pixels run as one matmul
  prefers_unrolled_gradient_loops  the microbatch and K-step scans are unrolled
  remat_pays                       whether model.remat can save memory (the loop warns if not)

And the XLA compiler options for the UNet's programs on the CPU backend. jaxlib 0.10's CPU
compiler hands convolutions, dots and reductions to YNNPACK by default (the debug option
`xla_cpu_experimental_ynn_fusion_type` is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE). At
the UNet's shapes YNNPACK's convolutions run 1.5-3x slower than XLA's own (Eigen) ones, while
its reductions help the backward pass. `bench/xla_cpu_flags.py` measured each choice;
BENCHMARKS.md has the numbers. The presets here are the winners:

  train      YNNPACK for reductions only (train step: about 1.3x XLA's default),
  inference  no YNNPACK at all (forward and sampling: about 1.5x).

They go to `jax.jit(..., compiler_options=...)` for the programs this package builds (the train
step, the sampling chain, bits/dim), never to anything else in the process. Other backends get
nothing. `DDPM_JAX_XLA_CPU_OPTIONS=xla` restores XLA's own defaults; an
`xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is the user's choice and is left alone.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import jax

ENV_VAR = "DDPM_JAX_XLA_CPU_OPTIONS"
MODES = ("tuned", "xla")
OPTION = "xla_cpu_experimental_ynn_fusion_type"
PRESETS: dict[str, str] = {
    "train": "LIBRARY_FUSION_TYPE_REDUCE",
    "inference": "",
}

Kind = Literal["train", "inference"]


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def prefers_group_matmul() -> bool:
    """GroupNorm's default (`group_matmul=None`): move between [B, C] and [B, G] with tiny
    float32 matmuls against the [G, C] group-membership matrix, on the CPU backend only.

    There XLA folds reshape + sum and jnp.repeat into the full-size passes (a reduction over
    (H, W, C/G), a per-element group index), 1.5-2x slower than the matmul form
    (bench/bench_layers.py, BENCHMARKS.md). On GPUs and TPUs those are plain fused reductions
    and broadcasts, while each matmul would be a kernel of its own.
    """
    return _on_cpu()


DENSE_CONV_MAX_PIXELS = 4


def prefers_dense_conv(height: int, width: int) -> bool:
    """Conv's default (`dense=None`) for a k x k convolution over [B, height, width, C]: one
    matmul with the kernel's matrix on this image size instead of XLA's convolution, on the CPU
    backend for images of at most DENSE_CONV_MAX_PIXELS pixels.

    There XLA's convolution runs 3x3 kernels on 2x2 images at about 10 GFLOP/s: at batch 500, 64
    -> 64 channels, 12.3 ms forward and 21.8 ms with both gradients, against 1.3 and 1.3 ms as
    the matmul (`bench/bench_layers.py --only dense_conv`, BENCHMARKS.md); the digits UNet has 14
    such convolutions. From 4x4 up XLA's convolution is faster (the matrix grows with the square of
    the pixels). Other backends keep their convolutions.
    """
    return _on_cpu() and height * width <= DENSE_CONV_MAX_PIXELS


def prefers_unrolled_gradient_loops() -> bool:
    """The default for a lax.scan whose body takes gradients of convolutions (microbatches,
    K steps per call): unrolled on the CPU backend only.

    Inside a loop body that backend keeps the gradient convolutions in non-canonical layouts
    and compiles them to naive loops, 10-20x slower (jax-ml/jax#12868); unrolled, they reach
    its fast kernels (tests/test_training.py checks the premise in the compiled HLO).
    Elsewhere the loop stays rolled, which keeps one iteration's buffers live at a time.
    """
    return _on_cpu()


def remat_pays() -> bool:
    """Whether model.remat (jax.checkpoint) can save memory: not on the CPU backend.

    XLA's CPU compiler drops the optimization barriers that keep the recomputation apart, so
    there remat adds recomputation and leaves the gradient's temporary memory no smaller
    (bench/bench_memory.py; tests/test_loop.py checks the premise). GPUs and TPUs keep them.
    """
    return not _on_cpu()


def mode() -> str:
    """The DDPM_JAX_XLA_CPU_OPTIONS setting: tuned (default) or xla."""
    value = os.environ.get(ENV_VAR, "tuned").strip().lower() or "tuned"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {MODES}: use 'tuned' (this package's "
                         "measured CPU presets) or 'xla' (XLA's own defaults).")
    return value


@functools.cache
def _option_supported() -> bool:
    """Whether this jaxlib's CPU compiler knows OPTION (it is experimental and may move)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={OPTION: ""}).lower(1.0).compile()
        return True
    except Exception as error:  # noqa: BLE001 - any rejection means "not supported here"
        logging.warning("ddpm_jax.xla_cpu: this jaxlib (%s) rejects the compiler option %s (%s); "
                        "using XLA's CPU defaults, which run the UNet slower. Set %s=xla to "
                        "silence this.", jax.__version__, OPTION, str(error).splitlines()[0], ENV_VAR)
        return False


def compiler_options(kind: Kind) -> dict[str, str] | None:
    """Compiler options for one of this package's programs, or None for XLA's defaults.

    kind: "train" (the train step) or "inference" (forward-only: sampling, bits/dim). None unless
    the default backend is the CPU, the mode is tuned, XLA_FLAGS does not set the option itself,
    and this jaxlib accepts it.
    """
    if kind not in PRESETS:
        raise ValueError(f"kind must be one of {sorted(PRESETS)}, got {kind!r}.")
    if mode() == "xla" or not _on_cpu():
        return None
    if OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if not _option_supported():
        return None
    return {OPTION: PRESETS[kind]}
