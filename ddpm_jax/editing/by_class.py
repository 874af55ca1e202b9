"""Editing a real image by class on the one compiled chain: DiffEdit and Blended diffusion
(Plug-and-Play, which injects features, is `editing.pnp`).

* DiffEdit (Couairon et al. 2023): the region to change is where the model's noise
  predictions under the source and the target class disagree, `diffedit_mask`: the mean over n
  noises of |eps(x_t, y_src) - eps(x_t, y_tgt)| at t0 (summed over channels), min-max normalised
  per image to [0, 1], thresholded at 0.5. The image is DDIM-encoded to t0 keeping its
  trajectory, then decoded with y_tgt; after every step the pixels outside the mask are the
  encoding's state at that index (`make_sampler(..., blend="trajectory")`), so they end as the
  input's, bit for bit.
* Blended diffusion (Avrahami et al. 2022; Alg. 2 of the survey notes): from x_k ~ q(x_k | x0),
  each reverse step is steered towards the target class, and its known pixels (outside the edit
  region) are replaced by a draw of q(x_{k-1} | x0) (`make_sampler(..., blend="q_x0")`, the rule
  RePaint's chain uses); they end as the input's, bit for bit.

Both take a class-conditional model (`ModelApply` of a UNet with num_classes; classifier-free
guidance weight `guidance`, or none) or an unconditional one with a noise-conditional classifier
(`ClassifierApply`, scale `classifier_scale`: eps(x, y) = eps(x) - s sigma_t grad log p(y | x_t)).
Masks, labels and the source are data: one program per (batch shape, steps, options), any
sampler of `SamplerSpec`. Masks follow RePaint's convention: 1 / True = known (kept) pixel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import xla_cpu
from ddpm_jax.diffusion import p_mean_variance, predict_eps_from_x0
from ddpm_jax.editing.chain import ddim_encode, sdedit_start_t
from ddpm_jax.guidance import ApplyFn, classifier_log_prob_grad
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

Array = jax.Array

MASK_THRESHOLD = 0.5   # DiffEdit's binarisation of the normalised difference
MASK_NOISES = 10       # DiffEdit's n


def check_class_edit(apply_fn: ApplyFn, classifier: ApplyFn | None, labels: dict[str, Any],
                     batch: int) -> int:
    """The number of classes an edit by class can name; ValueError (one line) for an
    unconditional model without a classifier, or labels (name -> int or [B] ints) out of range."""
    num_classes = getattr(classifier, "num_classes", None) if classifier is not None else \
        getattr(apply_fn, "null_label", None)
    if num_classes is None:
        raise ValueError("editing by class needs a class-conditional model (a run with "
                         "model.num_classes) or a noise-conditional classifier for an "
                         "unconditional one (--classifier, configs/digits.py:classifier).")
    for name, value in labels.items():
        values = np.broadcast_to(np.asarray(value), (batch,))
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 \
                or values.max() >= num_classes:
            raise ValueError(f"{name}={value!r}: use classes in 0..{num_classes - 1}.")
    return num_classes


def _rows(value: Any, batch: int) -> Array:
    return jnp.asarray(np.broadcast_to(np.asarray(value, np.int32), (batch,)))


# ------------------------------------------------------------------------------- DiffEdit

def _mask_fn(apply_fn: ApplyFn, params: Any, schedule: Schedule, images: Array, source: Array,
             target: Array, key: Array, t0: Array, classifier_params: Any, *, num_noises: int,
             mean_type: str, classifier: ApplyFn | None) -> Array:
    batch = images.shape[0]
    t = jnp.full((batch,), t0, jnp.int32)

    def eps(x_t: Array, y: Array) -> Array:
        out = apply_fn(params, x_t, t, y)
        pred_x0 = p_mean_variance(schedule, model_output=out, x_t=x_t, t=t, mean_type=mean_type,
                                  var_type="fixedlarge", clip_denoised=False)["pred_x0"]
        return predict_eps_from_x0(schedule, x_t=x_t, t=t, x0=pred_x0)

    def difference(n: Array) -> Array:
        noise = jax.random.normal(jax.random.fold_in(key, n), images.shape, jnp.float32)
        abar = schedule.alphas_cumprod[t0]
        x_t = jnp.sqrt(abar) * images + jnp.sqrt(1.0 - abar) * noise
        if classifier is None:
            return jnp.abs(eps(x_t, target) - eps(x_t, source))
        # eps(x, y) = eps(x) - s sigma grad log p(y | x): the difference is that of the grads
        # (s sigma is one positive factor, which the normalisation removes).
        grad = functools.partial(classifier_log_prob_grad, classifier, classifier_params, x_t, t)
        return jnp.abs(grad(target) - grad(source))

    total = jax.lax.fori_loop(0, num_noises, lambda n, acc: acc + difference(n),
                              jnp.zeros(images.shape, jnp.float32))
    score = jnp.sum(total, axis=-1, keepdims=True) / num_noises        # [B, H, W, 1]
    low = jnp.min(score, axis=(1, 2, 3), keepdims=True)
    high = jnp.max(score, axis=(1, 2, 3), keepdims=True)
    return (score - low) / jnp.maximum(high - low, 1e-12)


@functools.cache
def _mask_jit() -> Any:
    return jax.jit(_mask_fn, static_argnums=0, compiler_options=xla_cpu.compiler_options(
            "inference"), static_argnames=("num_noises", "mean_type", "classifier"))


def diffedit_mask(apply_fn: ApplyFn, params: Any, schedule: Schedule, images: Array, source: Any,
                  target: Any, key: Array, *, strength: float = 0.5,
                  num_noises: int = MASK_NOISES, mean_type: str = "eps",
                  classifier: ApplyFn | None = None, classifier_params: Any = None) -> Array:
    """DiffEdit's soft mask, float32 [B, H, W, 1] in [0, 1] (1: where the two classes' noise
    predictions differ most): min-max normalised mean over `num_noises` draws x_t ~ q(x_t | x0)
    at t0 = `sdedit_start_t(T, strength)` of |eps(x_t, target) - eps(x_t, source)| summed over
    channels. images: [B, H, W, C] in [-1, 1]; source, target: an int or [B] ints; noise n is
    normal(fold_in(key, n)). With a classifier the model's predictions differ by
    s sigma_t (grad log p(target | x_t) - grad log p(source | x_t)). Threshold it (edit where
    >= MASK_THRESHOLD) for `diffedit`."""
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    check_class_edit(apply_fn, classifier, dict(source=source, target=target), batch)
    if not isinstance(num_noises, int) or num_noises < 1:
        raise ValueError(f"num_noises={num_noises!r}: use an int >= 1 (DiffEdit uses 10).")
    t0 = sdedit_start_t(schedule.num_timesteps, strength)
    return _mask_jit()(apply_fn, params, schedule, images, _rows(source, batch),
                       _rows(target, batch), key, jnp.int32(t0), classifier_params,
                       num_noises=num_noises, mean_type=mean_type, classifier=classifier)


def edit_region(soft_mask: Array, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """bool [B, H, W, 1]: the pixels to change, soft_mask >= threshold."""
    return np.asarray(soft_mask) >= threshold


def diffedit(apply_fn: ApplyFn, params: Any, schedule: Schedule, spec: SamplerSpec,
             images: Array, edit: Array, source: Any, target: Any, key: Array, *,
             strength: float = 0.5, example_offset: int = 0, guidance: float | None = None,
             classifier: ApplyFn | None = None, classifier_params: Any = None,
             classifier_scale: float | None = None) -> dict[str, Array]:
    """DiffEdit's encode-decode: the images [B, H, W, C] in [-1, 1] DDIM-encoded (eta 0,
    unclipped; with the source label on a class-conditional model, unconditionally with a
    classifier) to t0 = `sdedit_start_t(T, strength)` on `spec`'s timesteps, then decoded by
    `spec`'s sampler towards `target` (guidance as `make_sampler`), the pixels outside `edit`
    (bool [B, H, W, 1], True = change) taken from the encoding's trajectory after every step.
    Returns dict(images [B, H, W, C]: the input's outside `edit`, bit for bit; latents)."""
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    check_class_edit(apply_fn, classifier, dict(source=source, target=target), batch)
    known = _known_mask(edit, images.shape, flag="edit", known_is=False)
    t0 = sdedit_start_t(schedule.num_timesteps, strength)
    sampler = make_sampler(apply_fn, schedule, images.shape, spec, start_t=t0, guidance=guidance,
                           classifier=classifier, classifier_scale=classifier_scale,
                           blend="trajectory")
    latents, states = ddim_encode(apply_fn, params, sampler.plan, images,
                                  labels=None if classifier is not None else _rows(source, batch),
                                  mean_type=spec.mean_type, trajectory=True)
    out = sampler(params, key, example_offset, _rows(target, batch), init=latents, start="x_t",
                  classifier_params=classifier_params, known=states, known_mask=known)
    return dict(images=out["images"], latents=latents)


# ------------------------------------------------------------------------------- Blended

def blended(apply_fn: ApplyFn, params: Any, schedule: Schedule, spec: SamplerSpec,
            images: Array, known_mask: Array, target: Any, key: Array, *,
            strength: float = 0.5, example_offset: int = 0, guidance: float | None = None,
            classifier: ApplyFn | None = None, classifier_params: Any = None,
            classifier_scale: float | None = None) -> Array:
    """Blended diffusion: from q(x_k | images) at k = `sdedit_start_t(T, strength)`, `spec`'s
    reverse steps towards `target` (an int or [B] ints; classifier-free guidance `guidance`, or
    classifier guidance), the known pixels (known_mask [B, H, W, 1], True = keep) re-drawn from
    q(x_{t-1} | images) after every step. images: [B, H, W, C] in [-1, 1]. Returns [B, H, W, C]:
    the known pixels are `images`' bit for bit. Row n's randomness: `sampling`'s contract."""
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    check_class_edit(apply_fn, classifier, dict(target=target), batch)
    known = _known_mask(known_mask, images.shape, flag="known_mask", known_is=True)
    sampler = make_sampler(apply_fn, schedule, images.shape, spec,
                           start_t=sdedit_start_t(schedule.num_timesteps, strength),
                           guidance=guidance, classifier=classifier,
                           classifier_scale=classifier_scale, blend="q_x0")
    return sampler(params, key, example_offset, _rows(target, batch), init=images, start="q_x0",
                   classifier_params=classifier_params, known=images, known_mask=known)["images"]


def _known_mask(mask: Any, image_shape: tuple[int, ...], *, flag: str, known_is: bool) -> Array:
    """float32 [B, H, W, 1], 1 = known, from a bool mask of the kept (known_is) or the changed
    pixels; ValueError (one line) for another shape, or a mask that keeps all or nothing."""
    mask = np.asarray(mask)
    b, h, w, _ = image_shape
    if mask.shape != (b, h, w, 1):
        raise ValueError(f"{flag} must be [{b}, {h}, {w}, 1] for images of shape "
                         f"{list(image_shape)}; got {list(mask.shape)}.")
    known = (mask != 0) if known_is else (mask == 0)
    per_image = known.reshape(b, -1)
    if per_image.all(axis=1).any():
        raise ValueError(f"{flag}: a mask keeps every pixel: nothing to edit; mark the pixels "
                         "to change.")
    if not per_image.any(axis=1).all() and known_is:
        raise ValueError(f"{flag}: a mask keeps no pixel: nothing to blend with; use SDEdit "
                         "(--sdedit) to redraw the whole image.")
    return jnp.asarray(known, jnp.float32)
