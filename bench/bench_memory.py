"""Memory of ddpm-jax's programs from XLA's own analysis of the compiled executables: no timing,
so it runs anywhere (the numbers are per device; a data-parallel mesh splits the batch).

    python bench/bench_memory.py --config cifar10 --batches 32,128
    python bench/bench_memory.py --config cifar10 --batches 128 --dtype bfloat16 --remat
    python bench/bench_memory.py --config cifar10 --batches 128 --microbatches 1,4 --skip forward,sample

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

from bench_unet import CONFIGS, forward_jit, lower_sampler, memory_mib, train_step_jit  # noqa: E402
from ddpm_jax import sampling, training  # noqa: E402
from ddpm_jax.models.unet import UNet  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batches", default="32,128", help="comma list of batch sizes")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--remat", action="store_true", help="rematerialise every block")
    parser.add_argument("--microbatches", default="1",
                        help="comma list: train step gradient-accumulation slices")
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
            data = {"image": jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
                    "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
            for m in (int(m) for m in args.microbatches.split(",")):
                name = "train_step" + (f" M={m}" if m > 1 else "")
                programs[name] = train_step_jit(model, schedule, optimizer, m).lower(state, data)
        if "forward" not in skip:
            programs["forward"] = forward_jit(model).lower(
                state.params, jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
                jax.ShapeDtypeStruct((batch,), jnp.int32))
        if "sample" not in skip:
            sampler = sampling.make_sampler(sampling.ModelApply(model), schedule, (batch, *shape),
                                            SamplerSpec(sampler="ddpm", var_type="fixedlarge"))
            programs["sample_1000_steps"] = lower_sampler(sampler, state.params)
        for name, lowered in programs.items():
            row = dict(kind=name, config=args.config, batch=batch, dtype=args.dtype, remat=args.remat,
                       backend=jax.default_backend(), **memory_mib(lowered.compile()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{args.config}, {args.dtype}{', remat' if args.remat else ''}, {jax.default_backend()} "
          "(MiB per device)")
    for row in rows:
        print(f"  {row['kind']:<18} batch {row['batch']:>4}: arguments {row['arguments_mib']:8.0f}  "
              f"outputs {row['outputs_mib']:8.0f}  temp {row['temp_mib']:8.0f}")


if __name__ == "__main__":
    main()
