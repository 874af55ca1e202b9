"""What XLA's CPU options do to the UNet: forward and train-step images/s, and a 3x3 conv at
UNet shapes, under each candidate XLA_FLAGS setting (each in a fresh subprocess, alternating
settings round by round so machine noise hits all of them alike).

    python bench/xla_cpu_flags.py --config small --rounds 2

Prints one JSON line per (setting, round) and a table of medians with the ratio to the default.
A setting XLA rejects is reported as such, not hidden. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CANDIDATES = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    # YNNPACK fusions (jaxlib 0.10's default for convolutions, dots, reductions, elementwise).
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_no_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "ynn_no_conv_no_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,"
                          "-individual_dot,-dot",
    "ynn_reduce_eltwise": "--xla_cpu_experimental_ynn_fusion_type=reduce,eltwise",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot",
    # ddpm_jax.xla_cpu's train preset, alone and with further options on top.
    "train_preset": "--xla_cpu_experimental_ynn_fusion_type=reduce",
    "train_preset_vec512": "--xla_cpu_experimental_ynn_fusion_type=reduce "
                           "--xla_cpu_prefer_vector_width=512",
    "train_preset_conc_sched": "--xla_cpu_experimental_ynn_fusion_type=reduce "
                               "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "xnn_dot_no_ynn": "--xla_cpu_experimental_ynn_fusion_type= "
                      "--xla_cpu_experimental_xnn_fusion_type=dot,individual_dot",
}

CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, {repo!r})
from bench.bench_unet import CONFIGS, Ours, timeit
ours = Ours(CONFIGS[{config!r}], 32, jnp.float32)
out = {{}}
x = jax.random.normal(jax.random.key(1), (8, 32, 32, 128), jnp.float32)
w = jax.random.normal(jax.random.key(2), (3, 3, 128, 128), jnp.float32)
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
               dimension_numbers=("NHWC", "HWIO", "NHWC")))
conv(x, w).block_until_ready()
sec = timeit(lambda: conv(x, w).block_until_ready(), {repeats})
out["conv_gflops"] = 2 * 8 * 32 * 32 * 128 * 128 * 9 / sec / 1e9
run, *_ = ours.forward_fn({batch_forward})
out["forward_img_s"] = {batch_forward} / timeit(run, {repeats})
run, *_ = ours.train_fn({batch_train})
out["train_img_s"] = {batch_train} / timeit(run, {repeats})
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_forward", type=int, default=8)
    parser.add_argument("--batch_train", type=int, default=32)
    parser.add_argument("--only", default="", help="comma list of candidate names")
    args = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(",")]
    code = CHILD.format(repo=repo, config=args.config, repeats=args.repeats,
                        batch_forward=args.batch_forward, batch_train=args.batch_train)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names:
            # DDPM_JAX_XLA_CPU_OPTIONS=xla: each candidate alone, without ddpm_jax's own presets.
            env = dict(os.environ, XLA_FLAGS=CANDIDATES[name], JAX_PLATFORMS="cpu",
                       DDPM_JAX_XLA_CPU_OPTIONS="xla")
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=1800)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                record = dict(setting=name, round=round_index, error=proc.stderr.strip()[-400:])
            else:
                record = dict(setting=name, round=round_index, **json.loads(lines[-1][7:]))
                results[name].append(record)
            print(json.dumps(record), flush=True)

    base = {k: statistics.median(r[k] for r in results["default"])
            for k in ("conv_gflops", "forward_img_s", "train_img_s")} if results.get("default") else None
    print(f"\n{args.config}: medians over {args.rounds} rounds (ratio to default)")
    for name in names:
        if not results[name]:
            print(f"  {name:<20} failed (see its JSON line)")
            continue
        cells = []
        for key in ("conv_gflops", "forward_img_s", "train_img_s"):
            value = statistics.median(r[key] for r in results[name])
            ratio = f" ({value / base[key]:.2f}x)" if base else ""
            cells.append(f"{key} {value:.1f}{ratio}")
        print(f"  {name:<20} " + ", ".join(cells))


if __name__ == "__main__":
    main()
