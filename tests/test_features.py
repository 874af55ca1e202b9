"""ddpm_jax.features: the digits feature net (the classifier of ddpm_jax/models/digits_features.py)
reaches its accuracy and separates real digits from noise by FID. Its fixtures, `cache_dir` and
`digits_net`, live in conftest.py: test_evaluate.py uses them too."""

import numpy as np
import pytest

from ddpm_jax import features, metrics
from ddpm_jax.data import builders
from ddpm_jax.models import digits_features as classifier


@pytest.mark.slow
def test_digits_classifier_reaches_95_percent_test_accuracy(digits_net, cache_dir):
    params, info = classifier.load_or_train(16, cache_dir=cache_dir)   # from the cache now
    assert info["sha256"] == digits_net.weights_sha256
    test_images, test_labels = builders.digits_arrays(16)["test"]
    acc = classifier.accuracy(params, test_images, test_labels)
    assert acc >= 0.95, acc
    assert acc == pytest.approx(info["test_accuracy"])


@pytest.mark.slow
def test_digits_fid_of_real_test_images_is_far_below_noise(digits_net):
    digits = builders.digits_arrays(16)
    train, _ = digits["train"]
    test, _ = digits["test"]
    noise = np.random.RandomState(0).randint(0, 256, size=test.shape).astype(np.uint8)
    ref = metrics.feature_statistics(features.compute_features(digits_net, train, progress=False)[0])

    def fid(images):
        return metrics.frechet_distance(*metrics.feature_statistics(
                features.compute_features(digits_net, images, progress=False)[0]), *ref)

    real, noisy = fid(test), fid(noise)
    assert real < 0.05 * noisy, (real, noisy)
    scores = features.compute_features(digits_net, test, progress=False)[1]
    assert metrics.inception_score(scores, splits=1)[0] > 8.0     # 10 balanced, confident classes
