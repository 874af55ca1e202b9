"""The UNet's layers one by one on the CPU: what each formulation and each XLA CPU preset costs,
beside PyTorch's oneDNN kernels, all in one run. This is where the choices in
`ddpm_jax/models/unet.py` (GroupNorm, Conv) and `ddpm_jax/xla_cpu.py` (presets) come from.

    python bench/bench_layers.py                 # all shapes of the small and CIFAR-10 UNets
    python bench/bench_layers.py --only groupnorm

Measures, at batch 32 and UNet shapes:
  * groupnorm (+ swish): flax's nn.GroupNorm and ours with group_matmul=False ("repeat",
    reshape + jnp.repeat: the default off the CPU) and True ("ours": the CPU default), forward
    and forward+backward (ms), under XLA's defaults and the train / inference presets; and
    PyTorch's group_norm + silu;
  * conv_dw: the kernel gradient under XLA's defaults (YNNPACK) and the train preset (Eigen),
    and PyTorch's conv2d_weight (oneDNN), GFLOP/s;
  * conv_dtype: a 3x3 conv forward in float32 and bfloat16 under each preset, GFLOP/s;
  * dense_conv (`--only dense_conv`, batch 500 as the digits sampler runs): a 3x3 conv on 1x1 to
    8x8 images through XLA's convolution and as Conv(dense=True)'s one matmul, forward and
    forward+backward (ms), and PyTorch's conv2d; the threshold of `xla_cpu.prefers_dense_conv`.
Prints one JSON line per measurement and a table. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ddpm_jax import xla_cpu  # noqa: E402
from ddpm_jax.models.unet import NORM_EPS, Conv, GroupNorm  # noqa: E402

BATCH = 32
# (H, C_in, C_out) of the 3x3 convs / GroupNorms that dominate the two benchmark UNets.
SHAPES = [(32, 32, 32), (32, 96, 32), (32, 64, 64), (16, 64, 64), (32, 128, 128), (16, 256, 256)]
_DN = ("NHWC", "HWIO", "NHWC")


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _plain_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=_DN)


def fwd_bwd_ms(apply: Callable, params: Any, x: Any, dy: Any, options: dict | None,
               repeats: int) -> dict[str, float]:
    """Milliseconds of apply(params, x) forward, and forward + both gradients against dy."""
    fwd = jax.jit(apply, compiler_options=options)
    both = jax.jit(lambda p, x: jax.vjp(apply, p, x)[1](dy), compiler_options=options)
    return dict(forward_ms=median_ms(lambda: fwd(params, x), repeats),
                fwd_bwd_ms=median_ms(lambda: both(params, x), repeats))


def torch_fwd_bwd_ms(fn: Callable, inputs: tuple, dy: Any, repeats: int) -> dict[str, float]:
    """The same for a PyTorch function of the tensors `inputs` (which require grad)."""
    import torch

    def forward():
        with torch.no_grad():
            return fn()
    return dict(forward_ms=median_ms(forward, repeats),
                fwd_bwd_ms=median_ms(lambda: torch.autograd.grad(fn(), inputs, dy), repeats))


def presets() -> dict[str, dict[str, str] | None]:
    os.environ[xla_cpu.ENV_VAR] = "tuned"
    return {"xla_default": None, "train_preset": xla_cpu.compiler_options("train"),
            "inference_preset": xla_cpu.compiler_options("inference")}


def bench_groupnorm(repeats: int, emit) -> None:
    for height, channels, _ in SHAPES:
        x = jax.random.normal(jax.random.key(0), (BATCH, height, height, channels))
        dy = jax.random.normal(jax.random.key(1), x.shape)
        modules = {"flax": nn.GroupNorm(num_groups=32, epsilon=NORM_EPS, use_fast_variance=False),
                   "repeat": GroupNorm(32, group_matmul=False),
                   "ours": GroupNorm(32, group_matmul=True)}
        params = modules["flax"].init(jax.random.key(2), x)
        for preset, options in presets().items():
            for name, module in modules.items():
                emit(dict(kind="groupnorm", shape=[BATCH, height, height, channels], preset=preset, impl=name,
                          **fwd_bwd_ms(lambda p, x, m=module: nn.swish(m.apply(p, x)), params, x, dy,
                                       options, repeats)))
        try:
            import torch
        except ImportError:
            continue
        torch.set_num_threads(os.cpu_count() or 1)
        xt = torch.randn(BATCH, channels, height, height, requires_grad=True)
        dyt = torch.randn(BATCH, channels, height, height)
        weight, bias = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
        gn = lambda: torch.nn.functional.silu(  # noqa: E731
            torch.nn.functional.group_norm(xt, 32, weight, bias, NORM_EPS))
        emit(dict(kind="groupnorm", shape=[BATCH, height, height, channels], preset="-",
                  impl="torch", **torch_fwd_bwd_ms(gn, (xt, weight, bias), dyt, repeats)))


def bench_conv_grads(repeats: int, emit) -> None:
    options = presets()
    for height, c_in, c_out in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (BATCH, height, height, c_in))
        k = 0.05 * jax.random.normal(keys[1], (3, 3, c_in, c_out))
        dy = jax.random.normal(keys[2], (BATCH, height, height, c_out))
        gflop = 2 * BATCH * height * height * c_in * c_out * 9 / 1e9
        shape = [BATCH, height, height, c_in, c_out]
        for preset in ("xla_default", "train_preset"):
            dw = jax.jit(lambda x, k: jax.vjp(lambda k: _plain_conv(x, k), k)[1](dy)[0],
                         compiler_options=options[preset])
            emit(dict(kind="conv_dw", shape=shape, impl="xla", preset=preset,
                      gflops=gflop / median_ms(lambda: dw(x, k), repeats) * 1e3))
        try:
            import torch
        except ImportError:
            continue
        torch.set_num_threads(os.cpu_count() or 1)
        xt, dyt = torch.randn(BATCH, c_in, height, height), torch.randn(BATCH, c_out, height, height)
        ms = median_ms(lambda: torch.nn.grad.conv2d_weight(xt, (c_out, c_in, 3, 3), dyt, padding=1), repeats)
        emit(dict(kind="conv_dw", shape=shape, impl="torch_onednn", preset="-", gflops=gflop / ms * 1e3))


def bench_conv_dtype(repeats: int, emit) -> None:
    for height, c_in, c_out in ((32, 32, 32), (32, 128, 128)):
        x = jax.random.normal(jax.random.key(0), (BATCH, height, height, c_in))
        k = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
        gflop = 2 * BATCH * height * height * c_in * c_out * 9 / 1e9
        for preset, options in presets().items():
            for dtype in (jnp.float32, jnp.bfloat16):
                fn = jax.jit(_plain_conv, compiler_options=options)
                xd, kd = x.astype(dtype), k.astype(dtype)
                emit(dict(kind="conv_dtype", shape=[BATCH, height, height, c_in, c_out], preset=preset,
                          impl=jnp.dtype(dtype).name, gflops=gflop / median_ms(lambda: fn(xd, kd), repeats) * 1e3))


DENSE_SHAPES = [(1, 64, 64), (2, 64, 64), (2, 128, 64), (4, 64, 64), (4, 128, 64), (8, 32, 32)]


def bench_dense_conv(repeats: int, emit) -> None:
    batch, options = 500, xla_cpu.compiler_options("inference")
    for height, c_in, c_out in DENSE_SHAPES:
        x = jax.random.normal(jax.random.key(0), (batch, height, height, c_in))
        dy = jax.random.normal(jax.random.key(1), (batch, height, height, c_out))
        shape = [batch, height, height, c_in, c_out]
        params = Conv(c_out).init(jax.random.key(2), x)
        for impl, dense in (("xla_conv", False), ("dense_matmul", True)):
            emit(dict(kind="dense_conv", shape=shape, preset="inference_preset", impl=impl,
                      **fwd_bwd_ms(Conv(c_out, dense=dense).apply, params, x, dy, options, repeats)))
        try:
            import torch
        except ImportError:
            continue
        torch.set_num_threads(os.cpu_count() or 1)
        xt = torch.randn(batch, c_in, height, height, requires_grad=True)
        wt = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
        dyt = torch.randn(batch, c_out, height, height)
        conv = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)  # noqa: E731
        emit(dict(kind="dense_conv", shape=shape, preset="-", impl="torch",
                  **torch_fwd_bwd_ms(conv, (xt, wt), dyt, repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["groupnorm", "conv", "conv_dtype", "dense_conv"], default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)
        rows.append(record)

    print(json.dumps(dict(kind="machine", jax=jax.__version__, devices=str(jax.devices()),
                          cpu_count=os.cpu_count())), flush=True)
    if args.only in (None, "groupnorm"):
        bench_groupnorm(args.repeats, emit)
    if args.only in (None, "conv"):
        bench_conv_grads(args.repeats, emit)
    if args.only in (None, "conv_dtype"):
        bench_conv_dtype(args.repeats, emit)
    if args.only in (None, "dense_conv"):
        bench_dense_conv(args.repeats, emit)

    print()
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        if row["kind"] in ("groupnorm", "dense_conv"):
            print(f"{row['kind']:<15} {shape:<16} {row['preset']:<17} {row['impl']:<12} "
                  f"forward {row['forward_ms']:6.2f} ms  fwd+bwd {row['fwd_bwd_ms']:6.2f} ms")
        else:
            print(f"{row['kind']:<15} {shape:<16} {row['preset']:<17} {row['impl']:<12} "
                  f"{row['gflops']:6.0f} GFLOP/s")


if __name__ == "__main__":
    main()
