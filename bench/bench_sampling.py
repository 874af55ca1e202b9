"""The one-scan sampler against the same chain as one lax.fori_loop and as one jitted step at a
time from Python.

    python bench/bench_sampling.py --model digits --batch 16 --steps 100
    python bench/bench_sampling.py --model tiny --batch 16 --steps 1000 --unroll 1,4

All variants run the identical ancestral step (model + p_mean_variance + noise) on the same
respaced schedule, compiled with the same options; the Python loop is what peers do (one XLA
call per step, the step compiled once), fori_loop is one program with a while loop. Reports compile seconds, median seconds per reverse step over --repeats chains, and the
ratio loop / variant (> 1: faster than the loop). Prints one JSON line per measurement. Never run by CI.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.bench_unet import CONFIGS  # noqa: E402
from ddpm_jax import plans, sampling, xla_cpu  # noqa: E402
from ddpm_jax.diffusion import p_mean_variance  # noqa: E402
from ddpm_jax.models.unet import UNet  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

MODELS = {
    # configs/digits.py's UNet on 16x16x1.
    "digits": (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)), (16, 16, 1)),
    # A 2-level UNet on 8x8x3 where per-step dispatch is a visible share of the work.
    "tiny": (dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8),
             (8, 8, 3)),
    # The paper's CIFAR-10 UNet, as bench_unet.py times it.
    "cifar10": (CONFIGS["cifar10"], (32, 32, 3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unroll", default="1", help="comma-separated scan unroll factors")
    args = parser.parse_args()

    kwargs, image_shape = MODELS[args.model]
    model = UNet(**kwargs)
    shape = (args.batch, *image_shape)
    params = jax.jit(lambda k: model.init(k, jnp.zeros(shape), jnp.zeros((args.batch,), jnp.int32),
                                          train=False))(jax.random.key(0))["params"]
    schedule = Schedule.create("linear", 1000)
    apply_fn = sampling.ModelApply(model)
    common = dict(device=str(jax.devices()[0]), model=args.model, batch=args.batch,
                  steps=args.steps)

    def once(fn) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    # The same step, one jitted call per step from Python.
    plan = plans.make_plan(schedule, steps=args.steps)

    # Every variant compiles under the sampler's own options (ddpm_jax.xla_cpu), so that only
    # the loop structure differs between them.
    options = xla_cpu.compiler_options("inference")

    def step_fn(params, x_t, i, t, key):
        index = jnp.full((args.batch,), i, jnp.int32)
        out = p_mean_variance(plan.schedule,
                              model_output=apply_fn(params, x_t, jnp.full((args.batch,), t)),
                              x_t=x_t, t=index, mean_type="eps", var_type="fixedlarge")
        noise = jax.random.normal(jax.random.fold_in(key, i), x_t.shape)
        return out["mean"] + jnp.where(i > 0, jnp.exp(0.5 * out["log_variance"]), 0.0) * noise

    step = jax.jit(step_fn, compiler_options=options)
    timesteps = [int(t) for t in plan.timesteps]
    timestep_array = jnp.asarray(plan.timesteps)

    def loop():
        x = jax.random.normal(jax.random.key(3), shape)
        for i in range(args.steps - 1, -1, -1):
            x = step(params, x, i, timesteps[i], jax.random.key(4))
        return x

    # The same step in one lax.fori_loop: one program, but a while loop instead of a scan.
    @functools.partial(jax.jit, compiler_options=options)
    def fori(params, key):
        def body(j, x):
            i = args.steps - 1 - j
            return step_fn(params, x, i, timestep_array[i], key)
        return jax.lax.fori_loop(0, args.steps, body, jax.random.normal(jax.random.key(3), shape))

    # One lax.scan over the whole chain, per unroll factor.
    variants = {}
    for unroll in (int(u) for u in args.unroll.split(",")):
        sampler = sampling.make_sampler(apply_fn, schedule, shape,
                                        SamplerSpec(steps=args.steps), unroll=unroll)
        variants[f"scan_unroll{unroll}"] = lambda sampler=sampler: sampler(params, jax.random.key(2))
    variants["fori_loop"] = lambda: fori(params, jax.random.key(4))
    variants["python_loop"] = loop
    first_call = {name: once(fn) for name, fn in variants.items()}  # compile + one chain
    # Rounds alternate between the variants so that a shared machine's load hits all alike.
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(once(fn) / args.steps)
    loop_s = statistics.median(times["python_loop"])
    for name in variants:
        step_s = statistics.median(times[name])
        print(json.dumps(dict(common, variant=name, first_call_s=round(first_call[name], 3),
                              step_ms=round(1e3 * step_s, 3),
                              step_ms_range=[round(1e3 * min(times[name]), 3),
                                             round(1e3 * max(times[name]), 3)],
                              loop_over_this=round(loop_s / step_s, 3))), flush=True)


if __name__ == "__main__":
    main()
