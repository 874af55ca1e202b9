"""Classifier guidance (guidance.classifier_guidance) and the noise-conditional classifier
(models.classifier.NoisyClassifier, trained by the loop with objective "classify").

For a two-component Gaussian mixture both the optimal noise predictor and the class posterior
p(y | x_t) are closed form, so guided samples can be checked against the theory: at scale 1 the
guided score is the conditional score, and the samples follow p(x0 | y)."""

import functools
import os
import subprocess
import sys
from math import erf, sqrt
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.classifier import NoisyClassifier
from ddpm_jax.guidance import ClassifierApply, classifier_log_prob_grad
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import spec_and_options
from reference import scaled_linear

# End-to-end through the loop, the command line or a reference framework: see pyproject's
# `slow` marker.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Mixture:
    """x0 ~ 1/2 N(-m, s^2) + 1/2 N(m, s^2) on one pixel; class y = 0 (-m) or 1 (+m). Under
    q(x_t | x0): components N(+-sqrt(a) m, v), v = a s^2 + 1 - a, a = abar_t."""

    def __init__(self, betas, m, s):
        self.abar = jnp.asarray(np.cumprod(1.0 - np.asarray(betas, np.float64)), jnp.float32)
        self.m, self.s = m, s

    def _logits(self, x, t):  # log N(x; +-sqrt(a) m, v) up to a shared constant: [B, 2]
        a = self.abar[t]
        v = a * self.s**2 + 1 - a
        x = x.reshape(x.shape[0])
        centres = jnp.sqrt(a)[:, None] * jnp.asarray([-self.m, self.m])[None, :]
        return -((x[:, None] - centres) ** 2) / (2 * v[:, None])

    def eps(self, params, x, t):
        # E[eps | x_t] = -sqrt(1 - a) grad log p(x_t); the mixture's score weighs each
        # component's -(x - c) / v by its posterior.
        del params
        a = self.abar[t]
        v = a * self.s**2 + 1 - a
        w = jax.nn.softmax(self._logits(x, t), axis=1)
        centres = jnp.sqrt(a)[:, None] * jnp.asarray([-self.m, self.m])[None, :]
        flat = x.reshape(x.shape[0])
        score = jnp.sum(w * -(flat[:, None] - centres), axis=1) / v
        return (-jnp.sqrt(1 - a) * score).reshape(x.shape)

    def classifier(self, params, x, t):
        del params
        return self._logits(x, t)


class _Fn:
    """A hashable wrapper (the compile cache keys on the function) with optional attributes."""

    def __init__(self, fn, **attributes):
        self.fn = fn
        self.__dict__.update(attributes)

    def __call__(self, *args):
        return self.fn(*args)


def _phi(z):
    return 0.5 * (1 + erf(z / sqrt(2)))


@pytest.mark.parametrize("sampler, options", [("ddpm", dict(var_type="fixedsmall")),
                                              ("ddim", dict(steps=100))])
def test_guided_samples_land_in_the_requested_component_at_the_theoretical_rate(sampler, options):
    m, s, num = 0.5, 0.5, 4000
    betas = scaled_linear(1000)
    mixture = Mixture(betas, m, s)
    eps, classifier = _Fn(mixture.eps), _Fn(mixture.classifier, num_classes=2)
    rates = {}
    for scale in (0.0, 1.0, 4.0):
        chain = make_sampler(eps, Schedule.from_betas(betas), (num, 1, 1, 1),
                             **spec_and_options(sampler=sampler, clip_denoised=False, classifier=classifier, classifier_scale=scale, **options))
        x = np.asarray(chain(None, jax.random.key(0), labels=np.ones(num, np.int32),
                             classifier_params=())["images"]).ravel()
        rates[scale] = float(np.mean(x > 0))
    stderr = sqrt(0.25 / num)
    # Scale 0: the unguided mixture, half on each side of 0.
    assert abs(rates[0.0] - 0.5) < 4 * stderr, rates
    # Scale 1: the conditional score, so x0 ~ N(m, s^2) given y = 1: P(x0 > 0) = Phi(m / s).
    assert abs(rates[1.0] - _phi(m / s)) < 4 * stderr, (rates, _phi(m / s))
    # A larger scale sharpens further.
    assert rates[4.0] > rates[1.0] + 4 * stderr, rates


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("ddim", dict(steps=20)),
                                              ("dpm++", dict(steps=20))])
def test_scale_zero_equals_unguided_sampling_bit_for_bit(sampler, options):
    betas = scaled_linear(200)
    mixture = Mixture(betas, 0.5, 0.3)
    eps = _Fn(mixture.eps)
    schedule = Schedule.from_betas(betas)
    plain = make_sampler(eps, schedule, (64, 1, 1, 1),
                         **spec_and_options(sampler=sampler, **options))(
            None, jax.random.key(1))["images"]
    guided = make_sampler(eps, schedule, (64, 1, 1, 1),
                          **spec_and_options(sampler=sampler, classifier=_Fn(
            mixture.classifier, num_classes=2), classifier_scale=0.0, **options))(
            None, jax.random.key(1), labels=np.zeros(64, np.int32), classifier_params=())["images"]
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided))


def test_the_guidance_gradient_matches_finite_differences():
    model = NoisyClassifier(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                            num_groups=4, classes=3)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    t = jnp.array([10, 500], jnp.int32)
    params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(3), x, t)["params"]
    apply = ClassifierApply(model)
    labels = jnp.array([2, 0], jnp.int32)
    grad = np.asarray(jax.jit(classifier_log_prob_grad, static_argnums=0)(apply, params, x, t,
                                                                           labels))

    logits_of = jax.jit(apply)

    def log_prob(z):
        logits = np.asarray(logits_of(params, z, t), np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return log_probs[np.arange(2), np.asarray(labels)]

    rng = np.random.default_rng(4)
    h = 1e-2
    for _ in range(6):
        row, i, j = rng.integers(0, 2), rng.integers(0, 8), rng.integers(0, 8)
        bump = np.zeros(x.shape, np.float32)
        bump[row, i, j, 0] = h
        numeric = (log_prob(x + bump)[row] - log_prob(x - bump)[row]) / (2 * h)
        np.testing.assert_allclose(grad[row, i, j, 0], numeric, rtol=2e-2, atol=2e-4)
        # The other row's log-probability does not depend on this pixel.
        other = 1 - row
        assert abs(log_prob(x + bump)[other] - log_prob(x - bump)[other]) < 1e-5
    assert np.abs(grad).max() > 1e-4  # a random classifier's gradient is not zero


def test_guided_samplers_refuse_missing_pieces():
    betas = scaled_linear(50)
    mixture = Mixture(betas, 0.5, 0.3)
    schedule = Schedule.from_betas(betas)
    eps, classifier = _Fn(mixture.eps), _Fn(mixture.classifier, num_classes=2)
    with pytest.raises(ValueError, match="classifier_scale needs a classifier"):
        make_sampler(eps, schedule, (2, 1, 1, 1), classifier_scale=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        make_sampler(eps, schedule, (2, 1, 1, 1), classifier=classifier, classifier_scale=-1.0)
    chain = make_sampler(eps, schedule, (2, 1, 1, 1), classifier=classifier, classifier_scale=1.0)
    with pytest.raises(ValueError, match="pass labels"):
        chain(None, jax.random.key(0), classifier_params=())
    with pytest.raises(ValueError, match="classifier_params"):
        chain(None, jax.random.key(0), labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"0\.\.1, the classifier's classes"):
        chain(None, jax.random.key(0), labels=np.array([0, 2]), classifier_params=())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(classifier work dir, denoiser work dir): a tiny digits classifier trained 30 steps by
    the loop, and an untrained tiny denoiser (step 0)."""
    from configs import digits
    from conftest import write_untrained_run
    from ddpm_jax import data, loop

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_dataset("digits", data_dir, image_size=8)
    config = digits.get_config("classifier_tiny")
    config.data.data_dir = data_dir
    config.training.num_steps = 30
    config.training.log_every = 10
    config.training.checkpoint_every = 30
    classifier = str(tmp_path_factory.mktemp("classifier"))
    loop.train_and_evaluate(config, classifier)
    denoiser = str(tmp_path_factory.mktemp("denoiser"))
    write_untrained_run(digits.get_config("tiny"), denoiser)
    return classifier, denoiser


def test_the_classifier_config_trains_by_the_loop_and_reports_accuracy_per_t_band(runs):
    from ddpm_jax import runs as runs_lib
    from ddpm_jax import writers

    workdir = runs[0]
    records = [r for r in writers.read_metrics(workdir) if "accuracy" in r]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record in records:
        for key in ("loss", "accuracy", "accuracy_t0", "accuracy_t1", "accuracy_t2"):
            assert np.isfinite(record[key]), (key, record)
        assert 0.0 <= record["accuracy"] <= 1.0
    assert records[-1]["loss"] < records[0]["loss"]  # 30 steps at lr 1e-3 do learn something
    _, model, params = runs_lib.load_for_sampling(workdir, "ema")
    assert isinstance(model, NoisyClassifier) and model.classes == 10
    logits = ClassifierApply(model)(params, jnp.zeros((2, 8, 8, 1)), jnp.array([0, 999]))
    assert logits.shape == (2, 10)


def _script(name, *args):
    return subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_sample_py_guides_an_unconditional_run_with_a_classifier_run(runs, tmp_path):
    classifier, denoiser = runs
    out = tmp_path / "guided.png"
    proc = _script("sample.py", "--workdir", denoiser, "--classifier", classifier, "--labels",
                   "3,7", "--classifier_scale", "2", "--num_samples", "4", "--steps", "5",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = np.load(tmp_path / "guided.npz")
    np.testing.assert_array_equal(written["labels"], [3, 7, 3, 7])
    assert written["images"].shape == (4, 8, 8, 1)
    for args, message in (
            (("--classifier", denoiser, "--labels", "3"), "is a denoiser run"),
            (("--classifier_scale", "2"), "--classifier_scale needs --classifier"),
            (("--classifier", classifier), "--classifier needs --labels"),
            (("--classifier", classifier, "--labels", "12"), "classes 0..9")):
        proc = _script("sample.py", "--workdir", denoiser, *args, "--out", str(out))
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-1500:])


def test_a_classifier_config_refuses_label_dropout_and_sample_grids():
    from configs import digits
    from ddpm_jax import config as config_lib

    for field, value in (("label_dropout", 0.1), ("num_sample_images", 4)):
        config = digits.get_config("classifier_tiny")
        config.training[field] = value
        with pytest.raises(ValueError, match=f"training.{field}.*set it to 0"):
            config_lib.validate(config)
    config = digits.get_config("classifier_tiny")
    config.model.num_classes = None
    with pytest.raises(ValueError, match="num_classes"):
        config_lib.validate(config)



@pytest.mark.parametrize("changes, message", [
    (dict(classifier_scale=2.0), "classifier_scale needs a classifier"),
    (dict(classifier="runs/clf"), "needs labels=balanced"),
    (dict(classifier="runs/clf", labels="balanced", guidance=1.0), "two methods"),
])
def test_evaluate_options_check_classifier_guidance(changes, message):
    from ddpm_jax.evaluate import EvalOptions

    with pytest.raises(ValueError, match=message):
        EvalOptions(**changes)
    assert EvalOptions(classifier="runs/clf", labels="balanced").classifier_scale is None
