"""`SamplerSpec`: what a reverse chain runs, as one frozen, self-checking value.

A spec names the sampler and its settings (steps, spacing, eta, order, threshold) and how the
model's output is read (mean_type, var_type, clip_denoised). Configs (`from_config`), command
lines (`with_overrides` of the flags) and evaluation build one; `sampling.make_sampler` takes
one; `plan` turns it into the per-step data of the chain. Every check of these options lives
here, once, with one error text per mistake.

    SamplerSpec(sampler="dpm++sde", steps=20, spacing="logsnr")     order 2 by default
    SamplerSpec(sampler="ddim", steps=50, eta=0.0)
    SamplerSpec(sampler="ddpm", var_type="fixedsmall")              all T ancestral steps
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ddpm_jax.diffusion import MEAN_TYPES, VAR_TYPES
from ddpm_jax.plans import (DPM_SOLVERS, MAX_SDE_SOLVER_ORDER, MAX_SOLVER_ORDER, SPACINGS,
                            SamplingPlan, make_plan)
from ddpm_jax.schedule import Schedule

SAMPLERS = ("ddpm", "ddim") + DPM_SOLVERS
DEFAULT_ORDER = 2  # DPM-Solver++(2M), the order diffusers and the paper recommend


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

    sampler: "ddpm" (ancestral), "ddim", "dpm++" (DPM-Solver++ multistep, deterministic) or
      "dpm++sde" (its SDE variant). steps: None (all T), an int S, "ddimS" or "S1,S2,..."
      (`plans.space_timesteps`; a string of digits becomes the int). spacing: "time" or
      "logsnr" (S steps uniform in log-SNR; steps an int) or "trailing" (t = round(k T / S) - 1,
      k = 1..S; steps an int). eta: DDIM's, in [0, 1], non-zero only
      with sampler "ddim". order: DPM-Solver++'s, 1-3 (dpm++) or 1-2 (dpm++sde), default 2;
      None for the other samplers. threshold: dynamic-thresholding percentile in (0, 1) of each
      x0 prediction instead of the [-1, 1] clip, or None. mean_type / var_type: how the model's
      output is read (var_type is also the ancestral sampler's variance). clip_denoised: clip
      each x0 prediction to [-1, 1].
    """

    sampler: str = "ddpm"
    steps: int | str | None = None
    spacing: str = "time"
    eta: float = 0.0
    order: int | None = None
    threshold: float | None = None
    mean_type: str = "eps"
    var_type: str = "fixedlarge"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("spacing", self.spacing, SPACINGS)
        check_choice("mean_type", self.mean_type, MEAN_TYPES)
        check_choice("var_type", self.var_type, VAR_TYPES)
        steps = self.steps
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps)
        if steps is not None and not (_is_int(steps) and steps >= 1) and not isinstance(steps, str):
            raise ValueError(f"steps={steps!r}: use None (all T), an int >= 1, 'ddimS' or "
                             "'S1,S2,...'.")
        if self.spacing in ("logsnr", "trailing") and not _is_int(steps):
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
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "eta", float(self.eta))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    # ------------------------------------------------------------------------- building

    def with_overrides(self, **overrides: Any) -> SamplerSpec:
        """This spec with `overrides` (None: keep this spec's value), e.g. command-line flags.

        The settings that belong to this spec's sampler go when an override names another
        sampler: its spacing (-> "time" unless overridden too), eta (-> 0) and order (-> the
        new sampler's default). An override the new sampler cannot use is refused.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"SamplerSpec has no options {unknown}.")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes.get("sampler", self.sampler) != self.sampler:
            changes = dict(spacing="time", eta=0.0, order=None) | changes
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SamplerSpec:
        """config.sampling's chain (config.diffusion's mean_type, and var_type unless
        config.sampling.var_type names one) with `overrides` (None: keep). The config's spacing
        belongs to its sampler (an override naming another sampler gets "time" unless it names a
        spacing too); its eta goes to DDIM and its order to DPM-Solver++, whichever is run."""
        s, d = config.sampling, config.diffusion
        sampler = overrides.get("sampler") or s.sampler
        spec = cls(sampler=sampler, steps=s.steps,
                   spacing=s.spacing if sampler == s.sampler else "time",
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
                         order=self.order, sde=self.sampler == "dpm++sde", start_t=start_t)

    def describe(self, num_steps: int | None = None) -> str:
        """For logs and reports: 'dpm++sde, 20 steps, order 2, logsnr spacing'."""
        how = (f"order {self.order}" if self.sampler in DPM_SOLVERS else
               f"eta {self.eta}" if self.sampler == "ddim" else f"{self.var_type} variance")
        steps = "" if num_steps is None else f", {num_steps} steps"
        extra = "" if self.threshold is None else f", threshold {self.threshold:g}"
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
