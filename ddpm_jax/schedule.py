"""Beta schedules and the `Schedule` pytree of every array derived from them.

Indexing follows the official DDPM code: arrays are indexed by a 0-based `t` in {0..T-1},
and array index `i` is the paper's step `i + 1`. All derived quantities are computed in
float64 NumPy and stored as float32 `jax.Array`s, exactly as the official implementation
casts them when it gathers them.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int, frac: float) -> np.ndarray:
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    warmup_time = int(num_timesteps * frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alphabar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)."""

    def alphabar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = 1.0 - alphabar((steps + 1) / num_timesteps) / alphabar(steps / num_timesteps)
    return np.minimum(betas, max_beta)


def get_beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                                            beta_end: float = 0.02) -> np.ndarray:
    """Returns the betas of a named schedule: float64 NumPy array of shape [num_timesteps].

    `linear` (the paper's: 1e-4 .. 0.02), `quad`, `const`, `jsd` (1/T, 1/(T-1), ..., 1),
    `warmup10` / `warmup50` (linear over the first 10% / 50%, then beta_end) and `cosine`
    (improved DDPM; ignores beta_start / beta_end).
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(num_timesteps, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
    elif name == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
    elif name == "cosine":
        betas = _cosine_betas(num_timesteps)
    else:
        raise ValueError(f"Unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    _check_betas(betas)
    return betas


def _check_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    # Like the official code we accept beta = 1 (the last step of `jsd`), never beta <= 0.
    bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
                f"betas must lie in (0, 1]; betas[{i}] = {betas[i]!r} does not. "
                "Check beta_start / beta_end.")


@flax.struct.dataclass
class Schedule:
    """Every per-step array of a diffusion, each float32 of shape [T], indexed by 0-based t.

    Built by `Schedule.from_betas` (float64 math, float32 storage). A pytree: it can be passed
    through `jit`, `vmap` and `scan` as data, so a new schedule is not a retrace.
    """

    betas: Array
    alphas_cumprod: Array            # alphabar_t
    alphas_cumprod_prev: Array       # alphabar_{t-1}, with alphabar_{-1} = 1
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    log_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array     # 1 / sqrt(alphabar_t)
    sqrt_recipm1_alphas_cumprod: Array   # sqrt(1 / alphabar_t - 1)
    posterior_variance: Array            # beta~_t (0 at t = 0)
    # log beta~_t with index 0 replaced by index 1 (beta~_0 = 0), as the official code stores it.
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array          # multiplies x_0 in mu~
    posterior_mean_coef2: Array          # multiplies x_t in mu~
    # `fixedlarge` variance: beta_t, except index 0 which uses beta~_1 (official convention).
    fixedlarge_variance: Array
    fixedlarge_log_variance: Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "Schedule":
        """betas: [T] in (0, 1], any float dtype; derived arrays computed in float64."""
        betas = np.asarray(betas, dtype=np.float64)
        _check_betas(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        with np.errstate(divide="ignore"):
            posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
            # With T = 1 there is no beta~_1 to borrow; beta_0 is the only sensible variance.
            second = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
            posterior_log_variance_clipped = np.log(np.append(second, posterior_variance[1:]))
            fixedlarge_variance = np.append(second, betas[1:])
            arrays = dict(
                    betas=betas,
                    alphas_cumprod=alphas_cumprod,
                    alphas_cumprod_prev=alphas_cumprod_prev,
                    sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                    sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                    log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
                    sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
                    sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
                    posterior_variance=posterior_variance,
                    posterior_log_variance_clipped=posterior_log_variance_clipped,
                    posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                    posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
                    fixedlarge_variance=fixedlarge_variance,
                    fixedlarge_log_variance=np.log(fixedlarge_variance),
            )
        return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})

    @classmethod
    def create(cls, name: str = "linear", num_timesteps: int = 1000, *, beta_start: float = 1e-4,
             beta_end: float = 0.02) -> "Schedule":
        """`Schedule.from_betas(get_beta_schedule(...))`."""
        return cls.from_betas(get_beta_schedule(name, num_timesteps, beta_start=beta_start,
                                                beta_end=beta_end))
