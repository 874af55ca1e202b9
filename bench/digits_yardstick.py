"""The digits yardstick shared by the quality benchmarks: every sample set is scored at the
native 8x8 with `evaluate`'s digits metrics (the project's digits classifier as the feature net).

Samples of a 16x16 model are brought to 8x8 by 2x2 averaging first, so that models trained at
either resolution are scored by one classifier against one reference. Besides digits-FID and
digits-IS it reports what a person sees in a grid: how confident the classifier is (mean max
probability) and how even the class histogram is.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import jax
import numpy as np

from ddpm_jax import features, sampling
from ddpm_jax.images import to_uint8
from ddpm_jax.spec import spec_and_options

SIZE = 8                      # every score is taken at the data's native 8x8
REFERENCE_SPLIT = "train"     # FID against the 1,437 train images, as evaluate's default


def to_native(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 1] at 8, 16 or 32 px -> uint8 [N, 8, 8, 1] (mean over each k x k block)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] % SIZE:
        raise ValueError(f"expected uint8 [N, 8k, 8k, 1] images, got {images.dtype} {images.shape}")
    k = images.shape[1] // SIZE
    if k == 1:
        return images
    blocks = images.reshape(len(images), SIZE, k, SIZE, k, images.shape[-1]).astype(np.float64)
    return np.clip(np.round(blocks.mean(axis=(2, 4))), 0, 255).astype(np.uint8)


class Yardstick:
    """Scores uint8 digit images [N, H, W, 1] at 8x8 against one split's statistics."""

    def __init__(self, cache_dir: str | None = None, reference_split: str = REFERENCE_SPLIT):
        """reference_split: "train" (the 1,437 images the models learn from; evaluate's default)
        or "test" (the 360 held-out images, which no model and no train-image row has seen)."""
        self.net = features.make_feature_net("digits", image_size=SIZE, cache_dir=cache_dir)
        self.reference = features.reference_statistics(
                self.net, dataset="digits", split=reference_split, image_size=SIZE, channels=1,
                cache_dir=cache_dir, progress=False)

    def protocol(self) -> str:
        ref = self.reference["protocol"]
        return (f"digits-FID / digits-IS at {SIZE}x{SIZE} (16px samples 2x2-averaged) vs "
                f"{ref['num_images']} images of digits/{ref['split']}; feature net "
                f"{self.net.name}, sha256 {self.net.weights_sha256[:16]}...")

    def score(self, images: np.ndarray) -> dict[str, Any]:
        images = to_native(images)
        scores = features.sample_quality(self.net, images, self.reference, scores=("fid", "is"),
                                         progress=False)
        _, logits = features.compute_features(self.net, images, progress=False)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        return dict(fid=float(scores["fid"]["value"]), inception_score=float(scores["is"]["mean"]),
                    confidence=float(probs.max(axis=1).mean()),
                    class_min=int(counts.min()), class_max=int(counts.max()), n=len(images),
                    sha1=hashlib.sha1(images.tobytes()).hexdigest()[:10])


def sample_checkpoint(workdir: str, *, sampler: str, steps: int | None, num_samples: int,
                      seed: int, batch_size: int = 500, weights: str = "ema",
                      **options: Any) -> tuple[np.ndarray, float]:
    """(uint8 samples [N, H, W, C], seconds) from a run's `weights` ("ema" or "raw") with our
    compiled chain."""
    from ddpm_jax import runs  # orbax: only here
    from ddpm_jax.schedule import Schedule

    config, model, params = runs.load_for_sampling(workdir, weights=weights)
    d, data = config.diffusion, config.data
    schedule = Schedule.create(d.schedule, d.timesteps, beta_start=d.beta_start,
                               beta_end=d.beta_end)
    shape = (min(batch_size, num_samples), data.image_size, data.image_size, data.channels)
    chain = sampling.make_sampler(sampling.ModelApply(model), schedule, shape,
                                  **spec_and_options(sampler=sampler, steps=steps, mean_type=d.mean_type, var_type=d.var_type, **options))
    start = time.perf_counter()
    images = sampling.draw_images(chain, params, jax.random.key(seed), num_samples,
                                  progress=False)
    return images, time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def blurred(images: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """A floor row: real digits blurred with a Gaussian of `sigma` pixels (at 8x8)."""
    from scipy.ndimage import gaussian_filter
    out = gaussian_filter(np.asarray(images, np.float64), sigma=(0, sigma, sigma, 0))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_uint8_np(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8, as our sampler's outputs are converted."""
    return np.asarray(to_uint8(jax.numpy.asarray(x)))
