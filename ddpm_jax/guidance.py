"""Guidance of a model call: classifier-free guidance (Ho & Salimans 2022) and classifier
guidance (Dhariwal & Nichol 2021), as pure functions the compiled chains call at every step.

* `guided_model` binds a model's params (and per-row labels) into `model_out(x_t, t)`; with
  `guided` it returns (1 + w) model(x_t, t, y) - w model(x_t, t, null) on the first C output
  channels (eps, x0 or mean; a learned variance stays the conditional one).
* `classifier_guidance` moves one step's prediction along grad_x log p(y | x_t, t) of a
  noise-conditional classifier (`ClassifierApply` of `models.classifier.NoisyClassifier`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ddpm_jax.parallel import constrain
from ddpm_jax.schedule import Schedule

Array = jax.Array
ApplyFn = Callable[..., Array]   # (params, x_t [B,H,W,C], t [B][, y [B]]) -> output


def guided_model(apply_fn: ApplyFn, params: Any, labels: Array | None, guidance: Array, *,
                 channels: int, guided: bool, mesh: Mesh | None) -> Callable[[Array, Array], Array]:
    """`model_out(x_t [B,H,W,C], t [B]) -> output` of apply_fn with its params bound: the
    unconditional call (labels None), the conditional one, or with `guided` classifier-free
    guidance on the first `channels` output channels (a learned variance stays conditional).
    An apply_fn with its own `guided_model` (per-row data beyond labels:
    `control.ControlApply`) builds model_out itself."""
    if hasattr(apply_fn, "guided_model"):
        return apply_fn.guided_model(params, labels, guidance, channels=channels, guided=guided,
                                     mesh=mesh)
    if labels is not None:
        labels = constrain(labels, mesh)
        null = jnp.full_like(labels, apply_fn.null_label) if guided else None

    def model_out(x_t: Array, t: Array) -> Array:
        if labels is None:
            return apply_fn(params, x_t, t)
        cond = apply_fn(params, x_t, t, labels)
        if not guided:
            return cond
        # Two calls of B rows, not one of 2B: no batch concatenation to reshard over the mesh.
        uncond = apply_fn(params, x_t, t, null)
        mixed = cond[..., :channels] + guidance * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([mixed, cond[..., channels:]], axis=-1)
    return model_out


def classifier_log_prob_grad(classifier: ApplyFn, classifier_params: Any, x_t: Array, t: Array,
                             labels: Array) -> Array:
    """grad_x log p(y | x_t, t) of a classifier `(params, x_t, t) -> logits [B, K]`, per row
    (the rows' log-probabilities are independent, so the gradient of their sum is each row's).
    x_t: [B, H, W, C]; t, labels: [B] int. Returns [B, H, W, C] float32."""
    def total(x: Array) -> Array:
        log_probs = jax.nn.log_softmax(classifier(classifier_params, x, t).astype(jnp.float32))
        return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    return jax.grad(total)(x_t)


def classifier_guidance(out: dict[str, Array], classifier: ApplyFn, classifier_params: Any,
                        scale: Array, labels: Array, schedule: Schedule, *, x_t: Array, t: Array,
                        index: Array, shift_mean: bool) -> dict[str, Array]:
    """Classifier guidance (Dhariwal & Nichol 2021) of one step's `p_mean_variance` output, with
    g = grad_x log p(y | x_t, t): ancestral steps shift the mean, mu + s Sigma g (their Alg. 1);
    DDIM and DPM-Solver++ use eps - s sqrt(1 - abar_t) g (Alg. 2), i.e. x0_hat + s (1 - abar_t)
    / sqrt(abar_t) g. t: the original timesteps (the classifier's); index: the chain's;
    shift_mean: True for a step that draws around out["mean"] (ancestral), False for one built
    from out["pred_x0"] (DDIM, DPM-Solver++)."""
    grad = classifier_log_prob_grad(classifier, classifier_params, x_t, t, labels)
    out = dict(out)
    if shift_mean:
        out["mean"] = out["mean"] + scale * jnp.exp(out["log_variance"]) * grad
    else:
        abar = jnp.take(schedule.alphas_cumprod, index)[:, None, None, None]
        out["pred_x0"] = out["pred_x0"] + scale * (1.0 - abar) / jnp.sqrt(abar) * grad
    return out


@dataclasses.dataclass(frozen=True)
class ClassifierApply:
    """`(params, x_t, t) -> logits [B, K]` of a noise-conditional classifier (`NoisyClassifier`)
    for classifier guidance; equal models give equal, cache-sharing functions."""

    model: Any

    def __call__(self, params: Any, x_t: Array, t: Array) -> Array:
        return self.model.apply({"params": params}, x_t, t, train=False)

    @property
    def num_classes(self) -> int:
        return self.model.classes
