"""Editing on the compiled reverse chain: RePaint inpainting, SDEdit, DDIM inversion and
interpolation, each one `lax.scan` whose per-step data is passed in as arrays.

* RePaint (Lugmayr et al. 2022, Alg. 1): every reverse step's result keeps the unknown pixels
  and takes the known ones from q(x_{i-1} | x0) of the given image; resampling re-noises the
  whole state j steps up with q(x_i | x_{i-1}) and comes back down, r times at every j-th step.
  The whole route is a NumPy sequence of moves (`repaint_moves`): reverse or forward, with its
  chain index, scanned by one program, so every (j, r) of equal route length shares it.
* SDEdit (Meng et al. 2022): `make_sampler(..., start_t=t0)` and `start="q_x0"`; the chain
  starts from q(x_t0 | x_guide) (`sdedit_start_t` maps a strength to t0).
* DDIM inversion: `ddim_encode` runs the deterministic (eta = 0) chain from x_0 up to x_T;
  decoding is the DDIM sampler started at the latents (`start="x_t"`).
* Interpolation: the DDPM paper's (Fig. 8; `q_interpolate`, decoded from a chosen step with
  shared noise) and in the DDIM latent (`slerp`).

Indexing as `sampling.py`: X_i is the chain's state at index i (marginal abar_i of the
respaced schedule), X_{S-1} the first and X_{-1} the image. The reverse move at i goes
X_i -> X_{i-1} with one network call; the forward move at i goes X_{i-1} -> X_i,
X_i = sqrt(1 - beta_i) X_{i-1} + sqrt(beta_i) z, with no call.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import xla_cpu
from ddpm_jax.diffusion import extract, p_mean_variance, predict_eps_from_x0
from ddpm_jax.guidance import ApplyFn, guided_model
from ddpm_jax.parallel import constrain, replicate
from ddpm_jax.plans import SamplingPlan
from ddpm_jax.reverse import blend_known, q_known, row_keys

Array = jax.Array


# ------------------------------------------------------------------------------- RePaint

MAX_REPAINT_MOVES = 10_000_000  # 2,000 times RePaint's own route (S=250, j=10, r=10: 4,570)


def repaint_route_length(num_steps: int, jump_length: int, resamplings: int) -> tuple[int, int]:
    """(moves, reverse moves = network calls) of `repaint_moves`' route, without building it:
    S + 2 (r - 1) j ceil((S - j) / j) and S + (r - 1) j ceil((S - j) / j)."""
    jumps = 0 if resamplings == 1 else len(range(0, num_steps - jump_length, jump_length))
    extra = (resamplings - 1) * jump_length * jumps
    return num_steps + 2 * extra, num_steps + extra


def repaint_moves(num_steps: int, jump_length: int = 10, resamplings: int = 10) -> dict[str, np.ndarray]:
    """RePaint's route through an S-step chain as data: {"reverse": bool [M], "index": int32 [M]}.

    Starting at X_{S-1}, each reverse move at index i lands on X_{i-1}; on landing at X_k for
    k = 0, j, 2j, ... with k + j <= S - 1, the route goes up j forward moves and back down, and
    does so resamplings - 1 times there (RePaint's "jump" schedule; r = 1: the plain chain).
    M = S + 2 (r - 1) j ceil((S - j) / j) moves, S of them reverse at each pass.
    """
    for name, value in (("num_steps", num_steps), ("jump_length", jump_length),
                        ("resamplings", resamplings)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    if resamplings > 1 and jump_length >= num_steps:
        raise ValueError(f"jump_length={jump_length} must be below the chain's {num_steps} steps "
                         "to resample; lower it, or use resamplings=1.")
    length, calls = repaint_route_length(num_steps, jump_length, resamplings)
    if length > MAX_REPAINT_MOVES:
        from ddpm_jax.memory import repaint_route_bytes
        raise ValueError(
                f"--resamplings={resamplings} with --jump_length={jump_length} over {num_steps} "
                f"steps makes a RePaint route of {length:,} moves (about "
                f"{repaint_route_bytes(length) / 1e9:,.1f} GB to build; {calls:,} network calls "
                f"per image), over the bound of {MAX_REPAINT_MOVES:,} moves: lower --resamplings "
                "(RePaint uses 10), --jump_length or --steps.")
    left = {k: resamplings - 1 for k in range(0, num_steps - jump_length, jump_length)}
    reverse, index = [], []
    state = num_steps - 1
    while state >= 0:
        reverse.append(True)
        index.append(state)
        state -= 1
        if left.get(state, 0) > 0:
            left[state] -= 1
            for _ in range(jump_length):
                state += 1
                reverse.append(False)
                index.append(state)
    return dict(reverse=np.asarray(reverse, bool), index=np.asarray(index, np.int32))


def _repaint_chain(apply_fn: ApplyFn, params: Any, plan: SamplingPlan, moves: dict[str, Array],
                   key: Array, example_offset: Array, labels: Array | None, guidance: Array,
                   images: Array, mask: Array, *, shape: tuple[int, ...], mean_type: str,
                   var_type: str, clip_denoised: bool, guided: bool, unroll: int,
                   mesh: Mesh | None) -> Array:
    batch, image_shape = shape[0], shape[1:]
    model_out = guided_model(apply_fn, params, labels, guidance, channels=image_shape[-1],
                             guided=guided, mesh=mesh)
    images = constrain(images.astype(jnp.float32), mesh)
    known = constrain(mask.astype(jnp.float32), mesh)
    rows = example_offset + jnp.arange(batch, dtype=jnp.int32)
    init_keys, move_keys = row_keys(key, rows)
    x = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(init_keys)
    schedule = plan.schedule

    def normals(m: Array) -> tuple[Array, Array]:
        pairs = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, m), (2,) + image_shape,
                                                     jnp.float32))(move_keys)
        return pairs[:, 0], pairs[:, 1]

    def reverse(x: Array, i: Array, m: Array) -> Array:
        index = jnp.full((batch,), i, jnp.int32)
        t = jnp.full((batch,), plan.timesteps[i], jnp.int32)
        out = p_mean_variance(schedule, model_output=model_out(x, t), x_t=x, t=index,
                              mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
        z_unknown, z_known = normals(m)
        last = i == 0   # X_{-1} is the image: no noise, and the known pixels exactly
        unknown = out["mean"] + jnp.where(last, 0.0, jnp.exp(0.5 * out["log_variance"])) * z_unknown
        return constrain(blend_known(known, q_known(schedule, images, i, z_known), unknown), mesh)

    def forward(x: Array, i: Array, m: Array) -> Array:
        beta = schedule.betas[i]
        return constrain(jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * normals(m)[0], mesh)

    def step(x, move):
        return jax.lax.cond(move["reverse"], reverse, forward, x, move["index"], move["number"]), None

    x, _ = jax.lax.scan(step, x, moves, unroll=unroll)
    return x


@functools.cache
def _repaint_jit() -> Any:
    return jax.jit(_repaint_chain, static_argnums=0, compiler_options=xla_cpu.compiler_options(
            "inference"), static_argnames=("shape", "mean_type", "var_type", "clip_denoised",
                                           "guided", "unroll", "mesh"))


def repaint(apply_fn: ApplyFn, params: Any, plan: SamplingPlan, moves: dict[str, np.ndarray],
            key: Array, images: Array, mask: Array, *, example_offset: int = 0,
            labels: Array | None = None, guidance: float | None = None, mean_type: str = "eps",
            var_type: str = "fixedlarge", clip_denoised: bool = True, unroll: int = 1,
            mesh: Mesh | None = None) -> Array:
    """RePaint inpainting with ancestral steps on `plan`'s (respaced) chain along `moves`
    (`repaint_moves(plan.num_steps, j, r)`). images: [B, H, W, C] in [-1, 1] (the unknown
    pixels' values are ignored); mask: [B, H, W, 1] or [B, H, W, C], 1 / True = known pixel.
    Row n's randomness is fold_in(key, example_offset + row); labels / guidance as `Sampler`.
    Returns [B, H, W, C]: the known pixels are `images`' exactly, the rest completed.
    """
    images = jnp.asarray(images, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if images.ndim != 4 or mask.shape[:3] != images.shape[:3] or mask.shape[3] not in (1, images.shape[3]):
        raise ValueError(f"images must be [B, H, W, C] and mask [B, H, W, 1 or C]; got "
                         f"{images.shape} and {mask.shape}.")
    reverse_moves = np.asarray(moves["reverse"])
    index = np.asarray(moves["index"])
    if index.min() < 0 or index.max() >= plan.num_steps or reverse_moves.sum() < plan.num_steps:
        raise ValueError(f"moves do not fit a {plan.num_steps}-step plan; build them with "
                         f"repaint_moves({plan.num_steps}, j, r).")
    data = dict(reverse=jnp.asarray(reverse_moves), index=jnp.asarray(index, jnp.int32),
                number=jnp.arange(index.shape[0], dtype=jnp.int32))
    guided = guidance is not None
    offset, guidance_arr = jnp.int32(example_offset), jnp.float32(guidance or 0.0)
    labels = row_data(labels)
    if mesh is not None:
        params, plan, data, key, offset, labels, guidance_arr = replicate(
                (params, plan, data, key, offset, labels, guidance_arr), mesh)
    return _repaint_jit()(apply_fn, params, plan, data, key, offset, labels, guidance_arr, images,
                          mask, shape=tuple(images.shape), mean_type=mean_type, var_type=var_type,
                          clip_denoised=bool(clip_denoised), guided=guided, unroll=int(unroll),
                          mesh=mesh)


# ------------------------------------------------------------------- SDEdit and inversion

def sdedit_start_t(num_timesteps: int, strength: float) -> int:
    """The 0-based timestep t0 SDEdit starts from for strength in (0, 1]: round(strength T) - 1,
    at least 0 (strength 1: t0 = T - 1, pure noise in effect; -> 0: one step at t = 0)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1] (the share of the chain re-run; 1: from "
                         f"noise); got {strength!r}.")
    return max(int(round(strength * num_timesteps)) - 1, 0)


def _encode_chain(apply_fn: ApplyFn, params: Any, plan: SamplingPlan, images: Array,
                  labels: Array | None, guidance: Array, *, mean_type: str, var_type: str,
                  guided: bool, unroll: int, trajectory: bool) -> Array | tuple[Array, Array]:
    schedule = plan.schedule
    model_out = guided_model(apply_fn, params, labels, guidance, channels=images.shape[-1],
                             guided=guided, mesh=None)
    batch = images.shape[0]

    def step(x, i):
        # X_{i-1} -> X_i with eps from the network at (X_{i-1}, t_i): DDIM's update run upwards.
        index = jnp.full((batch,), i, jnp.int32)
        t = jnp.full((batch,), plan.timesteps[i], jnp.int32)
        pred_x0 = p_mean_variance(schedule, model_output=model_out(x, t), x_t=x, t=index,
                                  mean_type=mean_type, var_type=var_type,
                                  clip_denoised=False)["pred_x0"]
        eps = predict_eps_from_x0(schedule, x_t=x, t=index, x0=pred_x0)
        abar_prev = extract(schedule.alphas_cumprod_prev, index, x.ndim)
        x0 = (x - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
        abar = extract(schedule.alphas_cumprod, index, x.ndim)
        # The state the step leaves, X_{i-1}, is what a reverse move at i lands on.
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps, x if trajectory else None

    latents, states = jax.lax.scan(step, images.astype(jnp.float32),
                                   jnp.arange(plan.num_steps, dtype=jnp.int32), unroll=unroll)
    return (latents, states) if trajectory else latents


@functools.cache
def _encode_jit() -> Any:
    return jax.jit(_encode_chain, static_argnums=0, compiler_options=xla_cpu.compiler_options(
            "inference"), static_argnames=("mean_type", "var_type", "guided", "unroll",
                                           "trajectory"))


def row_data(labels: Any) -> Any:
    """The chain's per-row data as arrays: labels [B] int32, or a dict of rows
    (`control.rows`: control images and scales) as they are; None stays None."""
    if labels is None:
        return None
    if isinstance(labels, dict):
        return {k: jnp.asarray(v) for k, v in labels.items()}
    return jnp.asarray(labels, jnp.int32)


def ddim_encode(apply_fn: ApplyFn, params: Any, plan: SamplingPlan, images: Array, *,
                labels: Array | None = None, guidance: float | None = None,
                mean_type: str = "eps", var_type: str = "fixedlarge", unroll: int = 1,
                trajectory: bool = False) -> Array | tuple[Array, Array]:
    """DDIM inversion: images [B, H, W, C] in [-1, 1] -> latents X_{S-1} [B, H, W, C], by
    the eta = 0 update run from X_{-1} = images up the plan's S steps, the network evaluated at
    the state it leaves and the timestep it goes to (S calls). Decode with the DDIM sampler of
    the same plan, eta 0 and clip_denoised False, started at the latents (start="x_t"); the
    round trip is exact as the steps shrink (the network sees X_{i-1} for X_i).
    trajectory: also return the states [S, B, H, W, C], entry i = X_{i-1} (the state a reverse
    move at chain index i lands on; entry 0 = the images), as (latents, states): the known
    region of a `make_sampler(..., blend="trajectory")` chain (DiffEdit)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C]; got {images.shape}.")
    return _encode_jit()(apply_fn, params, plan, images,
                         row_data(labels),
                         jnp.float32(guidance or 0.0), mean_type=mean_type, var_type=var_type,
                         guided=guidance is not None, unroll=int(unroll),
                         trajectory=bool(trajectory))


# --------------------------------------------------------------------------- interpolation

def q_interpolate(sqrt_alphas_cumprod: float, a: Array, b: Array, noise: Array,
                  lambdas: Sequence[float] | np.ndarray) -> Array:
    """The DDPM paper's interpolation (Sec. 4.3): x_t of a and b from q with the same noise,
    mixed: (1 - lam) (s a + sqrt(1 - s^2) z) + lam (s b + sqrt(1 - s^2) z) for each lam, with
    s = sqrt(abar_t). a, b, noise: [H, W, C]; returns [L, H, W, C]."""
    s = float(sqrt_alphas_cumprod)
    lam = jnp.asarray(lambdas, jnp.float32)[:, None, None, None]
    x_a, x_b = s * a + np.sqrt(1.0 - s * s) * noise, s * b + np.sqrt(1.0 - s * s) * noise
    return (1.0 - lam) * x_a[None] + lam * x_b[None]


def slerp(z0: Array, z1: Array, lambdas: Sequence[float] | np.ndarray) -> Array:
    """Spherical interpolation of two latents [H, W, C] (DDIM paper, Sec. 5.4): [L, H, W, C],
    sin((1 - lam) th) / sin(th) z0 + sin(lam th) / sin(th) z1, th the angle between them
    (linear when they are parallel)."""
    z0, z1 = jnp.asarray(z0, jnp.float32), jnp.asarray(z1, jnp.float32)
    lam = jnp.asarray(lambdas, jnp.float32)[:, None, None, None]
    cos = jnp.sum(z0 * z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    safe = jnp.where(sin > 1e-6, sin, 1.0)
    w0 = jnp.where(sin > 1e-6, jnp.sin((1.0 - lam) * theta) / safe, 1.0 - lam)
    w1 = jnp.where(sin > 1e-6, jnp.sin(lam * theta) / safe, lam)
    return w0 * z0[None] + w1 * z1[None]
