"""Respacing and sampling plans: the per-step data of a reverse chain, in pure NumPy.

A `SamplingPlan` holds everything that varies along the chain (the respaced schedule, the
original timestep fed to the model, each sampler's per-step coefficients), computed once in
float64 and stored float32. `sampling.py` passes it to the compiled chain as data, so a new
schedule, `eta` or spacing of the same length reuses the executable.

Indexing: `i` is the 0-based index into the (respaced) chain's schedule, run from S-1 down to
0; `plan.timesteps[i]` is the original 0-based t the model is called with.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedule import Schedule

Array = jax.Array


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> np.ndarray:
    """The timesteps kept when respacing a T-step process (improved-diffusion's semantics).

    section_counts:
      * an int S, or [S]: S steps evenly spread over 0..T-1, round(linspace(0, T-1, S)); both
        t = 0 and t = T-1 are kept.
      * [S1, S2, ...] or "S1,S2,...": T is cut into equal sections, each spaced like the above.
      * "ddimS": the DDIM paper's uniform stride, range(0, T, c) with the integer c that gives
        exactly S steps (t = 0 kept, t = T-1 in general not).
    Returns the kept timesteps: sorted, unique, 0-based int64 NumPy array.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"Bad steps {section_counts!r}: write 'ddimS' with an integer S, "
                                 "e.g. 'ddim50'.") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return np.arange(0, num_timesteps, stride, dtype=np.int64)
            raise ValueError(f"No integer stride gives exactly {desired} of {num_timesteps} steps "
                             f"for {section_counts!r}; pick another S or pass an int (linspace).")
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"Bad steps {section_counts!r}: pass an int, 'ddimS' or a comma "
                             "separated list of section counts such as '10,5'.") from None
    if isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for k, count in enumerate(section_counts):
        size = size_per + (1 if k < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"Cannot take {count} steps from a section of {size} of the "
                             f"{num_timesteps} timesteps; each count must lie in 1..{size}.")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return np.unique(np.asarray(kept, dtype=np.int64))


def respace(schedule: Schedule, timesteps: Sequence[int] | np.ndarray) -> tuple[Schedule, np.ndarray]:
    """Restricts a T-step schedule to the kept `timesteps` (0-based, any order, unique).

    alphabar is kept at the chosen steps and the betas recomputed, in float64, as
    beta_i = 1 - alphabar[kept_i] / alphabar[kept_{i-1}] with alphabar[kept_{-1}] := 1.
    Returns (the S-step Schedule, timestep_map [S] int32: the original t of respaced index i,
    which is what the model is called with). Needs a concrete schedule (call outside jit).
    """
    kept = np.unique(np.asarray(timesteps, dtype=np.int64))
    num_timesteps = schedule.num_timesteps
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= num_timesteps:
        raise ValueError(f"Kept timesteps must be a non-empty subset of 0..{num_timesteps - 1}; "
                         f"got {np.asarray(timesteps).tolist()!r}.")
    if kept.size == num_timesteps:
        return schedule, kept.astype(np.int32)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))[kept]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return Schedule.from_betas(betas), kept.astype(np.int32)


# ----------------------------------------------------------------------------------- plans

@flax.struct.dataclass
class SamplingPlan:
    """Per-step data of an S-step reverse chain; every array is indexed by the chain index i."""

    schedule: Schedule       # the (respaced) S-step schedule
    timesteps: Array         # [S] int32: original t fed to the model at index i
    ddim_coef_x0: Array      # [S] float32: x_{i-1} mean = coef_x0 * x0_hat + coef_xt * x_t
    ddim_coef_xt: Array      # [S] float32
    ddim_sigma: Array        # [S] float32: DDIM noise scale, eta * sqrt(beta~_i)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def make_plan(schedule: Schedule, *, steps: int | str | None = None, eta: float = 0.0) -> SamplingPlan:
    """Respaces `schedule` onto `steps` (None: all T; see `space_timesteps` for int / str) and
    precomputes DDIM's per-step coefficients for `eta` in [0, 1] (float64, stored float32).

    DDIM (Song et al. 2021, eq. 12), with abar_i and abar_{i-1} from the respaced schedule:
        sigma_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i)) * sqrt(1 - abar_i / abar_{i-1})
        x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma_i^2) eps_hat + sigma_i z
    with eps_hat recomputed from the (clipped) x0_hat; written as coef_x0 x0_hat + coef_xt x_t.
    eta = 1 gives sigma_i^2 = beta~_i and the posterior mean: DDPM with `fixedsmall`.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's beta~ "
                         f"variance); got {eta!r}.")
    num_timesteps = schedule.num_timesteps
    if steps is None:
        kept = np.arange(num_timesteps)
    else:
        if isinstance(steps, (int, np.integer)) and not 1 <= steps <= num_timesteps:
            raise ValueError(f"steps must lie in 1..{num_timesteps} (the schedule's T); got {steps!r}.")
        kept = space_timesteps(num_timesteps, steps)
    spaced, timestep_map = respace(schedule, kept)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(spaced.betas, dtype=np.float64))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    sigma = eta * np.sqrt((1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          * (1.0 - alphas_cumprod / alphas_cumprod_prev))
    coef_xt = (np.sqrt(np.maximum(1.0 - alphas_cumprod_prev - sigma**2, 0.0))
               / np.sqrt(1.0 - alphas_cumprod))
    coef_x0 = np.sqrt(alphas_cumprod_prev) - coef_xt * np.sqrt(alphas_cumprod)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return SamplingPlan(schedule=spaced, timesteps=jnp.asarray(timestep_map, dtype=jnp.int32),
                        ddim_coef_x0=f32(coef_x0), ddim_coef_xt=f32(coef_xt), ddim_sigma=f32(sigma))


def progressive_indices(num_steps: int, return_every: int) -> np.ndarray:
    """Chain indices recorded by progressive output, in chain order: ..., 2k, k, 0.

    As the official `p_sample_loop_progressive`: slot s holds index s * k, so the last record
    (index 0) is the final x0 prediction. Returns [K] int, K = ceil(S / k).
    """
    num_records = -(-num_steps // return_every)
    return np.arange(num_records - 1, -1, -1) * return_every
