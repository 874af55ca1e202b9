"""StyleAligned (Hertz et al. 2024) as an option of the UNet's self-attention, on the feature
seam (`models.seams`, site "<attention block>.attend").

In the chosen attention blocks every row t of the batch also attends to a reference row r:

    Q^_t = AdaIN(Q_t, Q_r),  K^_t = AdaIN(K_t, K_r),
    attention(Q^_t, [K_r; K^_t], [V_r; V_t]),
    AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y)

with mu, sigma over the tokens, per channel. The reference row itself attends as usual, so
its chain is the reference's own (sample.py runs it from the reference's DDIM inversion, as
row r of the same batch). Off (no layers) the model is called as it is: the seam adds nothing.

    style = StyleAlignedApply(ModelApply(model), sites=attention_sites(params, "all"))
    sampler = make_sampler(style, schedule, (B, H, W, C), spec)   # row 0: the reference
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax.models import seams

Array = jax.Array

LAYER_GROUPS = ("all", "down", "mid", "up")
ADAIN_EPS = 1e-5  # added to the variance: constant features (a blank reference) stay finite


def adain(x: Array, reference: Array) -> Array:
    """AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y), statistics over the tokens per
    channel. x: [B, N, C]; reference: [1, N, C] (broadcast over B). Float32 statistics."""
    x32, ref32 = x.astype(jnp.float32), reference.astype(jnp.float32)
    mu, var = jnp.mean(x32, axis=1, keepdims=True), jnp.var(x32, axis=1, keepdims=True)
    mu_r, var_r = jnp.mean(ref32, axis=1, keepdims=True), jnp.var(ref32, axis=1, keepdims=True)
    out = jnp.sqrt(var_r + ADAIN_EPS) * (x32 - mu) / jnp.sqrt(var + ADAIN_EPS) + mu_r
    return out.astype(x.dtype)


def shared_attention(attend: Callable[[Array, Array, Array], Array], q: Array, k: Array,
                     v: Array, *, reference_row: int, use_adain: bool = True,
                     reference_shift: float = 0.0) -> Array:
    """The attention core of StyleAligned: q, k, v [B, N, C] -> [B, N, C]. Row
    `reference_row` attends to itself as usual; every row attends (queries Q^_t) over the 2N
    keys [K_r; K^_t] with values [V_r; V_t]. use_adain=False: Q_t, K_t unnormalised.
    reference_shift: added to the softmax logits of the N reference keys (log of the weight
    the reference gets against a row's own keys; 0: StyleAligned as written)."""
    batch = q.shape[0]
    r = reference_row
    q_r, k_r, v_r = q[r:r + 1], k[r:r + 1], v[r:r + 1]
    q_hat, k_hat = (adain(q, q_r), adain(k, k_r)) if use_adain else (q, k)
    keys = jnp.concatenate([jnp.broadcast_to(k_r, k.shape), k_hat], axis=1)
    values = jnp.concatenate([jnp.broadcast_to(v_r, v.shape), v], axis=1)
    if reference_shift:  # the block's softmax attention with the reference keys' logits shifted
        logits = jnp.einsum("bqc,bkc->bqk", q_hat, keys, preferred_element_type=jnp.float32)
        logits = logits * (q.shape[-1] ** -0.5)
        logits = logits + jnp.where(jnp.arange(keys.shape[1]) < k.shape[1], reference_shift,
                                    0.0)[None, None, :]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        shared = jnp.einsum("bqk,bkc->bqc", weights, values)
    else:
        shared = attend(q_hat, keys, values)
    own = attend(q_r, k_r, v_r)
    return shared.at[r].set(own[0]) if batch > 1 else own


def attention_sites(params: Any, layers: str | Sequence[str] = "all") -> tuple[str, ...]:
    """The '<block>.attend' sites of a UNet's params for `layers`: 'all', 'down', 'mid', 'up'
    (every attention block there), or a list of attention block names ('up_1_attn_0', ...).
    ValueError (one line) for a name the model lacks."""
    blocks = sorted(name for name in params if "_attn" in name or name == "mid_attn")
    if not blocks:
        raise ValueError("StyleAligned needs self-attention blocks, and this model has none "
                         "(model.attn_resolutions is empty).")
    if isinstance(layers, str) and layers in LAYER_GROUPS:
        chosen = [b for b in blocks if layers == "all" or b.startswith(layers)]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        chosen = [name.removesuffix(".attend") for name in names]
        bad = [name for name in chosen if name not in blocks]
        if bad or not chosen:
            raise ValueError(f"style layers {bad or names}: choose from {', '.join(LAYER_GROUPS)} "
                             f"or this model's attention blocks {blocks}.")
    sites = tuple(f"{name}.attend" for name in chosen)
    seams.check_sites(sites, params)
    return sites


@dataclasses.dataclass(frozen=True)
class StyleAlignedApply:
    """An apply_fn `(params, x_t, t, y=None)` running `apply_fn` with StyleAligned's shared
    attention at `sites` ('<block>.attend'; () leaves the call untouched), row
    `reference_row` of each call being the reference; use_adain and reference_shift as
    `shared_attention`. Hashable: keys the compile cache."""

    apply_fn: Any
    sites: tuple[str, ...] = ()
    reference_row: int = 0
    use_adain: bool = True
    reference_shift: float = 0.0

    def __post_init__(self) -> None:
        seams.check_sites(list(self.sites))
        if not isinstance(self.reference_row, int) or self.reference_row < 0:
            raise ValueError(f"reference_row={self.reference_row!r}: use a row index >= 0.")

    @property
    def null_label(self) -> int | None:
        return getattr(self.apply_fn, "null_label", None)

    @property
    def model(self) -> Any:
        return getattr(self.apply_fn, "model", None)

    def __call__(self, params: Any, x_t: Array, t: Array, y: Array | None = None) -> Array:
        if not self.sites:
            return self.apply_fn(params, x_t, t, y)
        if self.reference_row >= x_t.shape[0]:
            raise ValueError(f"reference_row={self.reference_row} is not a row of the batch of "
                             f"{x_t.shape[0]}.")

        def hook(call: Callable[..., Array], args: tuple, kwargs: dict) -> Array:
            q, k, v = args
            return shared_attention(call, q, k, v, reference_row=self.reference_row,
                                    use_adain=self.use_adain,
                                    reference_shift=self.reference_shift)

        with seams.hooks({site: hook for site in self.sites}):
            return self.apply_fn(params, x_t, t, y)
