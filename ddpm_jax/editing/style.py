"""StyleAligned sampling: a reference image's chain runs as row 0 of every batch, and the
other rows share its attention (`models.style_aligned`).

The reference is DDIM-inverted (eta 0, unclipped, the null label) on the plan that then decodes
the batch, so its row retraces the reference while the others are drawn from noise with their
classes. The chain is the one compiled DDIM chain (`make_sampler`, start="x_t"), its model call
`StyleAlignedApply`; with no sites the same call gives the unshared images from the same noise
(the comparison the benchmark makes).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.editing.chain import ddim_encode
from ddpm_jax.images import to_uint8
from ddpm_jax.models.style_aligned import StyleAlignedApply
from ddpm_jax.parallel import map_batches
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

Array = jax.Array


def check_style_spec(spec: SamplerSpec) -> None:
    """The reference's row retraces it only on deterministic, unclipped DDIM."""
    if spec.sampler != "ddim" or spec.eta != 0.0 or spec.clip_denoised or \
            spec.threshold is not None or spec.corrector_snr is not None:
        raise ValueError("StyleAligned decodes the reference's DDIM inversion: use sampler "
                         "'ddim' with eta 0, clip_denoised False, no threshold or corrector "
                         f"(got {spec.describe()}).")


def style_aligned_samples(apply_fn: Any, params: Any, schedule: Schedule, spec: SamplerSpec,
                          reference: np.ndarray, labels: np.ndarray | None, key: Array, *,
                          num_samples: int, batch_size: int, sites: Sequence[str],
                          use_adain: bool = True, reference_shift: float = 0.0,
                          guidance: float | None = None,
                          progress: bool = False) -> dict[str, np.ndarray]:
    """num_samples images sharing `reference`'s attention at `sites` ('<block>.attend'; ()
    for no sharing). apply_fn: a class-conditional or unconditional `ModelApply`; reference:
    uint8 [H, W, C]; labels: [num_samples] classes (None: the null label); batch_size: rows
    per call, the reference's included (>= 2); use_adain, reference_shift: as
    `StyleAlignedApply`. Sample n starts from normal(fold_in(key, n)).
    Returns images uint8 [N, H, W, C] and reconstruction uint8 [H, W, C] (the reference row)."""
    check_style_spec(spec)
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: StyleAligned needs >= 2 rows (the "
                         "reference and at least one image).")
    image_shape = reference.shape
    batch = min(batch_size, num_samples + 1)
    null = getattr(apply_fn, "null_label", None)
    styled = StyleAlignedApply(apply_fn, tuple(sites), reference_row=0, use_adain=use_adain,
                               reference_shift=float(reference_shift))
    sampler = make_sampler(styled, schedule, (batch,) + image_shape, spec, guidance=guidance)
    x0 = jnp.asarray(reference, jnp.float32)[None] / 127.5 - 1.0
    ref_label = None if null is None else jnp.asarray([null], jnp.int32)
    latent = ddim_encode(apply_fn, params, sampler.plan, x0, labels=ref_label,
                         mean_type=spec.mean_type, var_type=spec.var_type)
    if labels is None and guidance is not None:
        raise ValueError("guidance needs labels (the classes of the images).")
    rows = np.arange(num_samples, dtype=np.int32)

    def one_batch(start: int, row_ids: np.ndarray, *label_chunk: np.ndarray) -> dict[str, Array]:
        noise = jax.vmap(lambda n: jax.random.normal(jax.random.fold_in(key, n), image_shape,
                                                     jnp.float32))(jnp.asarray(row_ids))
        init = jnp.concatenate([latent, noise])
        y = None
        if null is not None:
            chunk = label_chunk[0] if label_chunk else np.full(batch - 1, null, np.int32)
            y = np.concatenate([[null], chunk]).astype(np.int32)
        out = sampler(params, key, init=init, start="x_t", labels=y)["images"]
        return dict(images=out[1:], reference=jnp.repeat(out[:1], batch - 1, axis=0))

    arrays = [rows] + ([] if labels is None else [np.asarray(labels, np.int32)])
    out = map_batches(one_batch, arrays, batch - 1, desc="style-aligned", progress=progress,
                      to_host=jax.device_get)
    return dict(images=to_uint8(out["images"]), reconstruction=to_uint8(out["reference"][0]))
