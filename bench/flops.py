"""Forward FLOPs per image of an experiment's UNet: XLA's cost analysis and a dense count.

    python bench/flops.py --config configs/cifar10.py

The reference counts 12.44 GFLOP (2 FLOP per multiply-add) for the CIFAR-10 model at 32x32. The
dense count here (every conv tap and matmul in the traced program, 2 FLOP per multiply-add)
reproduces it; XLA's cost analysis reports less because it skips the taps of a convolution that
fall on zero padding (about 7% of them in the CIFAR-10 model, mostly at 8x8 and 4x4), while
adding the elementwise work (GroupNorm, swish, softmax).
"""

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `configs` imports from the repo root

from ddpm_jax.config import model_from_config, validate  # noqa: E402
from ddpm_jax.models.unet import UNet, count_params, param_shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", "experiment config")
_BATCH = flags.DEFINE_integer("batch", 8, "images per forward pass; FLOPs are divided by it")


def forward_flops_per_image(model: UNet, image_shape: tuple[int, int, int], batch: int = 8) -> float:
    """XLA's compiled-cost FLOPs of one `model.apply(..., train=False)` divided by the batch."""
    params = param_shapes(model, image_shape)
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    forward = jax.jit(functools.partial(model.apply, train=False))
    cost = forward.lower({"params": params}, x, t).compile().cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per device
        cost = cost[0]
    return cost["flops"] / batch


def dense_flops_per_image(model: UNet, image_shape: tuple[int, int, int]) -> float:
    """2 x the multiply-adds of every convolution (padding taps included) and matmul, per image."""
    params = param_shapes(model, image_shape)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))({"params": params}, x, t)

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape  # flax convs are HWIO
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[:-1])
            elif eqn.primitive.name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
            for value in eqn.params.values():  # pjit / remat / custom_jvp bodies
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    total += count(inner)
        return total

    return count(jaxpr.jaxpr)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    validate(config)
    model = model_from_config(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    flops = forward_flops_per_image(model, image_shape, _BATCH.value)
    dense = dense_flops_per_image(model, image_shape)
    num_params = count_params(param_shapes(model, image_shape))
    print(f"{config.data.dataset} {image_shape}: {num_params:,} parameters; forward per image: "
          f"{flops / 1e9:.2f} GFLOP (XLA cost analysis, {jax.default_backend()}), "
          f"{dense / 1e9:.2f} GFLOP (dense count of convs and matmuls, padding taps included)")


if __name__ == "__main__":
    app.run(main)
