"""FID, IS and KID against independent float64 references and known closed-form values."""

import numpy as np
import pytest

from ddpm_jax import metrics
from reference import fid_reference, mmd2_unbiased_loops


def _random_features(seed, n, d, shift=0.0):
    rng = np.random.RandomState(seed)
    mixing = rng.randn(d, d) / np.sqrt(d)
    return (rng.randn(n, d) @ mixing + shift).astype(np.float32)


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    f = _random_features(0, 50, 6)
    mu, sigma = metrics.feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    centred = f.astype(np.float64) - f.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = metrics.feature_statistics(_random_features(1, 200, 16))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_matches_float64_eigh_reference():
    s1 = metrics.feature_statistics(_random_features(2, 300, 16))
    s2 = metrics.feature_statistics(_random_features(3, 300, 16, shift=0.3))
    fid = metrics.frechet_distance(*s1, *s2)
    np.testing.assert_allclose(fid, fid_reference(*s1, *s2), rtol=1e-9)
    assert fid > 0.1


def test_fid_handles_rank_deficient_covariances():
    # 10 samples in 32 dimensions: both covariances have rank 9, S1 S2 is singular.
    s1 = metrics.feature_statistics(_random_features(4, 10, 32))
    s2 = metrics.feature_statistics(_random_features(5, 10, 32, shift=0.2))
    fid = metrics.frechet_distance(*s1, *s2)
    assert np.isfinite(fid) and isinstance(fid, float)
    np.testing.assert_allclose(fid, fid_reference(*s1, *s2), rtol=1e-4, atol=1e-4)
    assert abs(metrics.frechet_distance(*s1, *s1)) < 1e-4


def test_fid_rejects_mismatched_dimensions():
    s1 = metrics.feature_statistics(_random_features(6, 20, 4))
    s2 = metrics.feature_statistics(_random_features(7, 20, 5))
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(*s1, *s2)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 1008)), splits=10)
    np.testing.assert_allclose(mean, 1.0, atol=1e-12)
    assert std < 1e-12


@pytest.mark.parametrize("from_logits", [True, False])
def test_inception_score_of_confident_distinct_classes_is_class_count(from_logits):
    k = 7
    labels = np.tile(np.arange(k), 10)        # every split of 7 contiguous rows holds all classes
    one_hot = np.eye(k)[labels]
    scores = 1000.0 * one_hot if from_logits else one_hot
    mean, std = metrics.inception_score(scores, splits=10, from_logits=from_logits)
    np.testing.assert_allclose(mean, k, rtol=1e-10)
    assert std < 1e-9


def test_inception_score_of_a_single_confident_class_is_one():
    scores = np.tile(np.eye(5)[2] * 50.0, (20, 1))
    np.testing.assert_allclose(metrics.inception_score(scores, splits=2)[0], 1.0, atol=1e-12)


def test_kid_with_full_subsets_matches_loop_reference():
    # subset_size = N draws a permutation, and the MMD estimate is permutation invariant.
    x = _random_features(8, 12, 5).astype(np.float64)
    y = _random_features(9, 12, 5, shift=0.5).astype(np.float64)
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=12)
    np.testing.assert_allclose(mean, mmd2_unbiased_loops(x, y), rtol=1e-10)
    assert std < 1e-10


def test_kid_of_identical_sets_is_near_zero_and_far_below_shifted():
    x = _random_features(10, 400, 8)
    same = metrics.kernel_inception_distance(x, x, num_subsets=20, subset_size=100)[0]
    shifted = metrics.kernel_inception_distance(x, x + 1.0, num_subsets=20, subset_size=100)[0]
    assert abs(same) < 0.05 * shifted
    assert shifted > 0.01
