"""`SamplerSpec`: what a reverse chain runs, as one frozen, self-checking value.

A spec names the sampler and its settings (steps, spacing, eta, order, threshold) and how the
model's output is read (mean_type, var_type, clip_denoised). Configs (`from_config`), command
lines (`with_overrides` of the flags) and evaluation build one; `sampling.make_sampler` takes
one; `plan` turns it into the per-step data of the chain. Every check of these options lives
here, once, with one error text per mistake.

    SamplerSpec(sampler="dpm++sde", steps=20, spacing="logsnr")     order 2 by default
    SamplerSpec(sampler="ddim", steps=50, eta=0.0)
    SamplerSpec(sampler="ddpm", var_type="fixedsmall")              all T ancestral steps
    SamplerSpec(sampler="heun", steps=18)                           EDM's sigmas, 35 calls
    SamplerSpec(sampler="ddpm", steps=100, corrector_snr=0.16)      predictor-corrector
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ddpm_jax.diffusion import MEAN_TYPES, VAR_TYPES
from ddpm_jax.plans import (DPM_SOLVERS, EDM_SAMPLERS, MAX_SDE_SOLVER_ORDER, MAX_SOLVER_ORDER,
                            SPACINGS, SamplingPlan, make_plan)
from ddpm_jax.schedule import Schedule

SAMPLERS = ("ddpm", "ddim") + DPM_SOLVERS + EDM_SAMPLERS
DEFAULT_ORDER = 2  # DPM-Solver++(2M), the order diffusers and the paper recommend
MAX_CORRECTOR_SNR = 1.0  # score_sde uses 0.01-0.17; r = 1 already moves x by its own norm


def default_spacing(sampler: str) -> str:
    """EDM's sigmas for Heun and Euler-ancestral (what they were designed on), else time."""
    return "edm" if sampler in EDM_SAMPLERS else "time"


def check_choice(name: str, value: Any, choices: Sequence[Any], *, verb: str = "choose") -> Any:
    """`value` when it is one of `choices`; else ValueError '<name>=<value>: <verb> one of (...)'.
    The one choice check of configs (verb 'use'), option objects and command lines."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: {verb} one of {tuple(choices)}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The options of one reverse chain; normalised and checked on construction.

    sampler: "ddpm" (ancestral), "ddim", "dpm++" (DPM-Solver++ multistep, deterministic),
      "dpm++sde" (its SDE variant), "heun" (EDM's second-order ODE step, 2S - 1 model calls) or
      "euler_ancestral" (k-diffusion's; equal to DDIM with eta 1 on the same timesteps). steps:
      None (all T), an int S, "ddimS" or "S1,S2,..." (`plans.space_timesteps`; a string of
      digits becomes the int). spacing: "time", "logsnr" (S steps uniform in log-SNR), "edm"
      (the timesteps nearest EDM's rho = 7 sigmas) or "trailing" (t = round(k T / S) - 1,
      k = 1..S), the last three with an int S; None: "edm" for
      heun and euler_ancestral, else "time". eta: DDIM's, in [0, 1], non-zero only
      with sampler "ddim". order: DPM-Solver++'s, 1-3 (dpm++) or 1-2 (dpm++sde), default 2;
      None for the other samplers. threshold: dynamic-thresholding percentile in (0, 1) of each
      x0 prediction instead of the [-1, 1] clip, or None. mean_type / var_type: how the model's
      output is read (var_type is also the ancestral sampler's variance). clip_denoised: clip
      each x0 prediction to [-1, 1]. corrector_snr: r of a Langevin corrector (Song et al. 2021,
      Alg. 5) run corrector_steps times (default 1) after every predictor step but the last, with
      any sampler (`reverse.langevin_step`); None: no corrector.
    """

    sampler: str = "ddpm"
    steps: int | str | None = None
    spacing: str | None = None
    eta: float = 0.0
    order: int | None = None
    threshold: float | None = None
    mean_type: str = "eps"
    var_type: str = "fixedlarge"
    clip_denoised: bool = True
    corrector_snr: float | None = None
    corrector_steps: int | None = None

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        spacing = default_spacing(self.sampler) if self.spacing is None else self.spacing
        check_choice("spacing", spacing, SPACINGS)
        object.__setattr__(self, "spacing", spacing)
        check_choice("mean_type", self.mean_type, MEAN_TYPES)
        check_choice("var_type", self.var_type, VAR_TYPES)
        steps = self.steps
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps)
        if steps is not None and not (_is_int(steps) and steps >= 1) and not isinstance(steps, str):
            raise ValueError(f"steps={steps!r}: use None (all T), an int >= 1, 'ddimS' or "
                             "'S1,S2,...'.")
        if self.spacing in ("logsnr", "edm", "trailing") and not _is_int(steps):
            raise ValueError(f"spacing={self.spacing!r} places an int number of steps S; got "
                             f"steps={steps!r}.")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) \
                or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta!r}: use a value in [0, 1] (0: deterministic DDIM, "
                             "1: DDPM's beta~ variance).")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta={self.eta!r} only applies to sampler 'ddim' (got "
                             f"{self.sampler!r}); for DDPM's beta~ variance use "
                             "var_type='fixedsmall'.")
        order = self.order
        if self.sampler in DPM_SOLVERS:
            order = DEFAULT_ORDER if order is None else order
            top = MAX_SDE_SOLVER_ORDER if self.sampler == "dpm++sde" else MAX_SOLVER_ORDER
            if not _is_int(order) or not 1 <= order <= top:
                raise ValueError(f"order={order!r}: {self.sampler} has orders 1..{top}.")
        elif order is not None:
            raise ValueError(f"order={order!r} only applies to sampler 'dpm++' or 'dpm++sde' "
                             f"(got {self.sampler!r}).")
        if self.threshold is not None and not (
                isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise ValueError(f"threshold={self.threshold!r}: use a percentile in (0, 1) such as "
                             "0.995, or None for the [-1, 1] clip.")
        if not isinstance(self.clip_denoised, bool):
            raise ValueError(f"clip_denoised={self.clip_denoised!r}: use True or False.")
        snr, corrector_steps = self.corrector_snr, self.corrector_steps
        if snr is not None:
            if not isinstance(snr, (int, float)) or isinstance(snr, bool) or not math.isfinite(
                    snr) or not 0.0 < snr <= MAX_CORRECTOR_SNR:
                raise ValueError(f"corrector_snr={snr!r}: use a signal-to-noise ratio in (0, "
                                 f"{MAX_CORRECTOR_SNR:g}] (score_sde: 0.16 on CIFAR-10), or None "
                                 "for no corrector.")
            snr, corrector_steps = float(snr), 1 if corrector_steps is None else corrector_steps
            if not _is_int(corrector_steps) or corrector_steps < 1:
                raise ValueError(f"corrector_steps={corrector_steps!r}: use an int >= 1 "
                                 "(Langevin steps after each predictor step).")
        elif corrector_steps is not None:
            raise ValueError(f"corrector_steps={corrector_steps!r} needs corrector_snr (the "
                             "corrector's signal-to-noise ratio r, e.g. 0.16).")
        object.__setattr__(self, "corrector_snr", snr)
        object.__setattr__(self, "corrector_steps", corrector_steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "eta", float(self.eta))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    # ------------------------------------------------------------------------- building

    def with_overrides(self, **overrides: Any) -> SamplerSpec:
        """This spec with `overrides` (None: keep this spec's value), e.g. command-line flags.

        The settings that belong to this spec's sampler go when an override names another
        sampler: its spacing (-> the new sampler's default, `default_spacing`, unless overridden
        too), eta (-> 0) and order (-> the new sampler's default); a corrector stays. An
        override the new sampler cannot use is refused.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"SamplerSpec has no options {unknown}.")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes.get("sampler", self.sampler) != self.sampler:
            changes = dict(spacing=None, eta=0.0, order=None) | changes
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SamplerSpec:
        """config.sampling's chain (config.diffusion's mean_type, and var_type unless
        config.sampling.var_type names one) with `overrides` (None: keep). The config's spacing
        belongs to its sampler (an override naming another sampler gets that sampler's default
        unless it names a spacing too); its eta goes to DDIM and its order to DPM-Solver++,
        whichever is run. The corrector is not a config field: overrides (flags) only."""
        s, d = config.sampling, config.diffusion
        sampler = overrides.get("sampler") or s.sampler
        spec = cls(sampler=sampler, steps=s.steps,
                   spacing=s.spacing if sampler == s.sampler else None,
                   eta=s.eta if sampler == "ddim" else 0.0,
                   order=s.order if sampler in DPM_SOLVERS else None,
                   threshold=s.threshold, mean_type=d.mean_type,
                   var_type=s.var_type or d.var_type, clip_denoised=s.clip_denoised)
        return spec.with_overrides(**{k: v for k, v in overrides.items() if k != "sampler"})

    # ---------------------------------------------------------------------------- using

    def plan(self, schedule: Schedule, start_t: int | None = None) -> SamplingPlan:
        """The chain's per-step data on `schedule` (NumPy: bad steps fail here, before any
        compile); start_t: a chain that starts part-way (SDEdit), see `plans.make_plan`."""
        return make_plan(schedule, steps=self.steps, eta=self.eta, spacing=self.spacing,
                         order=self.order, sde=self.sampler == "dpm++sde", start_t=start_t,
                         edm=self.sampler if self.sampler in EDM_SAMPLERS else None,
                         corrector_snr=self.corrector_snr)

    def model_calls(self, num_steps: int) -> int:
        """Model calls per image of a num_steps-step chain (classifier-free guidance doubles
        each): S, Heun 2S - 1 (no correction on the step to sigma = 0), plus corrector_steps
        for every step but the last."""
        calls = 2 * num_steps - 1 if self.sampler == "heun" else num_steps
        return calls + (self.corrector_steps or 0) * (num_steps - 1)

    def describe(self, num_steps: int | None = None) -> str:
        """For logs and reports: 'dpm++sde, 20 steps, order 2, logsnr spacing'; with a corrector
        ', Langevin corrector r=0.16 x1', and for Heun or a corrector the model calls."""
        how = (f"order {self.order}" if self.sampler in DPM_SOLVERS else
               f"eta {self.eta}" if self.sampler == "ddim" else
               "EDM step" if self.sampler in EDM_SAMPLERS else f"{self.var_type} variance")
        steps = "" if num_steps is None else f", {num_steps} steps"
        extra = "" if self.threshold is None else f", threshold {self.threshold:g}"
        if self.corrector_snr is not None:
            extra += f", Langevin corrector r={self.corrector_snr:g} x{self.corrector_steps}"
        if num_steps is not None and self.model_calls(num_steps) != num_steps:
            extra += f", {self.model_calls(num_steps)} model calls"
        return f"{self.sampler}{steps}, {how}, {self.spacing} spacing{extra}"

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values, for JSON reports."""
        return dataclasses.asdict(self)


def spec_and_options(**options: Any) -> dict[str, Any]:
    """One flat list of options (SamplerSpec's fields and make_sampler's keyword options, as
    tests, benchmarks and `sampling.sample` keep them) as make_sampler's keyword arguments:
    dict(spec=SamplerSpec(the fields), **the rest)."""
    fields = {f.name for f in dataclasses.fields(SamplerSpec)}
    spec = SamplerSpec(**{k: v for k, v in options.items() if k in fields})
    return dict(spec=spec, **{k: v for k, v in options.items() if k not in fields})


MAX_SCALE = 1000.0  # guidance weights and classifier scales; useful values are 0.5-100


def finite_scale(name: str, value: float | None) -> float | None:
    """`value` (None passes) when it is a number in [0, MAX_SCALE]; else ValueError naming
    `name`: a guidance weight or classifier scale of inf, NaN or 1e30 gives black or saturated
    images (and scores computed from them), so it is refused before anything runs."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0 <= value <= MAX_SCALE:
        raise ValueError(f"{name}={value!r}: use a finite number >= 0 and <= {MAX_SCALE:g} (0: no "
                         "guidance; useful values are about 0.5-100).")
    return float(value)
