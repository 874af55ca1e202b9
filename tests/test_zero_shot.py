"""The diffusion classifier (zero_shot.py) on Gaussian class-conditional data with the exact
noise predictor: its decision is the Bayes decision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import zero_shot
from ddpm_jax.schedule import Schedule
from reference import scaled_linear

SIGMA = 0.5
D = 16  # 4x4x1 images


class GaussianClasses:
    """Exact eps of x0 | y ~ N(mu_y, s^2 I): sqrt(1-a) (x_t - sqrt(a) mu_y) / (a s^2 + 1 - a)."""

    def __init__(self, betas, means):
        self.abar = jnp.asarray(np.cumprod(1.0 - np.asarray(betas, np.float64)), jnp.float32)
        self.means = jnp.asarray(means, jnp.float32)
        self.null_label = means.shape[0]

    def __call__(self, params, x_t, t, y):
        del params
        a = self.abar[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * self.means[y]) / (a * SIGMA**2 + 1 - a)


def test_the_diffusion_classifier_returns_the_bayes_decision():
    # Equal priors and covariance s^2 I: the Bayes decision is the nearest class mean. The means
    # are close enough that it errs often (about 25% here), so agreeing with it is a property
    # of the classifier, not of easy data; points within a small margin of a boundary, where
    # a finite number of pairs may flip the decision, are left out.
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 4, 4, 1)) * 0.15
    true = rng.integers(0, 4, 400)
    x = means[true] + SIGMA * rng.normal(size=(400, 4, 4, 1))
    sq = ((x[:, None] - means[None]) ** 2).sum((2, 3, 4))               # [N, K]
    bayes = sq.argmin(1)
    ordered = np.sort(sq, 1)
    clear = ordered[:, 1] - ordered[:, 0] > 0.3
    assert 0.6 < np.mean(bayes == true) < 0.9 and clear.mean() > 0.5
    betas = scaled_linear(100)
    model = GaussianClasses(betas, means)
    out = zero_shot.classify(model, None, Schedule.from_betas(betas), x[clear], jax.random.key(0),
                             num_samples=1024, batch_size=256)
    assert out["errors"].shape == (clear.sum(), 4)
    np.testing.assert_array_equal(out["labels"], bayes[clear])


def test_every_class_sees_the_same_pairs_and_the_confusion_matrix_counts_them():
    # A model that ignores the label gives every class the same error only if the (t, eps)
    # pairs are shared; different images get different pairs.
    betas = scaled_linear(50)
    blind = GaussianClasses(betas, np.zeros((3, 4, 4, 1)))
    x = np.random.default_rng(1).uniform(-1, 1, (5, 4, 4, 1))
    errors = zero_shot.classify(blind, None, Schedule.from_betas(betas), x, jax.random.key(1),
                                num_samples=4, batch_size=2)["errors"]
    np.testing.assert_array_equal(errors, np.repeat(errors[:, :1], 3, 1))
    assert len(np.unique(errors[:, 0])) == 5
    np.testing.assert_array_equal(zero_shot.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3),
                                  [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_bad_inputs_give_one_line_each():
    schedule = Schedule.from_betas(scaled_linear(50))
    x = np.zeros((2, 4, 4, 1))
    cases = [(lambda p, x, t: x, x, 4, "class-conditional"),
             (GaussianClasses(scaled_linear(50), np.zeros((2, 4, 4, 1))), x, 0, "num_samples=0"),
             (GaussianClasses(scaled_linear(50), np.zeros((2, 4, 4, 1))), x[0], 4, "images must")]
    for apply_fn, images, num, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            zero_shot.classify(apply_fn, None, schedule, images, jax.random.key(0), num_samples=num)
        assert "\n" not in str(info.value)
