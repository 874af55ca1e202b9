"""The noise-conditional classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
guided-diffusion's EncoderUNetModel): the UNet's time embedding, down path and middle, then a
pooled head. Trained by the same loop and step (objective "classify"); its logits guide the
chain through `guidance.ClassifierApply`. (The digits feature network of digits-FID is
`models/digits_features.py`, a different network for a different job.)"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.unet import UNet, default_init, group_norm

Array = jax.Array


class NoisyClassifier(UNet):
    """A noise-conditional classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol
    2021; guided-diffusion's EncoderUNetModel): the UNet's time embedding, down path and middle
    (the same blocks and names), then GroupNorm, swish, a global average pool and a Dense layer
    to `classes` logits. The UNet fields set the shape; num_classes (class conditioning) and
    out_channels are unused and must stay None."""

    classes: int = 10

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
        """x: [B, H, W, C] in [-1, 1] (a noisy x_t); t: [B] int (0-based) -> logits [B, classes]
        float32. y must be None (the classifier predicts it)."""
        if x.ndim != 4 or t.shape != (x.shape[0],):
            raise ValueError(f"x must be [B, H, W, C] and t [B]; got {x.shape} and {t.shape}.")
        if y is not None or self.num_classes is not None:
            raise ValueError("a NoisyClassifier takes no class labels (num_classes=None, y=None); "
                             "its output size is `classes`.")
        h, _ = self._encode(x, self._embed(t, None, x.shape[0]), train)
        h = nn.swish(group_norm(h, self.num_groups, self.dtype, "norm_out"))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.classes, kernel_init=default_init, name="head")(h)
