"""Plug-and-Play feature injection (Tumanyan et al. 2023) on the one compiled chain, by class.

The guide image is DDIM-inverted (unconditionally, eta 0) to x_T; then one DDIM chain runs
2B rows from that latent: rows 0..B-1 the guide (the null label, so they retrace the guide),
rows B..2B-1 the targets (the target class). Inside every model call (`InjectApply`, through
`models.seams`) the target rows take the guide rows':

* residual-block outputs of one decoder level (`up_{level}_block_*`) while t > feature_t,
* self-attention queries and keys of the decoder's attention blocks (`up_*_attn_*.attend`;
  the target keeps its values) while t > attn_t,

t the original timestep of the call. The thresholds are data (the params bundle), so every
choice of them runs one program; with no injection (thresholds at or above the chain's first
timestep) the chain is plain sampling of those rows, bit for bit. `injection_threshold` turns
the paper's "share of the steps injected" (tau_f = 0.8, tau_A = 0.5 of the chain) into a
threshold on t (t >= (1 - share) T). Classifier-free guidance of the target rows is the chain's (`guidance`): the
guide rows' null label makes it a no-op on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.editing.by_class import check_class_edit
from ddpm_jax.editing.chain import ddim_encode
from ddpm_jax.models import seams
from ddpm_jax.sampling import ModelApply, make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

Array = jax.Array

FEATURE_SHARE = 0.8   # the paper's tau_f: features injected over the first 80% of the steps
ATTN_SHARE = 0.5      # the paper's tau_A: attention over the first half


def _replace_targets(h: Array, on: Array) -> Array:
    """h [2B, ...]: rows B.. take rows 0..B-1's values where on [B] is True."""
    half = h.shape[0] // 2
    on = on.reshape((half,) + (1,) * (h.ndim - 1))
    return jnp.concatenate([h[:half], jnp.where(on, h[:half], h[half:])], axis=0)


@dataclasses.dataclass(frozen=True)
class InjectApply:
    """`(params, x_t [2B, H, W, C], t [2B], y=None) -> output` of a UNet whose batch is
    [guide rows; target rows], params = dict(model=the UNet's params, feature_t=int32,
    attn_t=int32): the target rows take the guide rows' outputs at `feature_sites` while
    t > feature_t, and their queries and keys at `attn_sites` (attention blocks) while
    t > attn_t. Hashable, so equal injections share one compiled chain."""

    model: Any
    feature_sites: tuple[str, ...]
    attn_sites: tuple[str, ...]

    @property
    def null_label(self) -> int | None:
        return getattr(self.model, "num_classes", None)

    @property
    def decodes(self) -> bool:
        """A latent run's model: the chain's end is decoded (outside the hooks)."""
        return ModelApply(self.model).decodes

    def decode(self, params: dict[str, Any], z: Array) -> Array:
        return ModelApply(self.model).decode(params["model"], z)

    def __call__(self, params: dict[str, Any], x_t: Array, t: Array,
                 y: Array | None = None) -> Array:
        half = x_t.shape[0] // 2
        features_on = t[half:] > params["feature_t"]
        attn_on = t[half:] > params["attn_t"]

        def features(call, args, kwargs):
            return _replace_targets(call(*args, **kwargs), features_on)

        def attention(call, args, kwargs):
            q, k, v = args
            return call(_replace_targets(q, attn_on), _replace_targets(k, attn_on), v, **kwargs)

        hooks = {site: features for site in self.feature_sites}
        hooks.update({f"{site}.attend": attention for site in self.attn_sites})
        with seams.hooks(hooks):
            return self.model.apply({"params": params["model"]}, x_t, t, y, train=False)


def injection_sites(params: Any, feature_level: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the residual blocks of decoder level `feature_level`, the decoder's attention blocks) of
    a UNet's params; ValueError (one line) for a level the model lacks."""
    blocks = tuple(sorted(k for k in params if k.startswith(f"up_{feature_level}_block_")))
    if not blocks:
        levels = sorted({int(k.split("_")[1]) for k in params if k.startswith("up_")})
        raise ValueError(f"feature_level={feature_level!r}: the decoder has levels {levels} "
                         "(0: full resolution).")
    attn = tuple(sorted(k for k in params if k.startswith("up_") and "_attn_" in k))
    seams.check_sites(list(blocks) + [f"{a}.attend" for a in attn], params)
    return blocks, attn


def injection_threshold(num_timesteps: int, share: float) -> int:
    """The timestep threshold of injecting over the first `share` of the diffusion's T steps:
    t > threshold exactly for t >= round((1 - share) T) (share 0: T - 1, no injection; share 1:
    -1, every step). On a time-spaced chain this is the first `share` of its steps (the paper's
    tau_f = 0.8 and tau_A = 0.5 of 50 DDIM steps); on another spacing, the steps above that t."""
    if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"injection share {share!r}: use a share of the steps in [0, 1] (the "
                         "paper: 0.8 for features, 0.5 for attention; 0: none).")
    return int(round((1.0 - share) * num_timesteps)) - 1


def pnp(model: Any, params: Any, schedule: Schedule, spec: SamplerSpec, images: Array,
        target: Any, key: Array, *, feature_level: int = 1, feature_share: float = FEATURE_SHARE,
        attn_share: float = ATTN_SHARE, guidance: float | None = None,
        example_offset: int = 0) -> dict[str, Array]:
    """Plug-and-Play: images [B, H, W, C] in [-1, 1] (the guides) -> dict(images [B, H, W, C]:
    the targets of class `target` (an int or [B] ints), guides [B, H, W, C]: the guide rows'
    own decoding, latents [B, H, W, C]). model: a class-conditional Flax UNet, or a latent
    run's `LatentUNet` (then `images` are its scaled latents, the sites are its UNet's and
    images and guides come out decoded); spec: DDIM with eta 0 (the guide rows must retrace
    the inversion), unclipped as the inversion."""
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    check_class_edit(ModelApply(model), None, dict(target=target), batch)
    if spec.sampler != "ddim" or spec.eta != 0.0:
        raise ValueError(f"Plug-and-Play decodes along the guide's DDIM inversion: use "
                         f"sampler 'ddim' with eta 0, not {spec.describe()}.")
    # A latent run's model holds the UNet (whose blocks are the sites) beside its autoencoder.
    blocks, attn = injection_sites(params["unet"] if ModelApply(model).decodes else params,
                                   feature_level)
    apply_fn = InjectApply(model, blocks, attn)
    sampler = make_sampler(apply_fn, schedule, (2 * batch,) + images.shape[1:], spec,
                           guidance=guidance)
    plan = sampler.plan
    T = schedule.num_timesteps
    thresholds = dict(feature_t=jnp.int32(injection_threshold(T, feature_share)),
                      attn_t=jnp.int32(injection_threshold(T, attn_share)))
    latents = ddim_encode(ModelApply(model), params, plan, images, mean_type=spec.mean_type,
                          var_type=spec.var_type)
    bundle = dict(model=params, **thresholds)
    null = np.full(batch, model.num_classes, np.int32)
    labels = np.concatenate([null, np.broadcast_to(np.asarray(target, np.int32), (batch,))])
    rows = np.tile(example_offset + np.arange(batch, dtype=np.int32), 2)
    out = sampler(bundle, key, example_offset, labels, init=jnp.concatenate([latents, latents]),
                  start="x_t", rows=rows)["images"]
    return dict(images=out[batch:], guides=out[:batch], latents=latents)
