"""XLA compiler options for the UNet's programs on the CPU backend.

jaxlib 0.10's CPU compiler hands convolutions, dots and reductions to YNNPACK by default (the
debug option `xla_cpu_experimental_ynn_fusion_type` is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION,
REDUCE). At the UNet's shapes YNNPACK's convolutions run 1.5-3x slower than XLA's own (Eigen)
ones, while its reductions help the backward pass. `bench/xla_cpu_flags.py` measured each
choice; BENCHMARKS.md has the numbers. The presets here are the winners:

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
    if mode() == "xla" or jax.default_backend() != "cpu":
        return None
    if OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if not _option_supported():
        return None
    return {OPTION: PRESETS[kind]}
