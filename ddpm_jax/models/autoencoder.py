"""The first stage of latent diffusion (Rombach et al. 2022): a convolutional KL autoencoder.

The encoder maps an image [B, H, W, C] in [-1, 1] to a diagonal Gaussian over latents
[B, H/f, W/f, c] (f = 2^(len(ch_mult) - 1)), the decoder maps a latent back to an image. Its
blocks are the UNet's (GroupNorm-swish-conv residual blocks, stride-2 convolutions down,
nearest-neighbour + conv up), without a time embedding. The loss is a reconstruction term plus
a small KL term towards N(0, I) that keeps the latent scale bounded (`autoencoder_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.unet import GroupNorm, conv, group_norm, zero_init

Array = jax.Array

RECONSTRUCTIONS = ("l1", "l2")


class _Block(nn.Module):
    """norm-swish-conv, norm-swish-conv(zero init), + (1x1) shortcut: [B, H, W, C] -> out_ch."""

    out_ch: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv(self.out_ch, self.dtype, "conv_0")(nn.swish(group_norm(x, self.num_groups, self.dtype, "norm_0")))
        h = nn.swish(group_norm(h, self.num_groups, self.dtype, "norm_1"))
        h = conv(self.out_ch, self.dtype, "conv_1", kernel_init=zero_init)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, self.dtype, "shortcut", kernel=1)(x)
        return x + h


class Autoencoder(nn.Module):
    """KL autoencoder: ch base channels, ch_mult per level (len - 1 halvings: f = 2^(len - 1)),
    num_res_blocks per level, latent_channels c, image_channels C (the decoder's output)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    latent_channels: int
    image_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    def setup(self) -> None:
        levels = len(self.ch_mult)
        width = [self.ch * m for m in self.ch_mult]
        self.enc_in = conv(self.ch, self.dtype, "enc_in")
        self.enc_blocks = [[_Block(width[level], self.num_groups, self.dtype,
                                   name=f"enc_{level}_block_{i}") for i in range(self.num_res_blocks)]
                           for level in range(levels)]
        self.enc_down = [conv(width[level], self.dtype, f"enc_{level}_downsample", strides=2,
                              padding=((0, 1), (0, 1))) for level in range(levels - 1)]
        self.enc_mid = _Block(width[-1], self.num_groups, self.dtype, name="enc_mid")
        self.enc_norm = GroupNorm(self.num_groups, name="enc_norm")
        self.enc_out = conv(2 * self.latent_channels, self.dtype, "enc_out", kernel=1)
        self.dec_in = conv(width[-1], self.dtype, "dec_in")
        self.dec_mid = _Block(width[-1], self.num_groups, self.dtype, name="dec_mid")
        self.dec_blocks = [[_Block(width[level], self.num_groups, self.dtype,
                                   name=f"dec_{level}_block_{i}") for i in range(self.num_res_blocks)]
                           for level in range(levels)]
        self.dec_up = [conv(width[level], self.dtype, f"dec_{level}_upsample")
                       for level in range(1, levels)]
        self.dec_norm = GroupNorm(self.num_groups, name="dec_norm")
        self.dec_out = conv(self.image_channels, self.dtype, "dec_out")

    @property
    def factor(self) -> int:
        """The downsampling factor f."""
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """x: [B, H, W, C] in [-1, 1] -> (mean, log_variance) of q(z | x), each [B, H/f, W/f, c]."""
        if x.ndim != 4 or x.shape[1] % self.factor or x.shape[2] % self.factor:
            raise ValueError(f"the autoencoder takes [B, H, W, C] images with H and W multiples of "
                             f"f = {self.factor}; got shape {x.shape}.")
        h = self.enc_in(x)
        for level, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                h = block(h)
            if level < len(self.enc_down):
                h = self.enc_down[level](h)
        h = self.enc_out(nn.swish(self.enc_norm(self.enc_mid(h)).astype(self.dtype)))
        mean, log_variance = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(log_variance, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, c] -> x_hat [B, h f, w f, image_channels] float32 (unbounded)."""
        h = self.dec_mid(self.dec_in(z))
        for level in reversed(range(len(self.dec_blocks))):
            for block in self.dec_blocks[level]:
                h = block(h)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = self.dec_up[level - 1](h)
        h = nn.swish(self.dec_norm(h).astype(self.dtype))
        return self.dec_out(h).astype(jnp.float32)

    def __call__(self, x: Array, key: Array) -> dict[str, Array]:
        """x: [B, H, W, C] in [-1, 1]; key draws z ~ q(z | x). Returns dict(reconstruction [B, H, W,
        C], mean, log_variance, z [B, H/f, W/f, c])."""
        mean, log_variance = self.encode(x)
        z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
        return dict(reconstruction=self.decode(z), mean=mean,
                    log_variance=log_variance, z=z)


def gaussian_kl(mean: Array, log_variance: Array) -> Array:
    """KL(N(mean, exp(log_variance)) || N(0, I)) summed over the latent dims, per image [B], nats."""
    terms = 0.5 * (jnp.square(mean) + jnp.exp(log_variance) - 1.0 - log_variance)
    return jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def autoencoder_loss(x: Array, out: dict[str, Array], *, kl_weight: float,
                     reconstruction: str = "l1") -> tuple[Array, dict[str, Array]]:
    """Per-pixel reconstruction error (L1 or L2, mean over pixels) + kl_weight * KL / (pixels):
    the KL in nats per image divided by the image's H W C, so kl_weight does not depend on the
    image size. Returns (scalar loss, dict of scalar metrics)."""
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={reconstruction!r}: choose one of {RECONSTRUCTIONS}.")
    error = out["reconstruction"] - x
    per_pixel = jnp.abs(error) if reconstruction == "l1" else jnp.square(error)
    rec = jnp.mean(per_pixel)
    kl = jnp.mean(gaussian_kl(out["mean"], out["log_variance"])) / math.prod(x.shape[1:])
    return rec + kl_weight * kl, dict(reconstruction=rec, kl=kl, mse=jnp.mean(jnp.square(error)))
