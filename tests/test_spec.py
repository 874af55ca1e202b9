"""SamplerSpec (ddpm_jax/spec.py): normalisation, one error per mistake, the rule that a
config's settings belong to its sampler, the plan it builds, and bringing an older run's
stored config up to date (config.upgrade)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

from configs import base, digits  # noqa: E402
from ddpm_jax import config as config_lib  # noqa: E402
from ddpm_jax import plans  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import (MAX_SCALE, SamplerSpec, finite_scale,  # noqa: E402
                           spec_and_options)


def test_defaults_and_normalisation():
    assert SamplerSpec() == SamplerSpec(sampler="ddpm", steps=None, spacing="time", eta=0.0,
                                        order=None, threshold=None)
    assert SamplerSpec(sampler="dpm++").order == 2          # DPM-Solver++(2M) by default
    assert SamplerSpec(sampler="dpm++sde", order=1).order == 1
    assert SamplerSpec(steps="20").steps == 20               # a command line's digits
    assert SamplerSpec(steps="ddim50").steps == "ddim50"
    assert isinstance(SamplerSpec(sampler="ddim", eta=1).eta, float)
    hash(SamplerSpec(sampler="dpm++", steps=20))             # a static jit argument


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="plms"), "sampler='plms': choose one of ('ddpm', 'ddim', 'dpm++', 'dpm++sde', 'heun', "
              "'euler_ancestral')."),
    (dict(spacing="karras"), "spacing='karras': choose one of ('time', 'logsnr', 'edm', 'trailing')."),
    (dict(steps=0), "steps=0: use None (all T), an int >= 1, 'ddimS' or 'S1,S2,...'."),
    (dict(steps=2.5), "steps=2.5: use None (all T), an int >= 1"),
    (dict(spacing="logsnr", steps="ddim50"), "spacing='logsnr' places an int number of steps S"),
    (dict(sampler="ddim", eta=1.5), "eta=1.5: use a value in [0, 1]"),
    (dict(sampler="dpm++sde", eta=0.7), "eta=0.7 only applies to sampler 'ddim' (got 'dpm++sde')"),
    (dict(order=2), "order=2 only applies to sampler 'dpm++' or 'dpm++sde' (got 'ddpm')."),
    (dict(sampler="dpm++", order=4), "order=4: dpm++ has orders 1..3."),
    (dict(sampler="dpm++sde", order=3), "order=3: dpm++sde has orders 1..2."),
    (dict(threshold=1.0), "threshold=1.0: use a percentile in (0, 1)"),
    (dict(var_type="big"), "var_type='big': choose one of"),
    (dict(mean_type="score"), "mean_type='score': choose one of"),
    (dict(clip_denoised=1), "clip_denoised=1: use True or False."),
])
def test_each_mistake_has_one_message(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SamplerSpec(**kwargs)


def test_overrides_drop_what_belongs_to_the_old_sampler():
    config_spec = SamplerSpec(sampler="dpm++sde", steps=20, spacing="logsnr", order=1)
    assert config_spec.with_overrides(sampler=None, steps=None) == config_spec
    assert config_spec.with_overrides(steps=30) == SamplerSpec(sampler="dpm++sde", steps=30,
                                                               spacing="logsnr", order=1)
    ddim = config_spec.with_overrides(sampler="ddim")
    assert (ddim.spacing, ddim.order, ddim.steps) == ("time", None, 20)
    assert config_spec.with_overrides(sampler="ddim", spacing="logsnr").spacing == "logsnr"
    assert config_spec.with_overrides(sampler="dpm++").order == 2   # the new sampler's default
    eta = SamplerSpec(sampler="ddim", eta=0.5, steps=50)
    assert eta.with_overrides(sampler="ddpm").eta == 0.0
    with pytest.raises(ValueError, match="eta=0.7 only applies to sampler 'ddim'"):
        config_spec.with_overrides(eta=0.7)        # an explicit option the sampler cannot use
    with pytest.raises(ValueError, match="order=2 only applies"):
        SamplerSpec().with_overrides(order=2)
    with pytest.raises(TypeError, match=r"no options \['guidance'\]"):
        SamplerSpec().with_overrides(guidance=1.0)


def test_from_config_reads_the_sampling_and_diffusion_sections():
    config = digits.get_config("tiny")
    s = config.sampling
    s.sampler, s.steps, s.order, s.eta, s.var_type = "ddim", 5, 3, 0.25, None
    config.diffusion.var_type = "fixedsmall"
    spec = SamplerSpec.from_config(config)
    assert (spec.sampler, spec.steps, spec.eta, spec.order) == ("ddim", 5, 0.25, None)
    assert spec.var_type == "fixedsmall"                    # None: the trained variance
    assert spec.mean_type == config.diffusion.mean_type
    spec = SamplerSpec.from_config(config, sampler="dpm++", steps=None, var_type="fixedlarge")
    assert (spec.sampler, spec.order, spec.steps, spec.eta) == ("dpm++", 3, 5, 0.0)
    assert spec.var_type == "fixedlarge"
    s.sampler = "ddpm"                        # the config's order is DPM-Solver++'s alone
    assert SamplerSpec.from_config(config).order is None
    assert SamplerSpec.from_config(config, sampler="ddim").eta == 0.25    # and its eta DDIM's
    s.spacing, s.steps = "logsnr", 20         # the spacing is the config sampler's
    assert SamplerSpec.from_config(config).spacing == "logsnr"
    assert SamplerSpec.from_config(config, sampler="ddpm").spacing == "logsnr"
    assert SamplerSpec.from_config(config, sampler="dpm++").spacing == "time"
    assert SamplerSpec.from_config(config, sampler="dpm++", spacing="logsnr").spacing == "logsnr"


def test_the_plan_is_make_plan_of_the_spec():
    schedule = Schedule.create("linear", 100)

    def same(a, b):
        return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(jax_leaves(a), jax_leaves(b)))

    spec = SamplerSpec(sampler="dpm++sde", steps=10, spacing="logsnr", order=1)
    assert same(spec.plan(schedule), plans.make_plan(schedule, steps=10, spacing="logsnr",
                                                     order=1, sde=True))
    spec = SamplerSpec(sampler="ddim", steps=10, eta=0.5)
    assert same(spec.plan(schedule, start_t=40),
                plans.make_plan(schedule, steps=10, eta=0.5, start_t=40))
    assert spec.plan(schedule).dpm_coef_x0 is None
    with pytest.raises(ValueError, match="steps must lie in 1..100"):
        SamplerSpec(steps=101).plan(schedule)
    with pytest.raises(ValueError, match="order 3 needs at least 3 steps"):
        SamplerSpec(sampler="dpm++", order=3, steps=2).plan(schedule)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_describe_says_what_runs():
    assert SamplerSpec(sampler="dpm++sde", steps=20, spacing="logsnr").describe(20) == \
        "dpm++sde, 20 steps, order 2, logsnr spacing"
    assert SamplerSpec(sampler="ddim", eta=0.5, threshold=0.995).describe() == \
        "ddim, eta 0.5, time spacing, threshold 0.995"
    assert SamplerSpec(var_type="fixedsmall").describe(1000) == \
        "ddpm, 1000 steps, fixedsmall variance, time spacing"


def test_spec_and_options_splits_a_flat_list():
    got = spec_and_options(sampler="ddim", steps=5, guidance=1.0, return_every=2)
    assert got == dict(spec=SamplerSpec(sampler="ddim", steps=5), guidance=1.0, return_every=2)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5, 1e30, MAX_SCALE + 1, True])
def test_scales_must_be_finite_and_bounded(value):
    with pytest.raises(ValueError, match=r"^guidance=.*: use a finite number >= 0 and <= 1000"):
        finite_scale("guidance", value)


def test_scales_in_range_pass():
    assert finite_scale("guidance", None) is None
    assert finite_scale("classifier_scale", 100) == 100.0
    assert finite_scale("guidance", 0) == 0.0


# ------------------------------------------------------------------------ older configs

OLD_CONFIG = Path(__file__).parent / "data" / "config_2026-11-23.json"


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_the_added_fields_are_todays_fields():
    """Every field upgrade() fills exists in configs/base.py, and every field base.py has that
    the stored first-release config lacks is one upgrade() fills."""
    today = _flat(base.get_config().to_dict())
    old = _flat(json.loads(OLD_CONFIG.read_text()))
    assert set(config_lib.ADDED_FIELDS) <= set(today)
    assert set(today) - set(old) == set(config_lib.ADDED_FIELDS)


def test_an_older_runs_config_is_brought_up_to_date():
    """The digits config of the first release, as its run stored it: after upgrade() it
    validates, builds its model, step options and sampler, and keeps its own values."""
    saved = json.loads(OLD_CONFIG.read_text())
    config = config_lib.upgrade(saved)
    config_lib.validate(config)
    assert config.training.label_dropout == 0.0              # no dropout existed then
    assert (config.sampling.spacing, config.sampling.order) == ("time", 2)
    assert config.model.kind == "unet"
    assert config.data.image_size == saved["data"]["image_size"] == 16
    spec = SamplerSpec.from_config(config)
    assert (spec.sampler, spec.steps, spec.spacing) == (saved["sampling"]["sampler"],
                                                        saved["sampling"]["steps"], "time")
    settings = config_lib.step_config(config, config_lib.model_from_config(config))
    assert (settings.lr_decay, settings.loss_weight) == ("none", "uniform")
    assert json.loads(OLD_CONFIG.read_text()) == saved       # the stored dict is not changed
    assert _flat(config.to_dict()).keys() == _flat(base.get_config().to_dict()).keys()
