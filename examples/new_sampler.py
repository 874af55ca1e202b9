# %% [markdown]
# # A new sampler as a plan
#
# The reverse chain (`ddpm_jax/reverse.py`) is one `lax.scan`, and two things decide what a
# step does:
#
# - the **plan** (`plans.SamplingPlan`): arrays indexed by the chain index `i`, passed to the
#   compiled chain as data. They are the respaced schedule, the original timestep the model
#   sees, DDIM's coefficients and noise scale, and DPM-Solver++'s weights when the sampler
#   uses them;
# - the **step rule** (`reverse.STEP_RULES`): how one step turns the model's prediction and the
#   plan's row `i` into `x_{i-1}`. The spec's `sampler` name picks the rule when the chain is
#   compiled.
#
# A sampler that only needs new numbers for an existing rule is just a new plan: no library
# change, and no new compile when the number of steps stays the same. This page builds one
# from DDIM's update: quadratic timestep spacing (the DDIM paper uses it for CIFAR-10; here it
# reaches t = T - 1) with a per-step `eta`. It runs the plan through the compiled chain and checks the result against
# a closed form.
#
# Run it with `python examples/new_sampler.py` (`DDPM_EXAMPLE_TINY=1`: fewer samples).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import plans
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

TINY = os.environ.get("DDPM_EXAMPLE_TINY") == "1"
BATCH = 1024 if TINY else 4096
SHAPE = (BATCH, 8, 8, 1)   # B "images" of 64 values each: B * 64 independent draws
STEPS = 10

schedule = Schedule.create("linear", 1000)

# %% [markdown]
# ## What a plan holds
#
# `SamplerSpec.plan` (a thin call of `plans.make_plan`) gives the plan of a spec. Below is
# DDIM on 10 steps. Row `i` is read at chain index `i`, and the chain runs from `i = S - 1`
# down to 0. `timesteps[i]` is the original `t` the model is called with. The DDIM update is
# `x_{i-1} = coef_x0[i] * x0_hat + coef_xt[i] * x_t + sigma[i] * z`.

# %%
builtin = SamplerSpec(sampler="ddim", steps=STEPS, clip_denoised=False)
plan = builtin.plan(schedule)
print(" i     t   alphabar    coef_x0    coef_xt      sigma")
for i in range(plan.num_steps):
    print(f"{i:2d} {int(plan.timesteps[i]):5d} {float(plan.schedule.alphas_cumprod[i]):10.5f} "
          f"{float(plan.ddim_coef_x0[i]):10.5f} {float(plan.ddim_coef_xt[i]):10.5f} "
          f"{float(plan.ddim_sigma[i]):10.5f}")

# %% [markdown]
# ## A model whose answer is known
#
# For data `x_0 ~ N(mu, s^2 I)`, the noised `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` is
# Gaussian too, and the best noise predictor (the minimiser of `L_simple`) is the regression
# of `eps` on `x_t`:
#
#     eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)
#
# It goes into the chain in the `(params, x_t, t)` form of any model. Its "params" are the
# arrays it reads, indexed by the original `t`. The Python list `traces` grows each time JAX
# traces the function, which happens once per compile.

# %%
MU, STD = 0.3, 0.2
traces: list[int] = []


def gaussian_eps(params: dict, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """eps*(x_t, t) of data N(mu, std^2 I); x_t [B, H, W, C], t [B] original timesteps."""
    traces.append(1)
    abar = params["alphas_cumprod"][t][:, None, None, None]
    return (jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * params["mu"])
            / (abar * params["std"] ** 2 + 1.0 - abar))


params = dict(alphas_cumprod=schedule.alphas_cumprod, mu=jnp.float32(MU), std=jnp.float32(STD))

# %% [markdown]
# ## The new plan
#
# `plans.respace` restricts the schedule to the kept timesteps and returns the map back to the
# original `t`. The coefficients are DDIM's (Song et al. 2021, eq. 12), computed in float64 as
# `make_plan` does. The difference is that `eta` is an array with one value per step, where
# `make_plan` takes a single number. Fields the DDIM rule does not read (DPM-Solver++'s) stay
# `None`.

# %%
def ddim_plan(schedule: Schedule, timesteps: np.ndarray, etas: np.ndarray) -> plans.SamplingPlan:
    """DDIM's plan on the kept `timesteps` (0-based, increasing) with `etas[i]` at index i."""
    spaced, timestep_map = plans.respace(schedule, timesteps)
    abar = np.cumprod(1.0 - np.asarray(spaced.betas, np.float64))
    abar_prev = np.append(1.0, abar[:-1])
    sigma = etas * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    coef_xt = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0) / (1.0 - abar))
    coef_x0 = np.sqrt(abar_prev) - coef_xt * np.sqrt(abar)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return plans.SamplingPlan(schedule=spaced, timesteps=jnp.asarray(timestep_map, jnp.int32),
                              ddim_coef_x0=f32(coef_x0), ddim_coef_xt=f32(coef_xt),
                              ddim_sigma=f32(sigma))


T = schedule.num_timesteps
quadratic = np.unique(np.round(np.linspace(0.0, np.sqrt(T - 1), STEPS) ** 2).astype(np.int64))
ramp = np.linspace(0.0, 1.0, STEPS)   # eta 0 at t = 0 (last step), 1 at t = T-1 (first step)
custom = {"quadratic, eta 0": ddim_plan(schedule, quadratic, np.zeros(STEPS)),
          "quadratic, eta 0 -> 1": ddim_plan(schedule, quadratic, ramp)}
print("quadratic timesteps:", quadratic.tolist())

# %% [markdown]
# ## One compiled chain for every plan
#
# `make_sampler` compiles the built-in DDIM chain for this shape. A `Sampler` is its model
# call, plan, spec and compile options (`static`); `sampler.with_plan(plan)` is the same
# sampler on another plan of the same fields and length, and reuses that program (a plan of
# another structure is refused). The built-in log-SNR spacing (a spec option) runs the same
# way.

# %%
sampler = make_sampler(gaussian_eps, schedule, SHAPE, builtin)
samplers = {"uniform (built-in), eta 0": sampler,
            "log-SNR (built-in), eta 0": make_sampler(
                    gaussian_eps, schedule, SHAPE,
                    builtin.with_overrides(spacing="logsnr"))}
for name, custom_plan in custom.items():
    samplers[name] = sampler.with_plan(custom_plan)
outputs = {name: np.asarray(s(params, jax.random.key(0))["images"], np.float64)
           for name, s in samplers.items()}
print(f"{len(samplers)} plans ran; the model was traced {len(traces)} time(s)")

# %% [markdown]
# ## The closed form of the chain's output
#
# With `eps*` as the model, every step is an affine map of `x_t` plus independent Gaussian
# noise, so the output is exactly Gaussian. Its mean `m` and variance `v` follow from the
# start `N(0, 1)` in float64. Each step computes `x0_hat` and `eps_hat` from `eps*`, then
# `x_{i-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`. This
# recursion is written from the DDIM equation and uses only each plan's kept `alphabar` and
# `sigma`, not its `coef_*` arrays. The chain's samples must match `(m, sqrt(v))` up to
# sampling error. How far `(m, sqrt(v))` is from `(mu, s)` is the error that comes from using
# only 10 steps.

# %%
def predicted_moments(plan: plans.SamplingPlan) -> tuple[float, float]:
    """(mean, std) of the plan's DDIM chain with the exact eps*, from x ~ N(0, 1)."""
    abar = np.asarray(plan.schedule.alphas_cumprod, np.float64)
    abar_prev = np.append(1.0, abar[:-1])
    sigma = np.asarray(plan.ddim_sigma, np.float64)
    mean, var = 0.0, 1.0
    for i in reversed(range(plan.num_steps)):
        # eps* = g (x - sqrt(abar) mu); x0_hat and eps_hat are affine in x: c_x x + c_1
        g = np.sqrt(1.0 - abar[i]) / (abar[i] * STD**2 + 1.0 - abar[i])
        eps_x, eps_1 = g, -g * np.sqrt(abar[i]) * MU
        x0_x = (1.0 - np.sqrt(1.0 - abar[i]) * eps_x) / np.sqrt(abar[i])
        x0_1 = -np.sqrt(1.0 - abar[i]) * eps_1 / np.sqrt(abar[i])
        direction = np.sqrt(max(1.0 - abar_prev[i] - sigma[i] ** 2, 0.0))
        a = np.sqrt(abar_prev[i]) * x0_x + direction * eps_x
        b = np.sqrt(abar_prev[i]) * x0_1 + direction * eps_1
        noise = sigma[i] ** 2 if i > 0 else 0.0   # the chain adds no noise on its last step
        mean, var = a * mean + b, a * a * var + noise
    return mean, float(np.sqrt(var))


# %% [markdown]
# The check compares each sampler's sample mean and standard deviation with the prediction.
# With `n` draws the standard errors are `std / sqrt(n)` and `std / sqrt(2 n)`, and a gap over
# five of them fails the script. The custom quadratic spacing must also come closer to the
# data's `s` than the built-in uniform one does.

# %%
n = outputs[next(iter(outputs))].size
rows, failures = {}, []
print(f"data: mean {MU}, std {STD}; {n} draws per sampler")
print(f"{'sampler':28s} {'mean':>7s} {'pred.':>7s} {'std':>7s} {'pred.':>7s} {'std / s':>8s}")
for name, images in outputs.items():
    pred_mean, pred_std = predicted_moments(samplers[name].plan)
    mean, std = float(images.mean()), float(images.std())
    rows[name] = std
    print(f"{name:28s} {mean:7.4f} {pred_mean:7.4f} {std:7.4f} {pred_std:7.4f} {std / STD:8.3f}")
    if abs(mean - pred_mean) > 5 * pred_std / np.sqrt(n) or \
            abs(std - pred_std) > 5 * pred_std / np.sqrt(2 * n):
        failures.append(f"{name} does not match its closed form")
if len(traces) != 1:
    failures.append(f"the model was traced {len(traces)} times for one chain length")
if abs(rows["quadratic, eta 0"] - STD) >= abs(rows["uniform (built-in), eta 0"] - STD):
    failures.append("quadratic spacing is not closer to the data's std than uniform spacing")
if failures:
    raise SystemExit("check failed: " + "; ".join(failures))
print("check passed: every plan's samples match the closed form of its chain")

# %% [markdown]
# With 10 steps, every sampler here shrinks the spread of the data. Uniform spacing keeps
# about half of `s`. Quadratic spacing puts more steps at small `t`, where `x0_hat` changes
# fastest on this data (near signal-to-noise `abar / (1 - abar) = 1 / s^2`), and keeps about
# 80% of it. On this data, noise (`eta > 0`) on the early steps
# lowers the predicted spread a little more. The chain reproduces each plan's closed form, so
# such comparisons measure the plan rather than the implementation.
#
# ## When a plan is not enough
#
# A sampler whose update is not one of the existing rules (ancestral, DDIM, DPM-Solver++ and
# its SDE form) needs library changes. Its name goes into `spec.SAMPLERS` (the spec refuses
# other names), its `StepRule` into `reverse.STEP_RULES` (an assertion at import keeps the two
# in step), and any new per-step arrays into `SamplingPlan` and the chain's `per_step` dict.
# There is no supported way to add a rule from outside the package.
