"""The DDPM UNet (Ho et al. 2020), as in the official `diffusion_tf/models/unet.py`.

Layout and naming follow the official code: per resolution level `l` the down path holds
`down_{l}_block_{i}` ResBlocks (each followed by `down_{l}_attn_{i}` at attention resolutions)
and a stride-2 `down_{l}_downsample`; the middle is `mid_block_0`, `mid_attn`, `mid_block_1`;
the up path holds `num_res_blocks + 1` blocks per level, `up_{l}_block_{i}` (+ `up_{l}_attn_{i}`)
and `up_{l}_upsample`. With ch=128, ch_mult=(1, 2, 2, 2), 2 res blocks and attention at 16 this
is the CIFAR-10 model: 35,746,307 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import xla_cpu

Array = jax.Array

NORM_EPS = 1e-6  # the official code's tf.contrib group_norm epsilon

# Glorot-uniform (variance scaling, fan_avg, uniform) as the official `nn.py` default_init(1.0).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# The official code uses init_scale=0 (1e-10) on each block's last layer; exact zeros here make a
# freshly initialised block the identity and the fresh network's output exactly zero.
zero_init = nn.initializers.zeros


def check_architecture(image_size: int, ch: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int],
                       num_groups: int = 32) -> None:
    """Raises ValueError, naming the value to change, if the UNet cannot run on this image size."""
    if not ch_mult:
        raise ValueError("model.ch_mult is empty: give one channel multiplier per resolution level, "
                         "e.g. (1, 2, 2, 2).")
    if ch < 1 or any(m < 1 for m in ch_mult):
        raise ValueError(f"model.ch={ch} and model.ch_mult={tuple(ch_mult)} must be positive.")
    num_downsamples = len(ch_mult) - 1
    if image_size % (2 ** num_downsamples):
        raise ValueError(
            f"image size {image_size} is not divisible by 2**{num_downsamples} = {2 ** num_downsamples} "
            f"(len(model.ch_mult) - 1 = {num_downsamples} stride-2 downsamples): change "
            f"data.image_size or use fewer entries in model.ch_mult={tuple(ch_mult)}.")
    for mult in ch_mult:
        if (ch * mult) % num_groups:
            raise ValueError(
                f"model.ch * mult = {ch} * {mult} = {ch * mult} channels is not divisible by "
                f"model.num_groups={num_groups} GroupNorm groups: change model.ch to a multiple of "
                f"{num_groups}, or model.num_groups to a divisor of {ch * mult}.")
    resolutions = [image_size // 2 ** level for level in range(len(ch_mult))]
    for res in attn_resolutions:
        if res not in resolutions:
            raise ValueError(
                f"model.attn_resolutions contains {res}, but a {image_size}px image only reaches "
                f"resolutions {resolutions}: change model.attn_resolutions={tuple(attn_resolutions)} "
                f"to values from that list (or data.image_size).")


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding of t: [B] (int or float) -> [B, dim] float32, [sin, cos] order.

    Frequencies exp(-log(10000) i / (half - 1)), i = 0..half-1, as in the official code (and
    diffusers with flip_sin_to_cos=False, freq_shift=1).
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics and a float32 affine: parameters `scale` and `bias`, [C]
    each, exactly as flax's `nn.GroupNorm` names and shapes them (checkpoints interchange).

    The statistics are summed per channel over the spatial positions first, then within each
    group, and the group values go back to their channels as [B, C] arrays; the only work at full
    size is two per-channel sums and one `x * a[b, c] + d[b, c]`. That is the same two-pass mean
    and variance as `nn.GroupNorm(use_fast_variance=False)` up to float32 summation order.

    group_matmul: how the [B, C] <-> [B, G] steps are written. True: tiny float32 matmuls with
    the [G, C] group-membership matrix. False: reshape + sum and jnp.repeat, which XLA's CPU
    backend folds into the full-size passes (one reduction over (H, W, C/G), a per-element group
    index) and runs 1.5-2x slower there (bench/bench_layers.py, BENCHMARKS.md); on GPUs and TPUs
    those are plain fused reductions and broadcasts, while each matmul is a kernel of its own.
    None (default): `xla_cpu.prefers_group_matmul()`, True on the CPU backend only.
    """

    num_groups: int
    epsilon: float = NORM_EPS
    group_matmul: bool | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, ..., C] any float dtype -> [B, ..., C] float32."""
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm over {channels} channels needs num_groups dividing it, got "
                             f"{self.num_groups}.")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        batch, per_group = x.shape[0], channels // self.num_groups
        flat = x.astype(jnp.float32).reshape(batch, -1, channels)            # [B, N, C]
        count = flat.shape[1] * per_group
        matmul = xla_cpu.prefers_group_matmul() if self.group_matmul is None else self.group_matmul

        def group_mean(per_channel_sum: Array) -> Array:                     # [B, C] -> [B, C]
            if not matmul:
                grouped = per_channel_sum.reshape(batch, self.num_groups, per_group).sum(-1)
                return jnp.repeat(grouped / count, per_group, axis=1)
            member = np.repeat(np.eye(self.num_groups, dtype=np.float32), per_group, axis=1)  # [G, C]
            exact = jax.lax.Precision.HIGHEST  # float32 sums on every backend (TPU: not bf16)
            grouped = jnp.dot(per_channel_sum, member.T, precision=exact) / count   # [B, G]
            return jnp.dot(grouped, member, precision=exact)

        mean = group_mean(flat.sum(1))                                       # [B, C]
        var = group_mean(jnp.square(flat - mean[:, None, :]).sum(1))
        a = jax.lax.rsqrt(var + self.epsilon) * scale[None, :]
        d = bias[None, :] - mean * a
        return (flat * a[:, None, :] + d[:, None, :]).reshape(x.shape)


def group_norm(x: Array, num_groups: int, dtype: Any, name: str) -> Array:
    """GroupNorm with float32 statistics whatever the compute dtype; call inside a compact method."""
    return GroupNorm(num_groups, name=name)(x).astype(dtype)


_NHWC = ("NHWC", "HWIO", "NHWC")


class Conv(nn.Module):
    """A k x k convolution with bias over [B, H, W, C]; parameters `kernel` [k, k, C_in, C_out] and
    `bias` [C_out], float32, named and shaped as flax's `nn.Conv` (checkpoints interchange).

    1x1 kernels (the ResBlock shortcuts) run as one matmul over the channels, which needs no
    layout change in either gradient. The rest run through XLA's convolution, or, when `dense`,
    as one matmul of the flattened image [B, H*W*C_in] with the [H*W*C_in, H'*W'*C_out] matrix
    the kernel defines on this image size (`dense_conv_matrix`): the same sums, with the
    padding's zero taps left out. None (default): `xla_cpu.prefers_dense_conv(H, W)`, on the CPU
    backend for images of at most 4 pixels (the 2x2 level of the digits UNet), where XLA's
    convolution runs 10-17x slower than the matmul (BENCHMARKS.md).
    """

    features: int
    kernel: int = 3
    strides: int = 1
    padding: Any = "SAME"
    kernel_init: Any = default_init
    dtype: Any = jnp.float32
    dense: bool | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C_in] -> [B, H', W', features] in self.dtype."""
        kernel = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                            jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        height, width = x.shape[1:3]
        dense = xla_cpu.prefers_dense_conv(height, width) if self.dense is None else self.dense
        if self.kernel == 1 and self.strides == 1:
            y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        elif dense:
            matrix, out_hw = dense_conv_matrix(kernel, (height, width), self.strides, self.padding)
            y = (x.reshape(x.shape[0], -1) @ matrix).reshape(x.shape[0], *out_hw, self.features)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), self.padding,
                                             dimension_numbers=_NHWC)
        return y + bias.reshape(1, 1, 1, -1)


def dense_conv_matrix(kernel: Array, image_hw: tuple[int, int], strides: int,
                      padding: Any) -> tuple[Array, tuple[int, int]]:
    """The convolution with `kernel` [k, k, C_in, C_out] on images of size image_hw as a matrix.

    Returns ([H*W*C_in, H'*W'*C_out], (H', W')) such that flattened [B, H*W*C_in] images times
    the matrix are the convolution's [B, H', W', C_out] outputs, flattened. Entry (h, w, c; i, j,
    d) is kernel[h - i*s + p_top, w - j*s + p_left, c, d] where that tap exists, else 0.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)), as jax.lax.conv_general_dilated.
    """
    k = kernel.shape[0]
    pads = (jax.lax.padtype_to_pads(image_hw, (k, k), (strides, strides), padding)
            if isinstance(padding, str) else padding)
    out_hw = tuple((size + lo + hi - k) // strides + 1 for size, (lo, hi) in zip(image_hw, pads))

    def taps(size: int, out: int, pad_lo: int) -> np.ndarray:           # [size, out], k = none
        tap = np.arange(size)[:, None] - strides * np.arange(out)[None, :] + pad_lo
        return np.where((tap >= 0) & (tap < k), tap, k)

    rows, cols = (taps(size, out, lo) for size, out, (lo, _) in zip(image_hw, out_hw, pads))
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))          # tap k: zeros
    matrix = padded[rows[:, None, :, None], cols[None, :, None, :]]      # [H, W, H', W', Ci, Co]
    matrix = matrix.transpose(0, 1, 4, 2, 3, 5)
    return matrix.reshape(np.prod(image_hw) * kernel.shape[2], -1), out_hw


def conv(features: int, dtype: Any, name: str, *, kernel: int = 3, strides: int = 1, padding: Any = "SAME",
         kernel_init: Any = default_init) -> Conv:
    return Conv(features, kernel, strides, padding, kernel_init, dtype, name=name)


class ResBlock(nn.Module):
    """norm-swish-conv, + Dense(swish(temb)), norm-swish-dropout-conv(zero init), + shortcut."""

    out_ch: int
    num_groups: int
    dropout: float
    deterministic: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        """x: [B, H, W, C_in], temb: [B, 4 ch] -> [B, H, W, out_ch]."""
        h = nn.swish(group_norm(x, self.num_groups, self.dtype, "norm_0"))
        h = conv(self.out_ch, self.dtype, "conv_0")(h)
        temb_proj = nn.Dense(self.out_ch, kernel_init=default_init, dtype=self.dtype,
                             param_dtype=jnp.float32, name="time_proj")(nn.swish(temb))
        h = h + temb_proj[:, None, None, :]
        h = nn.swish(group_norm(h, self.num_groups, self.dtype, "norm_1"))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv(self.out_ch, self.dtype, "conv_1", kernel_init=zero_init)(h)
        if x.shape[-1] != self.out_ch:
            # The official `nin_shortcut`: a per-pixel linear map, i.e. a 1x1 convolution.
            x = conv(self.out_ch, self.dtype, "shortcut", kernel=1)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection."""

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        batch, height, width, channels = x.shape
        h = group_norm(x, self.num_groups, self.dtype, "norm")

        def proj(name: str, inputs: Array, init: Any = default_init) -> Array:
            return nn.Dense(channels, kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32,
                            name=name)(inputs)

        q, k, v = (proj(name, h).reshape(batch, height * width, channels) for name in ("q", "k", "v"))
        h = self.attend(q, k, v).reshape(batch, height, width, channels)
        return x + proj("proj_out", h, zero_init)

    def attend(self, q: Array, k: Array, v: Array) -> Array:
        """Scaled dot-product attention: q [B, N, C], k and v [B, M, C] -> [B, N, C].

        A method of its own so that `models.seams` can read or replace the queries, keys and
        values of one block (Plug-and-Play, StyleAligned) without a second model class.
        """
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(self.dtype)
        return jnp.einsum("bqk,bkc->bqc", weights, v)


# Rematerialised variants: activations inside a block are recomputed in the backward pass.
RematResBlock = nn.remat(ResBlock)
RematAttnBlock = nn.remat(AttnBlock)


class UNet(nn.Module):
    """The DDPM noise-prediction network.

    ch: base channels; ch_mult: channel multiplier per resolution level (len - 1 downsamples);
    num_res_blocks: ResBlocks per down level (up levels get one more); attn_resolutions: feature
    map heights that get an AttnBlock after every ResBlock; out_channels: defaults to the input's
    C (2C for learned variance); num_classes: adds a class embedding with one extra "null" class
    (label num_classes) for classifier-free guidance; dtype: compute dtype (parameters, GroupNorm
    and softmax statistics stay float32); remat: rematerialise every block to save memory.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float = 0.0
    out_channels: int | None = None
    num_classes: int | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    resamp_with_conv: bool = True
    num_groups: int = 32
    condition_channels: int = 0

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool,
                 condition: Array | None = None,
                 residuals: tuple[Array, ...] | None = None) -> Array:
        """x: [B, H, W, C] in [-1, 1]; t: [B] int (0-based); y: [B] int labels in
        {0..num_classes} (num_classes = null class; None means all null) -> [B, H, W, out] float32.

        condition: [B, H, W, condition_channels] (models with condition_channels; None: zeros).
        residuals: added to the down path's outputs (the skip connections, in order) and to the
        middle's output, one array each (ControlNet's features, `models.controlnet`); None adds
        nothing, so the model is the model.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}.")
        batch, _, _, in_channels = x.shape
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B] = ({batch},), got {t.shape}: pass one timestep per "
                             "image, e.g. jnp.full((B,), t).")
        x = self._concat_condition(x, condition)
        temb = self._embed(t, y, batch)
        h, hs = self._encode(x, temb, train)
        if residuals is not None:
            if len(residuals) != len(hs) + 1:
                raise ValueError(f"residuals must hold {len(hs) + 1} arrays (one per skip connection "
                                 f"and the middle); got {len(residuals)}.")
            hs = [skip + r.astype(skip.dtype) for skip, r in zip(hs, residuals)]
            h = h + residuals[-1].astype(h.dtype)
        res_block, maybe_attn = self._blocks(temb, train)
        num_levels = len(self.ch_mult)

        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[level],
                              f"up_{level}_block_{i}")
                h = maybe_attn(h, f"up_{level}_attn_{i}")
            if level != 0:
                h = self._upsample(h, f"up_{level}_upsample")
        assert not hs, "every skip connection must be consumed"

        h = nn.swish(group_norm(h, self.num_groups, self.dtype, "norm_out"))
        out_channels = in_channels if self.out_channels is None else self.out_channels
        h = conv(out_channels, self.dtype, "conv_out", kernel_init=zero_init)(h)
        return h.astype(jnp.float32)

    def _concat_condition(self, x: Array, condition: Array | None) -> Array:
        """[x, condition] along the channels (zeros for a None condition); x itself when the
        model takes no condition."""
        if not self.condition_channels:
            if condition is not None:
                raise ValueError("got a condition image but the UNet has condition_channels=0: "
                                 "train an image-conditioned run (configs/digits.py:sr).")
            return x
        want = (*x.shape[:3], self.condition_channels)
        if condition is None:
            condition = jnp.zeros(want, x.dtype)
        if condition.shape != want:
            raise ValueError(f"condition must be {list(want)} (the image's size, "
                             f"{self.condition_channels} channels); got {list(condition.shape)}.")
        return jnp.concatenate([x, condition.astype(x.dtype)], axis=-1)

    def _blocks(self, temb: Array, train: bool) -> tuple[Any, Any]:
        """(res_block(h, out_ch, name), maybe_attn(h, name)) closures with this module's settings."""
        res_block_cls = RematResBlock if self.remat else ResBlock
        attn_block_cls = RematAttnBlock if self.remat else AttnBlock

        def res_block(h: Array, out_ch: int, name: str) -> Array:
            return res_block_cls(out_ch, self.num_groups, self.dropout, not train, self.dtype,
                                 name=name)(h, temb)

        def maybe_attn(h: Array, name: str) -> Array:
            if h.shape[1] in self.attn_resolutions:
                h = attn_block_cls(self.num_groups, self.dtype, name=name)(h)
            return h
        return res_block, maybe_attn

    def _embed(self, t: Array, y: Array | None, batch: int) -> Array:
        """The timestep (and class) embedding [B, 4 ch]."""
        temb_dim = 4 * self.ch
        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(temb_dim, kernel_init=default_init, dtype=self.dtype, param_dtype=jnp.float32,
                        name="time_dense_0")(temb)
        temb = nn.Dense(temb_dim, kernel_init=default_init, dtype=self.dtype, param_dtype=jnp.float32,
                        name="time_dense_1")(nn.swish(temb))
        if self.num_classes is not None:
            if y is None:
                y = jnp.full((batch,), self.num_classes, dtype=jnp.int32)
            if y.shape != (batch,):
                raise ValueError(f"y must have shape [B] = ({batch},), got {y.shape}.")
            temb = temb + nn.Embed(self.num_classes + 1, temb_dim, dtype=self.dtype,
                                   param_dtype=jnp.float32, name="class_embed")(y)
        elif y is not None:
            raise ValueError("got class labels y but the UNet has num_classes=None: set "
                             "model.num_classes to train a class-conditional model.")
        return temb

    def _encode(self, x: Array, temb: Array, train: bool,
                input_residual: Array | None = None) -> tuple[Array, list[Array]]:
        """The down path and the middle: (h [B, H/2^(L-1), W/2^(L-1), C_L], the skip
        connections of the down path). input_residual [B, H, W, ch]: added to conv_in's output
        (ControlNet's control features); None adds nothing."""
        check_architecture(x.shape[1], self.ch, self.ch_mult, self.attn_resolutions, self.num_groups)
        check_architecture(x.shape[2], self.ch, self.ch_mult, (), self.num_groups)
        res_block, maybe_attn = self._blocks(temb, train)
        num_levels = len(self.ch_mult)
        # Down path: every intermediate output is kept as a skip connection.
        hs = [conv(self.ch, self.dtype, "conv_in")(x)]
        if input_residual is not None:
            hs[0] = hs[0] + input_residual.astype(hs[0].dtype)
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = res_block(hs[-1], self.ch * self.ch_mult[level], f"down_{level}_block_{i}")
                hs.append(maybe_attn(h, f"down_{level}_attn_{i}"))
            if level != num_levels - 1:
                hs.append(self._downsample(hs[-1], f"down_{level}_downsample"))

        attn_block_cls = RematAttnBlock if self.remat else AttnBlock
        h = res_block(hs[-1], hs[-1].shape[-1], "mid_block_0")
        h = attn_block_cls(self.num_groups, self.dtype, name="mid_attn")(h)
        h = res_block(h, h.shape[-1], "mid_block_1")
        return h, hs

    def _downsample(self, x: Array, name: str) -> Array:
        """[B, H, W, C] -> [B, H/2, W/2, C]."""
        if not self.resamp_with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        # TF "SAME" with stride 2, kernel 3 on an even size pads 0 before and 1 after; diffusers'
        # Downsample2D(padding=0) pads (0, 1, 0, 1) the same way.
        return conv(x.shape[-1], self.dtype, name, strides=2, padding=((0, 1), (0, 1)))(x)

    def _upsample(self, x: Array, name: str) -> Array:
        """Nearest-neighbour x2 (then conv3x3): [B, H, W, C] -> [B, 2H, 2W, C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.resamp_with_conv:
            x = conv(x.shape[-1], self.dtype, name)(x)
        return x


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def param_shapes(model: UNet, image_shape: tuple[int, int, int]) -> Any:
    """The parameter pytree as ShapeDtypeStructs, without allocating: image_shape = (H, W, C)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                                  jnp.zeros(t.shape, t.dtype), train=False))
    return variables["params"]
