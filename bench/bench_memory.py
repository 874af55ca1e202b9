"""Memory of ddpm-jax's programs from XLA's own analysis of the compiled executables: no timing,
so it runs anywhere (the numbers are per device; a data-parallel mesh splits the batch).

    python bench/bench_memory.py --config cifar10 --batches 32,128
    python bench/bench_memory.py --config cifar10 --batches 128 --dtype bfloat16 --remat

For the train step (Adam, clip, EMA; state donated), the forward pass and the 1000-step
ancestral sampler (one lax.scan), prints per batch size: the arguments, the outputs and XLA's
temporary buffers (the working memory beyond both), MiB. On a GPU, peak device memory is about
arguments + temporaries (outputs alias donated arguments). One JSON line per program and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_unet import CONFIGS  # noqa: E402
from ddpm_jax import sampling, training, xla_cpu  # noqa: E402
from ddpm_jax.models.unet import UNet  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402

MIB = 2**20


def sizes(compiled) -> dict[str, float]:
    mem = compiled.memory_analysis()
    if mem is None:
        return dict(arguments_mib=float("nan"), outputs_mib=float("nan"), temp_mib=float("nan"))
    return dict(arguments_mib=mem.argument_size_in_bytes / MIB,
                outputs_mib=mem.output_size_in_bytes / MIB, temp_mib=mem.temp_size_in_bytes / MIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batches", default="32,128", help="comma list of batch sizes")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--remat", action="store_true", help="rematerialise every block")
    parser.add_argument("--skip", default="", help="comma list of train,forward,sample to skip")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = UNet(**CONFIGS[args.config], dropout=0.1, dtype=dtype, remat=args.remat)
    shape = (args.image_size, args.image_size, 3)
    schedule = Schedule.create("linear", 1000)
    optimizer = training.make_optimizer(grad_clip=1.0)
    state = jax.eval_shape(lambda key: training.create_train_state(model, optimizer, key, shape),
                           jax.random.PRNGKey(0))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        programs = {}
        if "train" not in skip:
            step = jax.jit(lambda s, b: training.train_step(
                s, b, model=model, schedule=schedule, optimizer=optimizer, base_lr=2e-4,
                warmup_steps=5000, ema_decay=0.9999), donate_argnums=0,
                compiler_options=xla_cpu.compiler_options("train"))
            data = {"image": jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
                    "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
            programs["train_step"] = step.lower(state, data)
        if "forward" not in skip:
            fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                          compiler_options=xla_cpu.compiler_options("inference"))
            programs["forward"] = fwd.lower(state.params, jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
                                            jax.ShapeDtypeStruct((batch,), jnp.int32))
        if "sample" not in skip:
            sampler = sampling.make_sampler(sampling.ModelApply(model), schedule, (batch, *shape),
                                            sampler="ddpm", var_type="fixedlarge")
            programs["sample_1000_steps"] = sampling._chain_jit(True).lower(
                sampler.apply_fn, state.params, sampler.plan, jax.random.key(0), jnp.int32(0),
                **sampler.static)
        for name, lowered in programs.items():
            row = dict(kind=name, config=args.config, batch=batch, dtype=args.dtype, remat=args.remat,
                       backend=jax.default_backend(), **sizes(lowered.compile()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{args.config}, {args.dtype}{', remat' if args.remat else ''}, {jax.default_backend()} "
          "(MiB per device)")
    for row in rows:
        print(f"  {row['kind']:<18} batch {row['batch']:>4}: arguments {row['arguments_mib']:8.0f}  "
              f"outputs {row['outputs_mib']:8.0f}  temp {row['temp_mib']:8.0f}")


if __name__ == "__main__":
    main()
