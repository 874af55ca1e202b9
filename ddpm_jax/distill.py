"""Progressive distillation's target (Salimans & Ho, ICLR 2022, Alg. 2), as pure functions.

A student learns to take in one DDIM step (eta 0) what its teacher takes in two. With
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and a teacher's clean-image prediction
x0_hat(z, t), one DDIM step from t to s is

    z_s = alpha_s x0_hat + sigma_s (z_t - alpha_t x0_hat) / sigma_t.

The teacher steps t -> t' -> t'' (z_t -> z_t' -> z_t''); the student's target is the x0 that
makes one student step t -> t'' land on z_t'':

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

and its loss is max(SNR_t, 1) ||x~ - x0_hat_student(z_t, t)||^2 (the paper's "truncated SNR"
weighting, SNR_t = alpha_t^2 / sigma_t^2), the mean over pixels.

Time grid (discrete, 0-based t; index -1 is the clean image, alpha = 1, sigma = 0): a teacher
of N steps runs DDIM on `plans.trailing_timesteps(T, N)`, p_k = round(k T / N) - 1 for k = 1..N,
and p_0 = -1. The student of N / 2 steps runs on the points p_2, p_4, ..., p_N, which are
`trailing_timesteps(T, N / 2)`: its step j (1-based) goes from t = p_{2j} over the teacher's
t' = p_{2j-1} to t'' = p_{2j-2}. Every halving nests exactly (integer arithmetic), so a chain
N -> N/2 -> ... -> 1 needs N to be a power of two times the final step count.

The networks enter as callables: the teacher as `teacher_x0_fn(z, t) -> x0_hat` (already in
x0 form, e.g. `x0_fn` over its model), the student as its raw output, read by its mean type.
Nothing here owns state, does I/O or loops over t in Python; everything works under jit/grad.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.plans import trailing_timesteps
from ddpm_jax.schedule import Schedule

Array = jax.Array
X0Fn = Callable[[Array, Array], Array]

STUDENT_MEAN_TYPES = ("v", "xstart", "eps")  # xprev has no one-step DDIM reading


def check_teacher_steps(teacher_steps: int, num_timesteps: int, name: str = "teacher_steps") -> None:
    """ValueError (one line naming `name`) unless N is an even int in 2..T: a student of N / 2
    steps needs each of its steps to span two of the teacher's."""
    if not isinstance(teacher_steps, (int, np.integer)) or isinstance(teacher_steps, bool) \
            or teacher_steps < 2 or teacher_steps % 2 or teacher_steps > num_timesteps:
        raise ValueError(f"{name}={teacher_steps!r} does not halve: use an even number of "
                         f"teacher steps in 2..{num_timesteps} (T); a chain of halvings to S "
                         "steps starts from S times a power of two, e.g. 64 -> 32 -> ... -> 4.")


def step_times(num_timesteps: int, teacher_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The student's N / 2 steps as (t, t_mid, t_next), each int32 [N / 2], indexed by the
    student step j - 1 (j = 1 the last step, ending on the clean image): t = p_{2j},
    t_mid = p_{2j-1}, t_next = p_{2j-2}, with p the teacher's trailing grid and p_0 = -1."""
    check_teacher_steps(teacher_steps, num_timesteps)
    points = np.concatenate([[-1], trailing_timesteps(num_timesteps, teacher_steps)])
    return (points[2::2].astype(np.int32), points[1::2].astype(np.int32),
            points[0:-1:2].astype(np.int32))


def alpha_sigma(schedule: Schedule, t: Array, ndim: int) -> tuple[Array, Array]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) gathered to [B, 1, ..., 1] for
    0-based t [B]; t = -1 (the clean image) gives (1, 0)."""
    clean = (t < 0).reshape((t.shape[0],) + (1,) * (ndim - 1))
    safe = jnp.maximum(t, 0)
    alpha = diffusion.extract(schedule.sqrt_alphas_cumprod, safe, ndim)
    sigma = diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, safe, ndim)
    return jnp.where(clean, 1.0, alpha), jnp.where(clean, 0.0, sigma)


def ddim_step(schedule: Schedule, *, z_t: Array, x0_hat: Array, t: Array, s: Array) -> Array:
    """One deterministic DDIM step from t to s < t (s = -1: the clean image, x0_hat itself):
    alpha_s x0_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x0_hat) / sigma_t."""
    alpha_t, sigma_t = alpha_sigma(schedule, t, z_t.ndim)
    alpha_s, sigma_s = alpha_sigma(schedule, s, z_t.ndim)
    return alpha_s * x0_hat + sigma_s * (z_t - alpha_t * x0_hat) / sigma_t


def two_teacher_steps(schedule: Schedule, teacher_x0_fn: X0Fn, *, z_t: Array, t: Array,
                      t_mid: Array, t_next: Array) -> Array:
    """z_t'' after the teacher's DDIM steps t -> t_mid -> t_next. z_t: [B, H, W, C]; t, t_mid:
    [B] int in 0..T-1, t_next: [B] int in -1..T-1."""
    z_mid = ddim_step(schedule, z_t=z_t, x0_hat=teacher_x0_fn(z_t, t), t=t, s=t_mid)
    return ddim_step(schedule, z_t=z_mid, x0_hat=teacher_x0_fn(z_mid, t_mid), t=t_mid, s=t_next)


def target_x0(schedule: Schedule, *, z_t: Array, z_next: Array, t: Array, t_next: Array) -> Array:
    """x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t): the
    x0 with which one DDIM step from t lands on z_next at t_next (z_next itself at t_next = -1)."""
    alpha_t, sigma_t = alpha_sigma(schedule, t, z_t.ndim)
    alpha_n, sigma_n = alpha_sigma(schedule, t_next, z_t.ndim)
    ratio = sigma_n / sigma_t
    return (z_next - ratio * z_t) / (alpha_n - ratio * alpha_t)


def truncated_snr_weight(schedule: Schedule, t: Array) -> Array:
    """max(SNR_t, 1) [B], SNR_t = abar_t / (1 - abar_t) (`diffusion.snr`): the x0 error's weight,
    i.e. max(||x0 error||^2, ||eps error||^2)."""
    return jnp.maximum(diffusion.snr(schedule, t=t), 1.0)


def x0_from_output(schedule: Schedule, *, output: Array, z_t: Array, t: Array, mean_type: str,
                   clip: bool = False) -> Array:
    """The clean-image prediction of a network output read as `mean_type` (eps, xstart or v),
    clipped to [-1, 1] with `clip`."""
    if mean_type == "eps":
        x0 = diffusion.predict_x0_from_eps(schedule, x_t=z_t, t=t, eps=output)
    elif mean_type == "v":
        x0 = diffusion.predict_x0_from_v(schedule, x_t=z_t, t=t, v=output)
    elif mean_type == "xstart":
        x0 = output
    else:
        raise ValueError(f"mean_type={mean_type!r}: distillation reads one of {STUDENT_MEAN_TYPES}.")
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def distillation_losses(schedule: Schedule, student_fn: diffusion.DenoiseFn, teacher_x0_fn: X0Fn,
                        *, x0: Array, step_index: Array, noise: Array, teacher_steps: int,
                        mean_type: str = "v") -> dict[str, Array]:
    """Per-example distillation loss terms, each [B].

    x0, noise: [B, H, W, C]; step_index: [B] int in 0..N/2-1 (the student step j - 1, drawn
    uniformly); teacher_steps: N (static). z_t = alpha_t x0 + sigma_t noise at the student's
    t = p_{2j}; the target x~ (`target_x0` of `two_teacher_steps`, no gradient) against the
    student's x0 prediction (its output read as `mean_type`, unclipped).
    Returns dict(loss = max(SNR_t, 1) * x0_mse, x0_mse).
    """
    times = step_times(schedule.num_timesteps, teacher_steps)
    t, t_mid, t_next = (jnp.asarray(a)[step_index] for a in times)
    z_t = diffusion.q_sample(schedule, x0=x0, t=t, noise=noise)
    z_next = two_teacher_steps(schedule, teacher_x0_fn, z_t=z_t, t=t, t_mid=t_mid, t_next=t_next)
    target = jax.lax.stop_gradient(target_x0(schedule, z_t=z_t, z_next=z_next, t=t, t_next=t_next))
    pred = x0_from_output(schedule, output=student_fn(z_t, t)[..., :x0.shape[-1]], z_t=z_t, t=t,
                          mean_type=mean_type)
    x0_mse = diffusion.mean_flat(jnp.square(target - pred))
    return dict(loss=truncated_snr_weight(schedule, t) * x0_mse, x0_mse=x0_mse)
