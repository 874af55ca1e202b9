"""ControlNet (Zhang et al. 2023) on the DDPM UNet: a trainable copy of the encoder that reads a
control image, its features added to the frozen model's skip connections and middle.

    y = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)

`ControlBranch` is the copy: the UNet's own time (and class) embedding, down path and middle
(the same code and parameter names, `time_dense_0`, `conv_in`, `down_0_block_0`, ..., `mid_block_1`,
so the copy starts as the base's leaves), plus

    hint_{i}      3x3 convolutions (swish) over the control image [B, H, W, C_c]
    hint_out      3x3 convolution to ch channels, zero-initialised: added to conv_in's output
    zero_{k}      one zero-initialised 1x1 convolution per skip connection (k = 0..K-1)
    zero_mid      one for the middle

Its outputs go into the frozen UNet through its `residuals` argument. The parameters of a
controlled model are one tree: the base's leaves plus `control` (the branch) (`attach`), so
the frozen base and the trainable branch meet through `adapters.merge` like any fine-tuning
run's. With zero-initialised outputs the controlled model equals the base bit for bit at step 0,
and so does any branch with control scale 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.unet import UNet, conv, default_init, zero_init

Array = jax.Array
PyTree = Any

CONTROL_KEY = "control"  # the branch's subtree in a controlled model's parameters


class ControlBranch(UNet):
    """The trainable copy of a UNet's encoder with the control image's input stack; returns the
    residuals for `UNet(..., residuals=...)`: one [B, h, w, c] array per skip connection, then
    the middle's, float32. control_channels: C_c of the control image; hint_channels: the
    widths of its 3x3 convolution stack."""

    control_channels: int = 1
    hint_channels: tuple[int, ...] = (16, 16)

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, control: Array | None = None,
                 *, train: bool) -> tuple[Array, ...]:  # type: ignore[override]
        """x: [B, H, W, C]; t: [B]; y: [B] labels (class-conditional bases); control:
        [B, H, W, control_channels] in [-1, 1] (None at init: zeros)."""
        batch, height, width, _ = x.shape
        want = (batch, height, width, self.control_channels)
        if control is None:
            control = jnp.zeros(want, jnp.float32)
        if control.shape != want:
            raise ValueError(f"control must be {list(want)} (the image's size, "
                             f"{self.control_channels} channels); got {list(control.shape)}.")
        h = control.astype(self.dtype)
        for i, width_i in enumerate(self.hint_channels):
            h = nn.swish(conv(width_i, self.dtype, f"hint_{i}")(h))
        hint = conv(self.ch, self.dtype, "hint_out", kernel_init=zero_init)(h)
        temb = self._embed(t, y, batch)
        h, hs = self._encode(x, temb, train, input_residual=hint)
        outs = [conv(s.shape[-1], self.dtype, f"zero_{k}", kernel=1, kernel_init=zero_init)(s)
                for k, s in enumerate(hs)]
        outs.append(conv(h.shape[-1], self.dtype, "zero_mid", kernel=1, kernel_init=zero_init)(h))
        return tuple(o.astype(jnp.float32) for o in outs)


def _unet_fields(model: UNet) -> dict[str, Any]:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(UNet)
            if f.init and f.name not in ("parent", "name")}


def branch_for(model: UNet, control_channels: int,
               hint_channels: tuple[int, ...] = (16, 16)) -> ControlBranch:
    """The ControlBranch of a UNet: the same network settings (a copy of its encoder)."""
    if model.condition_channels:
        raise ValueError("ControlNet needs a base without condition_channels (an image-"
                         "conditioned run); use an unconditioned or class-conditional base.")
    return ControlBranch(**_unet_fields(model), control_channels=control_channels,
                         hint_channels=tuple(hint_channels))


def init_branch(branch: ControlBranch, base_params: PyTree, key: Array,
                image_shape: tuple[int, int, int]) -> PyTree:
    """The branch's parameters at step 0: the base's leaves for every block it shares with the
    UNet (its copy of the encoder); hint_{i}: Glorot-uniform kernels (the UNet's convolution
    init) and zero biases; hint_out and zero_*: zeros. ValueError in one line for a base leaf
    of another shape. (Only the new leaves are drawn: no initialisation of the whole branch.)"""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    fresh = jax.eval_shape(lambda x, t: branch.init({"params": jax.random.PRNGKey(0)}, x, t,
                                                    train=False)["params"], x, t)
    out = {}
    for name, subtree in fresh.items():
        if name not in base_params:
            if name.startswith("hint_") and name != "hint_out":
                kernel = subtree["kernel"]
                out[name] = {"kernel": default_init(jax.random.fold_in(key, int(name[5:])),
                                                    kernel.shape, kernel.dtype),
                             "bias": jnp.zeros(subtree["bias"].shape, subtree["bias"].dtype)}
            else:
                out[name] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), subtree)
            continue
        theirs = base_params[name]
        shapes = jax.tree.map(jnp.shape, subtree), jax.tree.map(jnp.shape, theirs)
        if shapes[0] != shapes[1]:
            raise ValueError(f"ControlNet: block {name} has other shapes in the base run than in "
                             "its copy (another architecture); use the base run's model settings.")
        out[name] = jax.tree.map(jnp.copy, theirs)
    return out


def split(params: PyTree) -> tuple[PyTree, PyTree | None]:
    """(the base's parameters, the branch's or None) of a controlled model's tree."""
    if CONTROL_KEY not in params:
        return params, None
    return {k: v for k, v in params.items() if k != CONTROL_KEY}, params[CONTROL_KEY]


def attach(base: PyTree, branch_params: PyTree) -> PyTree:
    """The controlled model's parameters: the base's leaves (the same arrays) plus the branch."""
    return {**base, CONTROL_KEY: branch_params}


def apply(model: UNet, branch: ControlBranch | None, params: PyTree, x: Array, t: Array,
          y: Array | None = None, *, control: Array | None = None, scale: Array | None = None,
          condition: Array | None = None, train: bool = False,
          rngs: dict[str, Array] | None = None) -> Array:
    """The controlled model's output [B, H, W, out] float32: the base UNet on the base's leaves of
    `params`, plus, with a branch and a control image [B, H, W, C_c], the branch's residuals
    times the control scale (`scale` [B]; None: 1). Without a control image (or a branch) this
    is exactly `model.apply` of the base. condition: an image-conditioned UNet's input."""
    base, branch_params = split(params)
    residuals = None
    if branch is not None and control is not None:
        if branch_params is None:
            raise ValueError("a control image needs a model with a control branch (a ControlNet "
                             "run); this one has none.")
        branch_rngs = None if rngs is None else {k: jax.random.fold_in(v, 1) for k, v in rngs.items()}
        residuals = branch.apply({"params": branch_params}, x, t, y, control, train=train,
                                 rngs=branch_rngs)
        if scale is not None:
            residuals = tuple(r * scale.astype(r.dtype)[:, None, None, None] for r in residuals)
    return model.apply({"params": base}, x, t, y, train=train, condition=condition,
                       residuals=residuals, rngs=rngs)
