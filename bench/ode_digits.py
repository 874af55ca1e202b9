"""Probability-flow ODE bits/dim beside the discrete variational bound, on the digits test split
(the continuous-time view, docs/continuous_time.md): one run's EMA weights, the first
--num_images test images.

    python bench/ode_digits.py --workdir runs/digits --num_images 100 --probes 3

Rows: the VLB (prior + decoder + all T KL terms, `likelihood.evaluate_bpd`) and the ODE bits/dim
(`ode_likelihood.evaluate_ode_bpd`, RK45 at --tolerance, Hutchinson-Skilling with --trace
probes, --dequantization uniform or decoder), each with its standard error over the images; for the ODE the
mean number of field evaluations (NFE) and the estimator's spread over --probes independent
probe sets on the same dequantised images (the std over the probe sets of the split's mean, and
the mean over the images of each image's std over the probes). --exact adds the exact trace (64
Jacobian-vector products per evaluation at 8x8: slow). Prints JSON lines and a Markdown table.
Never run by CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ddpm_jax import runs  # noqa: E402
from ddpm_jax.config import schedule_from_config  # noqa: E402
from ddpm_jax.data import load_split_uint8  # noqa: E402
from ddpm_jax.likelihood import bpd_summary, evaluate_bpd  # noqa: E402
from ddpm_jax.ode_likelihood import evaluate_ode_bpd, ode_bpd_summary  # noqa: E402
from ddpm_jax.sampling import ModelApply  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--trace", default="rademacher", choices=("rademacher", "gaussian"))
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--exact", action="store_true", help="also the exact trace (slow)")
    parser.add_argument("--skip_vlb", action="store_true")
    parser.add_argument("--dequantization", default="uniform", choices=("uniform", "decoder"),
                        help="uniform: score_sde's (a density bound, + 7 bits); decoder: "
                             "x_1 ~ q(x_1|x_0) and the model's discretized decoder (a bound on "
                             "the pixels, like the VLB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config, model, params = runs.load_for_sampling(args.workdir, weights="ema")
    schedule, apply_fn = schedule_from_config(config), ModelApply(model)
    data = load_split_uint8(config.data.dataset, "test", config.data.get("data_dir"),
                            image_size=config.data.image_size, channels=config.data.channels,
                            max_examples=args.num_images)
    key = jax.random.key(args.seed)
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}, {len(data)} images of "
          f"{config.data.dataset}/test, {args.workdir} (EMA), jax {jax.__version__}, "
          f"{jax.devices()[0].platform}", flush=True)
    rows = []
    if not args.skip_vlb:
        start = time.perf_counter()
        vlb_result = evaluate_bpd(apply_fn, params, schedule, data, jax.random.fold_in(key, 1),
                                  mean_type=config.diffusion.mean_type,
                                  var_type=config.diffusion.var_type,
                                  batch_size=args.batch_size, progress=False)
        vlb = bpd_summary(vlb_result)
        rows.append(dict(method=f"VLB, all T={config.diffusion.timesteps} terms", bpd=vlb["total"],
                         stderr=vlb["total_stderr"], nfe=config.diffusion.timesteps,
                         seconds=round(time.perf_counter() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
    ode = dict(mean_type=config.diffusion.mean_type, rtol=args.tolerance, atol=args.tolerance,
               batch_size=args.batch_size, progress=False, dequantization=args.dequantization,
               var_type=config.diffusion.var_type)
    per_probe = []
    for p in range(args.probes):
        start = time.perf_counter()
        result = evaluate_ode_bpd(apply_fn, params, schedule, data, jax.random.fold_in(key, 3),
                                  probe_key=jax.random.fold_in(key, 100 + p), trace=args.trace,
                                  **ode)
        per_probe.append(result["bpd"])
        summary = ode_bpd_summary(result)
        rows.append(dict(method=f"ODE RK45 tol {args.tolerance:g}, {args.dequantization} "
                                f"dequantisation, {args.trace} probe set {p}",
                         bpd=summary["total"], stderr=summary["total_stderr"], nfe=summary["nfe"],
                         nfe_max=summary["nfe_max"], not_converged=summary["not_converged"],
                         seconds=round(time.perf_counter() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
    per_probe = np.stack(per_probe)            # [probes, images]
    spread = dict(method=f"ODE spread over {args.probes} probe sets",
                  bpd=float(per_probe.mean()),
                  std_of_split_mean=float(per_probe.mean(axis=1).std(ddof=1))
                  if args.probes > 1 else None,
                  mean_per_image_std=float(per_probe.std(axis=0, ddof=1).mean())
                  if args.probes > 1 else None)
    if not args.skip_vlb:   # paired over the images: the images' own spread cancels
        diff = per_probe.mean(axis=0) - vlb_result["total_bpd"]
        spread["ode_minus_vlb"] = float(diff.mean())
        spread["ode_minus_vlb_stderr"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    print(json.dumps(spread), flush=True)
    if args.exact:
        start = time.perf_counter()
        summary = ode_bpd_summary(evaluate_ode_bpd(apply_fn, params, schedule, data,
                                                   jax.random.fold_in(key, 3), trace="exact",
                                                   **ode))
        rows.append(dict(method=f"ODE RK45 tol {args.tolerance:g}, exact trace",
                         bpd=summary["total"], stderr=summary["total_stderr"], nfe=summary["nfe"],
                         seconds=round(time.perf_counter() - start, 1)))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | bits/dim | s.e. (images) | NFE | seconds |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['bpd']:.4f} | {r['stderr']:.4f} | {r['nfe']:.0f} | "
              f"{r['seconds']} |")
    if args.probes > 1:
        print(f"\nHutchinson spread: std over probe sets of the split's mean "
              f"{spread['std_of_split_mean']:.4f} bits/dim; per-image std over probes "
              f"{spread['mean_per_image_std']:.4f} bits/dim (mean over images).")
    if "ode_minus_vlb" in spread:
        print(f"ODE - VLB, paired over the images: {spread['ode_minus_vlb']:+.4f} +- "
              f"{spread['ode_minus_vlb_stderr']:.4f} bits/dim (s.e.).")


if __name__ == "__main__":
    main()
