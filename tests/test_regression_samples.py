"""Behaviour lock for refactors: the samples of a tiny class-conditional UNet on a fixed key, for
every sampler (ancestral, DDIM, DPM-Solver++ orders 1-3, SDE-DPM-Solver++ orders 1-2), each
unguided, with classifier-free guidance and with classifier guidance, and for every edit
(RePaint, SDEdit, DDIM encode / decode, both interpolations), compared with the arrays recorded
in tests/data/regression_samples.npz before the code moved.

On the machine and jax version that recorded them the comparison is bit for bit. Elsewhere
(another CPU or XLA build fuses floating-point sums differently) it falls back to 2e-5, and says
so in the skip-free assertion message. Record anew only when a change is meant to alter samples:

    DDPM_RECORD_REGRESSION=1 python -m pytest -q tests/test_regression_samples.py
"""

import hashlib
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed
from ddpm_jax import editing
from ddpm_jax.models.classifier import NoisyClassifier
from ddpm_jax.models.unet import UNet
from ddpm_jax.plans import make_plan
from ddpm_jax.guidance import ClassifierApply
from ddpm_jax.sampling import ModelApply, make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

pytestmark = pytest.mark.slow  # about 30 compiles of a small UNet chain

GOLDEN = Path(__file__).parent / "data" / "regression_samples.npz"
RECORD = os.environ.get("DDPM_RECORD_REGRESSION") == "1"
SHAPE = (4, 8, 8, 1)
LABELS = np.array([0, 1, 2, 1], np.int32)
STEPS = 6
SAMPLERS = {"ddpm": {}, "ddim": dict(eta=0.5), "dpm++1": dict(order=1),
            "dpm++2": dict(order=2), "dpm++3": dict(order=3), "dpm++sde1": dict(order=1),
            "dpm++sde2": dict(order=2)}
GUIDANCE = ("none", "cfg", "classifier")
EDITS = ("inpaint", "sdedit", "encode", "decode", "interpolate", "slerp")


@pytest.fixture(scope="module")
def models():
    """(ModelApply, params, ClassifierApply, classifier params, schedule)."""
    arch = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
    unet = UNet(**arch, num_classes=3, out_channels=1)
    classifier = NoisyClassifier(**arch, classes=3)
    x, t = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1], jnp.int32)
    params = perturbed(unet.init(jax.random.key(1), x, t, jnp.zeros(SHAPE[:1], jnp.int32),
                                  train=False)["params"], jax.random.key(2))
    classifier_params = perturbed(classifier.init(jax.random.key(3), x, t, train=False)["params"],
                                   jax.random.key(4))
    return (ModelApply(unet), params, ClassifierApply(classifier), classifier_params,
            Schedule.create("linear", 40))


def _sampler_kwargs(name):
    kind = "dpm++sde" if name.startswith("dpm++sde") else "dpm++" if name.startswith("dpm++") \
        else name
    return dict(sampler=kind, steps=STEPS, **SAMPLERS[name])


def sample_case(models, name, guidance):
    """Images [B, H, W, C] float32 of sampler `name` with guidance none / cfg / classifier."""
    model, params, classifier, classifier_params, schedule = models
    extra, call = {}, {}
    if guidance == "cfg":
        extra, call = dict(guidance=1.5), dict(labels=LABELS)
    elif guidance == "classifier":
        extra = dict(classifier=classifier, classifier_scale=2.0)
        call = dict(labels=LABELS, classifier_params=classifier_params)
    sampler = make_sampler(model, schedule, SHAPE, SamplerSpec(**_sampler_kwargs(name)), **extra)
    return np.asarray(sampler(params, jax.random.key(7), 0, **call)["images"])


def edit_case(models, name):
    """The output of edit `name` on fixed images (float32)."""
    model, params, _, _, schedule = models
    key = jax.random.key(11)
    images = jax.random.uniform(jax.random.key(12), SHAPE, jnp.float32, -1.0, 1.0)
    if name == "inpaint":
        plan = make_plan(schedule, steps=STEPS)
        moves = editing.repaint_moves(plan.num_steps, 2, 2)
        mask = np.zeros(SHAPE[:3] + (1,), np.float32)
        mask[:, :4] = 1.0
        out = editing.repaint(model, params, plan, moves, key, images, mask)
    elif name == "sdedit":
        sampler = make_sampler(model, schedule, SHAPE, SamplerSpec(sampler="ddim", steps=STEPS),
                               start_t=editing.sdedit_start_t(40, 0.5))
        out = sampler(params, key, init=images, start="q_x0")["images"]
    elif name in ("encode", "decode"):
        decoder = make_sampler(model, schedule, SHAPE, SamplerSpec(
                sampler="ddim", steps=STEPS, clip_denoised=False))
        latents = editing.ddim_encode(model, params, decoder.plan, images)
        out = latents if name == "encode" else decoder(params, key, init=latents,
                                                        start="x_t")["images"]
    elif name == "interpolate":
        abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
        noise = jax.random.normal(jax.random.key(13), SHAPE[1:], jnp.float32)
        start = editing.q_interpolate(float(np.sqrt(abar[20])), images[0], images[1], noise,
                                      np.linspace(0.0, 1.0, 4))
        sampler = make_sampler(model, schedule, SHAPE, SamplerSpec(steps=STEPS), start_t=20)
        out = sampler(params, key, init=start, start="x_t", rows=np.zeros(4, np.int32))["images"]
    else:  # slerp of two DDIM latents, decoded by DDIM
        decoder = make_sampler(model, schedule, SHAPE, SamplerSpec(
                sampler="ddim", steps=STEPS, clip_denoised=False))
        latents = editing.ddim_encode(model, params, decoder.plan, images)
        start = editing.slerp(latents[0], latents[1], np.linspace(0.0, 1.0, 4))
        out = decoder(params, key, init=start, start="x_t")["images"]
    return np.asarray(out)


def _fingerprint() -> str:
    """The jax version and the CPU model: where both match the recording, samples are bit-equal."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"jax {jax.__version__}, {hashlib.sha256(cpu.encode()).hexdigest()[:12]}"


def _check(key, value):
    if RECORD:
        stored = dict(np.load(GOLDEN)) if GOLDEN.exists() else {}
        stored[key] = value
        stored["fingerprint"] = np.array(_fingerprint())
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez(GOLDEN, **stored)
        return
    with np.load(GOLDEN) as golden:
        expected, recorded_on = golden[key], str(golden["fingerprint"])
    assert value.shape == expected.shape and np.all(np.isfinite(value))
    if recorded_on == _fingerprint():
        np.testing.assert_array_equal(value, expected, err_msg=f"{key}: not bit-equal to the "
                                      f"recording ({recorded_on})")
    else:
        np.testing.assert_allclose(value, expected, rtol=0, atol=2e-5, err_msg=(
                f"{key}: recorded on {recorded_on}, compared on {_fingerprint()} to 2e-5"))


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_output_is_unchanged(models, name, guidance):
    _check(f"sample/{name}/{guidance}", sample_case(models, name, guidance))


@pytest.mark.parametrize("name", EDITS)
def test_edit_output_is_unchanged(models, name):
    _check(f"edit/{name}", edit_case(models, name))


def test_the_cases_differ_from_each_other(models):
    """The recording can catch a change: guidance and each sampler move the samples."""
    with np.load(GOLDEN) as golden:
        values = {k: golden[k] for k in golden.files if k != "fingerprint"}
    assert len(values) == len(SAMPLERS) * len(GUIDANCE) + len(EDITS)
    samples = [v for k, v in values.items() if k.startswith("sample/")]
    for i, a in enumerate(samples):
        for b in samples[i + 1:]:
            assert np.abs(a - b).max() > 1e-4
