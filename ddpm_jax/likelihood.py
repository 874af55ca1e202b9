"""Bits/dim of a data split under the discrete variational bound (Ho et al. 2020, Sec. 3.3 and
App.; the official `calc_bpd_loop`): prior + decoder + every KL term over all T steps, per
image, vmapped over a batch and sharded over the devices. Image n draws its noise from
fold_in(key, n), so the numbers depend neither on the batch size nor on the device count.
(`evaluate` reports them; the probability-flow ODE likelihood is `ode_likelihood.py`.)"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ddpm_jax import diffusion, images, parallel, xla_cpu
from ddpm_jax.guidance import ApplyFn
from ddpm_jax.schedule import Schedule

Array = jax.Array


def _bpd_batch_fn(apply_fn: ApplyFn, params: Any, schedule: Schedule, x0: Array, indices: Array,
                  key: Array, *, mean_type: str, var_type: str,
                  clip_denoised: bool) -> dict[str, Array]:
    def one(x: Array, index: Array) -> dict[str, Array]:
        out = diffusion.calc_bpd(schedule, lambda x_t, t: apply_fn(params, x_t, t), x0=x[None],
                                 key=jax.random.fold_in(key, index), mean_type=mean_type,
                                 var_type=var_type, clip_denoised=clip_denoised)
        return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(x0, indices)


@functools.cache
def _bpd_batch() -> Callable[..., dict[str, Array]]:
    """The jitted `_bpd_batch_fn`, built on first use so that the backend's options are known."""
    return jax.jit(_bpd_batch_fn, static_argnames=("apply_fn", "mean_type", "var_type", "clip_denoised"),
                   compiler_options=xla_cpu.compiler_options("inference"))


def _to_global(x: np.ndarray, mesh: jax.sharding.Mesh | None) -> Array | np.ndarray:
    """Every process holds the whole batch x; returns it as a batch-sharded global array."""
    if mesh is None:
        return x
    return jax.make_array_from_callback(x.shape, parallel.data_sharding(mesh), lambda i: x[i])


def evaluate_bpd(apply_fn: ApplyFn, params: Any, schedule: Schedule, data: np.ndarray,
                 key: Array, *, mean_type: str = "eps", var_type: str = "fixedlarge",
                 clip_denoised: bool = True, batch_size: int = 64,
                 mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict[str, Any]:
    """The variational bound of every image of `data` (uint8 [N, H, W, C]) in bits/dim.

    apply_fn(params, x_t, t) -> model output; hashable (e.g. `sampling.ModelApply(model)`),
    it keys the compilation cache. Every process passes the same `data`; with a mesh the
    batch (rounded up to a multiple of the device count) is sharded over its "data" axis.
    Returns dict(total_bpd, prior_bpd, decoder_bpd: [N] float64; terms_bpd, x0_mse,
    eps_mse: [T] means over the images; num_images).
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4 or len(data) == 0:
        raise ValueError(f"evaluate_bpd takes uint8 images [N, H, W, C] with N >= 1, got "
                         f"{data.dtype} {data.shape}: the bound is defined on 8-bit data.")
    batch = parallel.round_up_to_devices(min(batch_size, len(data)),
                                         1 if mesh is None else mesh.size)

    def one_batch(start: int, chunk: np.ndarray) -> dict[str, Array]:
        indices = np.arange(start, start + batch, dtype=np.int32)
        return _bpd_batch()(apply_fn, params, schedule,
                            _to_global(images.to_model_range(chunk), mesh),
                            _to_global(indices, mesh), key, mean_type=mean_type,
                            var_type=var_type, clip_denoised=clip_denoised)

    out = parallel.map_batches(one_batch, [data], batch, desc="bits/dim", progress=progress)
    out = {k: v.astype(np.float64) for k, v in out.items()}
    result: dict[str, Any] = dict(total_bpd=out["total_bpd"], prior_bpd=out["prior_bpd"],
                                  decoder_bpd=out["terms_bpd"][:, 0])
    result.update({k: out[k].mean(axis=0) for k in ("terms_bpd", "x0_mse", "eps_mse")})
    result["num_images"] = len(data)
    return result


def bpd_summary(result: dict[str, Any]) -> dict[str, float]:
    """Means over the images (bits/dim) of `evaluate_bpd`'s result: total (with its standard
    error), prior, decoder (t = 0) and the sum of the KL terms t = 1..T-1."""
    total = result["total_bpd"]
    stderr = float(np.std(total, ddof=1) / math.sqrt(len(total))) if len(total) > 1 else 0.0
    return dict(total=float(np.mean(total)), total_stderr=stderr,
                prior=float(np.mean(result["prior_bpd"])),
                decoder=float(np.mean(result["decoder_bpd"])),
                kl_terms=float(np.sum(result["terms_bpd"][1:])),
                num_images=int(result["num_images"]))
