"""Respacing and sampling plans: the per-step data of a reverse chain, in pure NumPy.

A `SamplingPlan` holds everything that varies along the chain (the respaced schedule, the
original timestep fed to the model, each sampler's per-step coefficients), computed once in
float64 and stored float32. `sampling.py` passes it to the compiled chain as data, so a new
schedule, `eta` or spacing of the same length reuses the executable.

Spacings: "time" keeps the timesteps `space_timesteps` names (uniform in t); "logsnr" keeps S
timesteps uniform in log-SNR between t = T-1 and t = 0 (`logsnr_timesteps`); "edm" keeps the S
timesteps nearest EDM's rho = 7 sigmas (`edm_timesteps`); "trailing" keeps t = round(k T / S) - 1,
k = 1..S (`trailing_timesteps`: ends on T-1; the grid of S/2 steps is every other point of the
grid of S, which progressive distillation needs).

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

SPACINGS = ("time", "logsnr", "edm", "trailing")
MAX_SOLVER_ORDER = 3
MAX_SDE_SOLVER_ORDER = 2  # SDE-DPM-Solver++: 1 (DDIM with eta 1) and 2M
DPM_SOLVERS = ("dpm++", "dpm++sde")  # the samplers that take an order
EDM_SAMPLERS = ("heun", "euler_ancestral")  # steps on EDM's sigma (Karras et al. 2022, Alg. 1-2)
EDM_RHO = 7.0


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


def logsnr_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """num_steps timesteps uniform in log-SNR: lambda_t = log(alpha_t / sigma_t) (half the log-SNR,
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)) on linspace(lambda_{T-1}, lambda_0, S),
    each mapped to the t of the discrete schedule with the nearest lambda; where two land on the
    same t (many steps, near t = 0 where lambda moves fastest), the later one moves up to the next
    free t, keeping S unique timesteps. Both ends (t = 0 and t = T-1) are kept.
    Returns sorted, unique, 0-based int64 [S].
    """
    num_timesteps = schedule.num_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"spacing='logsnr' needs an int number of steps in 1..{num_timesteps}; "
                         f"got {num_steps!r}.")
    lambdas = _half_log_snr(np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64)))
    return _nearest_unique(lambdas, np.linspace(lambdas[0], lambdas[-1], num_steps))


def _nearest_unique(lambdas: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target lambda (t = 0 first, decreasing) the t with the nearest lambda; where two
    land on the same t the later one moves up to the next free t. Sorted, unique int64 [S]."""
    num_timesteps, num_steps = len(lambdas), len(targets)
    kept = np.empty(num_steps, dtype=np.int64)
    for k, target in enumerate(targets):
        nearest = int(np.argmin(np.abs(lambdas - target)))
        low = kept[k - 1] + 1 if k else 0
        kept[k] = min(max(nearest, low), num_timesteps - num_steps + k)
    return kept


def edm_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = EDM_RHO
               ) -> np.ndarray:
    """EDM's (Karras et al. 2022, eq. 5) noise levels, float64, largest first:
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    inv_min, inv_max = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def edm_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """num_steps timesteps at EDM's rho = 7 sigmas. A VP model's EDM sigma is
    sigma_t = sqrt((1 - abar_t) / abar_t) (x_edm = x_vp / sqrt(abar_t)); sigma_max and sigma_min
    are the discrete ends (t = T-1 and t = 0). Each EDM sigma snaps to the t with the nearest
    log sigma (= -lambda), the later of two that collide moving to the next free t, as
    `logsnr_timesteps`: the nearest integer t, not an interpolated one, because the model was
    trained on integer t only and the chain then steps between noise levels it knows exactly
    (the step's sigma is the snapped t's, so sigma, abar and the model's input always agree).
    Returns sorted, unique, 0-based int64 [S], both ends kept."""
    num_timesteps = schedule.num_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"spacing='edm' needs an int number of steps in 1..{num_timesteps}; "
                         f"got {num_steps!r}.")
    lambdas = _half_log_snr(np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64)))
    sigmas = edm_sigmas(np.exp(-lambdas[0]), np.exp(-lambdas[-1]), num_steps)
    return _nearest_unique(lambdas, -np.log(sigmas[::-1]))


def trailing_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """num_steps timesteps t_k = round(k T / S) - 1 for k = 1..S (diffusers' "trailing"
    spacing), exact in integers: the chain starts at t = T-1 and its last step goes from
    t_1 = round(T / S) - 1 to the clean image. Nested under halving: the grid of S/2 steps is
    the grid of S steps at even k, so each step of an S/2-step chain spans two steps of the
    S-step chain (progressive distillation, `ddpm_jax.distill`).
    Returns sorted, unique, 0-based int64 [S].
    """
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"spacing='trailing' needs an int number of steps in 1..{num_timesteps}; "
                         f"got {num_steps!r}.")
    k = np.arange(1, num_steps + 1, dtype=np.int64)
    return (2 * k * num_timesteps + num_steps) // (2 * num_steps) - 1


def _half_log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), float64."""
    return 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))


# ----------------------------------------------------------------------------------- plans

@flax.struct.dataclass
class SamplingPlan:
    """Per-step data of an S-step reverse chain; every array is indexed by the chain index i."""

    schedule: Schedule       # the (respaced) S-step schedule
    timesteps: Array         # [S] int32: original t fed to the model at index i
    ddim_coef_x0: Array      # [S] float32: x_{i-1} mean = coef_x0 * x0_hat + coef_xt * x_t
    ddim_coef_xt: Array      # [S] float32
    ddim_sigma: Array        # [S] float32: DDIM noise scale, eta * sqrt(beta~_i)
    # DPM-Solver++ (None unless make_plan got an order K): x_{i-1} = dpm_coef_xt[i] x_i
    # + sum_k dpm_coef_x0[i, k] x0_hat_{i+k}, k = 0..K-1 (x0_hat of this step and the K-1 before).
    dpm_coef_xt: Array | None = None   # [S] float32
    dpm_coef_x0: Array | None = None   # [S, K] float32
    # SDE-DPM-Solver++ adds dpm_coef_z[i] z_i (z_i the chain's noise at index i); 0 for the ODE.
    dpm_coef_z: Array | None = None    # [S] float32
    # EDM steps (None unless make_plan got edm; `edm_coefficients`): x_{i-1} (Euler-ancestral),
    # or Heun's Euler proposal, = step_coef[i] . (x_i, x0_hat_i, z_i); Heun's result
    # = heun_coef[i] . (x_i, x0_hat_i, x0_hat(proposal, t_{i-1})).
    step_coef: Array | None = None     # [S, 3] float32
    heun_coef: Array | None = None     # [S, 3] float32
    # Langevin corrector (None unless make_plan got corrector_snr): score_sde's alpha_t = 1 -
    # beta_t of the original schedule at t_i, and the signal-to-noise ratio r at each index.
    corrector_alpha: Array | None = None   # [S] float32
    corrector_snr: Array | None = None     # [S] float32

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def plan_for_sampler(schedule: Schedule, sampler: str, *, steps: int | str | None = None,
                     eta: float = 0.0, spacing: str = "time", order: int | None = None,
                     start_t: int | None = None) -> SamplingPlan:
    """`make_plan` with the solver settings a sampler name implies: a DPM-Solver++ order only for
    the samplers in DPM_SOLVERS (`order`, default 2; ignored for the others), the SDE
    variant's noise for "dpm++sde" and the EDM steps of EDM_SAMPLERS. The one place that maps
    sampler options to a plan."""
    solver = sampler in DPM_SOLVERS
    return make_plan(schedule, steps=steps, eta=eta, spacing=spacing,
                     order=(2 if order is None else order) if solver else None,
                     sde=sampler == "dpm++sde", start_t=start_t,
                     edm=sampler if sampler in EDM_SAMPLERS else None)


def make_plan(schedule: Schedule, *, steps: int | str | None = None, eta: float = 0.0,
              spacing: str = "time", order: int | None = None, sde: bool = False,
              start_t: int | None = None, edm: str | None = None,
              corrector_snr: float | None = None) -> SamplingPlan:
    """Respaces `schedule` onto `steps` (None: all T; see `space_timesteps` for int / str; with
    spacing="logsnr" or "trailing" an int S, see `logsnr_timesteps`, `trailing_timesteps`) and precomputes DDIM's per-step
    coefficients for `eta` in [0, 1] and, given `order` K in 1..3, DPM-Solver++'s (see
    `dpm_solver_coefficients`; `sde`: SDE-DPM-Solver++, K in 1..2); float64 math, stored float32.

    DDIM (Song et al. 2021, eq. 12), with abar_i and abar_{i-1} from the respaced schedule:
        sigma_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i)) * sqrt(1 - abar_i / abar_{i-1})
        x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma_i^2) eps_hat + sigma_i z
    with eps_hat recomputed from the (clipped) x0_hat; written as coef_x0 x0_hat + coef_xt x_t.
    eta = 1 gives sigma_i^2 = beta~_i and the posterior mean: DDPM with `fixedsmall`.

    start_t (0-based original t, None: T-1): a chain that starts part-way, at start_t, keeping
    the spaced timesteps below it (SDEdit); the coefficients are those of the shortened chain
    (DPM-Solver++'s warm-up starts at start_t).

    edm ("heun" or "euler_ancestral"): EDM's steps on the chain's sigmas (`edm_coefficients`);
    corrector_snr r > 0: the Langevin corrector's per-step data (score_sde's alpha_t = 1 -
    beta_t of this schedule at each kept t, and r).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's beta~ "
                         f"variance); got {eta!r}.")
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    if order is not None and not 1 <= order <= MAX_SOLVER_ORDER:
        raise ValueError(f"order must be 1, 2 or 3 (DPM-Solver++'s multistep orders); got {order!r}.")
    num_timesteps = schedule.num_timesteps
    if spacing == "logsnr":
        kept = logsnr_timesteps(schedule, num_timesteps if steps is None else steps)
    elif spacing == "edm":
        kept = edm_timesteps(schedule, num_timesteps if steps is None else steps)
    elif spacing == "trailing":
        kept = trailing_timesteps(num_timesteps, num_timesteps if steps is None else steps)
    elif steps is None:
        kept = np.arange(num_timesteps)
    else:
        if isinstance(steps, (int, np.integer)) and not 1 <= steps <= num_timesteps:
            raise ValueError(f"steps must lie in 1..{num_timesteps} (the schedule's T); got {steps!r}.")
        kept = space_timesteps(num_timesteps, steps)
    if start_t is not None:
        if not isinstance(start_t, (int, np.integer)) or not 0 <= start_t < num_timesteps:
            raise ValueError(f"start_t must be an int timestep in 0..{num_timesteps - 1}; got "
                             f"{start_t!r}.")
        kept = np.append(kept[kept < start_t], start_t)
    spaced, timestep_map = respace(schedule, kept)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(spaced.betas, dtype=np.float64))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    sigma = eta * np.sqrt((1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          * (1.0 - alphas_cumprod / alphas_cumprod_prev))
    coef_xt = (np.sqrt(np.maximum(1.0 - alphas_cumprod_prev - sigma**2, 0.0))
               / np.sqrt(1.0 - alphas_cumprod))
    coef_x0 = np.sqrt(alphas_cumprod_prev) - coef_xt * np.sqrt(alphas_cumprod)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    solver = {}
    if order is not None:
        if order > len(kept):
            raise ValueError(f"DPM-Solver++ of order {order} needs at least {order} steps; got "
                             f"{len(kept)}. Use more steps or a lower order.")
        if sde and order > MAX_SDE_SOLVER_ORDER:
            raise ValueError(f"SDE-DPM-Solver++ has orders 1 and 2; got order {order}.")
        dpm_xt, dpm_x0, dpm_z = dpm_solver_coefficients(alphas_cumprod, order, sde=sde)
        solver = dict(dpm_coef_xt=f32(dpm_xt), dpm_coef_x0=f32(dpm_x0), dpm_coef_z=f32(dpm_z))
    if edm is not None:
        if edm not in EDM_SAMPLERS:
            raise ValueError(f"edm={edm!r}: choose one of {EDM_SAMPLERS}.")
        step, heun = edm_coefficients(alphas_cumprod, ancestral=edm == "euler_ancestral")
        solver.update(step_coef=f32(step), heun_coef=f32(heun))
    if corrector_snr is not None:
        if not corrector_snr > 0:
            raise ValueError(f"corrector_snr={corrector_snr!r}: use a signal-to-noise ratio > 0 "
                             "(score_sde: 0.01-0.17).")
        original_betas = np.asarray(schedule.betas, dtype=np.float64)
        solver.update(corrector_alpha=f32(1.0 - original_betas[timestep_map]),
                      corrector_snr=f32(np.full(len(kept), corrector_snr)))
    return SamplingPlan(schedule=spaced, timesteps=jnp.asarray(timestep_map, dtype=jnp.int32),
                        ddim_coef_x0=f32(coef_x0), ddim_coef_xt=f32(coef_xt), ddim_sigma=f32(sigma),
                        **solver)


def dpm_solver_coefficients(alphas_cumprod: np.ndarray, order: int, *, sde: bool = False
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DPM-Solver++ multistep (Lu et al. 2022b, Alg. 2; data prediction) as per-step linear
    weights, float64: returns (coef_xt [S], coef_x0 [S, order], coef_z [S]) with
        x_{i-1} = coef_xt[i] x_i + sum_k coef_x0[i, k] x0_hat_{i+k} + coef_z[i] z_i.
    alphas_cumprod: [S] of the chain's schedule, index i = time t_i (t_{S-1} first).

    sde=False (coef_z = 0): the probability-flow ODE solver. sde=True: SDE-DPM-Solver++ (the
    same paper, Sec. 5 / App.; diffusers' "sde-dpmsolver++"), orders 1-2, which solves the
    reverse SDE: with phi2 = 1 - e^{-2h},
        x_{i-1} = (sigma_{i-1} / sigma_i) e^{-h} x_i + alpha_{i-1} phi2 (D0 + D1 / 2)
                  + sigma_{i-1} sqrt(phi2) z,
    D0 = x0_hat_i, D1 = (x0_hat_i - x0_hat_{i+1}) / r (order 2; 0 at order 1); order 1 is DDIM
    with eta = 1 on the same grid.

    The step at index i goes from lambda_i to lambda_{i-1} (lambda = log(alpha / sigma)); the
    last one (i = 0) goes to alpha = 1, sigma = 0 (lambda = +inf, diffusers'
    final_sigmas_type="zero"), where the first-order update returns x0_hat_0 exactly, so the
    chain ends on the x0 prediction at t_0 like the other samplers. Effective order per step,
    as diffusers' DPMSolverMultistepScheduler: min(order, steps taken + 1) (warm-up), 1 on the
    last step, and at most 2 on the second-to-last when S < 15 (lower_order_final).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    num_steps = abar.shape[0]
    alpha, sigma, lam = np.sqrt(abar), np.sqrt(1.0 - abar), _half_log_snr(abar)
    coef_xt, coef_z = np.zeros(num_steps), np.zeros(num_steps)
    coef_x0 = np.zeros((num_steps, order))
    for i in range(num_steps):
        taken = num_steps - 1 - i
        k = min(order, taken + 1)
        if i == 0:
            coef_xt[i], coef_x0[i, 0] = 0.0, 1.0  # sigma_{-1} = 0: x0_hat_0
            continue
        if i == 1 and num_steps < 15:
            k = min(k, 2)
        # phi = 1 - e^{-h} (written as -expm1(-h) for small h); r_j = h_j / h
        h = lam[i - 1] - lam[i]
        a = alpha[i - 1]
        if sde:
            phi2 = -np.expm1(-2.0 * h)
            coef_xt[i] = sigma[i - 1] / sigma[i] * np.exp(-h)
            coef_z[i] = sigma[i - 1] * np.sqrt(phi2)
            if k == 1:
                coef_x0[i, 0] = a * phi2
            else:
                r = (lam[i] - lam[i + 1]) / h
                coef_x0[i, :2] = a * phi2 * np.array([1.0 + 0.5 / r, -0.5 / r])
            continue
        phi = -np.expm1(-h)
        coef_xt[i] = sigma[i - 1] / sigma[i]
        if k == 1:
            coef_x0[i, 0] = a * phi
        elif k == 2:
            r = (lam[i] - lam[i + 1]) / h
            coef_x0[i, :2] = a * phi * np.array([1.0 + 0.5 / r, -0.5 / r])
        else:
            # 3M: D1 and D2 are the first and second divided differences (diffusers' form)
            r0, r1 = (lam[i] - lam[i + 1]) / h, (lam[i + 1] - lam[i + 2]) / h
            m0, m1, m2 = np.eye(3)
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            coef_x0[i, :3] = a * (phi * m0 + (1.0 - phi / h) * d1 - ((h - phi) / h**2 - 0.5) * d2)
    return coef_xt, coef_x0, coef_z


def edm_coefficients(alphas_cumprod: np.ndarray, *, ancestral: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """EDM's steps (Karras et al. 2022) for a VP chain, float64: (step_coef [S, 3], heun_coef
    [S, 3]). In EDM's variables x~ = x / alpha_i, sigma_i = sqrt((1 - abar_i) / abar_i) and
    d_i = (x~ - x0_hat_i) / sigma_i; the step at index i goes to sigma' = sigma_{i-1} (0 after
    i = 0, alpha' = 1), written back in VP form x = alpha x~ as weights on (x_i, x0_hat_i, z_i):

    Euler (Alg. 1, line 5; the Heun proposal; = DDIM with eta 0):
        x~' = x~ + (sigma' - sigma) d = x0_hat + (sigma' / sigma)(x~ - x0_hat)
    Heun (Alg. 1, lines 6-8; skipped at sigma' = 0): with x0_hat' = x0_hat(x_prop, t_{i-1}),
        x~' = x~ + (sigma' - sigma)(d + d') / 2 = Euler + (sigma - sigma') / (2 sigma')
              (x0_hat' - x0_hat)
    Euler-ancestral (k-diffusion's sample_euler_ancestral, eta 1): sigma_up = min(sigma',
    sigma' sqrt(1 - sigma'^2 / sigma^2)), sigma_down = sqrt(sigma'^2 - sigma_up^2),
        x~' = x0_hat + (sigma_down / sigma)(x~ - x0_hat) + sigma_up z
    (this equals DDIM with eta 1 on the same timesteps: both have noise variance
    (1 - abar') (1 - abar / abar') / (1 - abar) and the same mean.)
    step_coef holds Euler-ancestral's weights with ancestral=True, the Euler proposal's
    (z weight 0) otherwise; heun_coef weighs (x_i, x0_hat_i, x0_hat') and is (0, 1, 0) at i = 0.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    alpha, sigma = np.sqrt(abar), np.sqrt((1.0 - abar) / abar)
    alpha_next = np.append(1.0, alpha[:-1])       # alpha' = alpha_{i-1}, 1 at i = 0
    sigma_next = np.append(0.0, sigma[:-1])       # sigma' = sigma_{i-1}, 0 at i = 0
    if ancestral:
        up = np.minimum(sigma_next, sigma_next * np.sqrt(np.maximum(
                1.0 - sigma_next**2 / sigma**2, 0.0)))
        down = np.sqrt(np.maximum(sigma_next**2 - up**2, 0.0))
    else:
        up, down = np.zeros_like(sigma), sigma_next
    step = np.stack([alpha_next * down / (sigma * alpha), alpha_next * (1.0 - down / sigma),
                     alpha_next * up], axis=1)
    euler = np.stack([alpha_next * sigma_next / (sigma * alpha),
                      alpha_next * (1.0 - sigma_next / sigma)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        correction = np.where(sigma_next > 0, alpha_next * (sigma - sigma_next)
                              / (2.0 * sigma_next), 0.0)
    heun = np.stack([euler[:, 0], euler[:, 1] - correction, correction], axis=1)
    return step, heun


def progressive_indices(num_steps: int, return_every: int) -> np.ndarray:
    """Chain indices recorded by progressive output, in chain order: ..., 2k, k, 0.

    As the official `p_sample_loop_progressive`: slot s holds index s * k, so the last record
    (index 0) is the final x0 prediction. Returns [K] int, K = ceil(S / k).
    """
    num_records = -(-num_steps // return_every)
    return np.arange(num_records - 1, -1, -1) * return_every
