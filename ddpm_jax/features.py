"""Feature networks for FID / IS / KID and the cached reference statistics of a data split.

A `FeatureNet` maps uint8 images [N, H, W, C] to (features [N, D], logits [N, K]) and carries
what a score must be published with: the network's name, the SHA-256 of its weights and the
labels of its scores. Two are provided:
  * "inception": the FID InceptionV3 (pool3, 2048-d; 1008 logits) from a local weights file
    (see `ddpm_jax.models.inception` for its name, hash and source). Scores: FID, IS, KID.
  * "digits": the small classifier trained on the digits train split (128-d; 10 logits).
    Scores are labelled digits-FID, digits-IS, digits-KID: not comparable with Inception ones.
Reference statistics are computed from the split's uint8 images through the same network and
cached under the cache dir with their protocol (data set, split, size, count, network, hash).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from ddpm_jax import metrics, parallel
from ddpm_jax.models import digits_features, inception

FEATURE_NETS = ("digits", "inception")
# KID draws subsets of at most this many reference features; more are not cached.
KID_REFERENCE_FEATURES = 10_000


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A feature network and the provenance every score computed with it must state."""

    kind: str                  # "digits" | "inception"
    name: str                  # e.g. "digits-classifier-v1-16px", "inception-v3-fid-2015-12-05"
    weights_sha256: str        # SHA-256 of the weights file
    score_prefix: str          # "" for Inception (FID, IS, KID); "digits-" for the classifier
    apply: Callable[[Any], dict[str, Any]]   # uint8 [B, H, W, C] -> {"features", "logits"}
    channels: int              # the channels the network takes (1 for digits; 1 or 3 Inception)
    batch_size: int = 256

    def label(self, score: str) -> str:
        """'FID' -> 'FID' for Inception, 'digits-FID' for the digits classifier."""
        return self.score_prefix + score

    def protocol(self) -> dict[str, str]:
        return dict(feature_net=self.name, feature_net_sha256=self.weights_sha256)


def digits_feature_net(image_size: int, *, cache_dir: str | None = None) -> FeatureNet:
    """The digits classifier for `image_size` (trained and cached on first use)."""
    params, info = digits_features.load_or_train(image_size, cache_dir=cache_dir)
    logging.info("Feature net %s (sha256 %s, digits test accuracy %.4f).", info["name"],
                 info["sha256"][:16], info["test_accuracy"])
    # Weights enter as arguments, not as constants folded into the compiled program.
    apply = functools.partial(jax.jit(digits_features.DigitsClassifier().apply), {"params": params})
    return FeatureNet(kind="digits", name=info["name"], weights_sha256=info["sha256"],
                      score_prefix="digits-", channels=1, apply=apply, batch_size=512)


def inception_feature_net(weights_path: str | None, *, resize_to: int = 299,
                          batch_size: int = 100) -> FeatureNet:
    """The FID InceptionV3 from pytorch-fid's weights file at `weights_path` (or its .npz)."""
    if not weights_path:
        raise ValueError(
                f"FID/IS with feature_net='inception' need the Inception weights: download "
                f"{inception.FID_WEIGHTS_FILENAME} from {inception.FID_WEIGHTS_URL} and pass "
                "--inception_weights=PATH (or use --feature_net=digits for the digits data).")
    try:
        variables, sha256 = inception.load_inception_weights(weights_path)
    except ValueError:
        raise
    except Exception as e:  # a truncated or foreign file: whatever its reader raised, one line
        raise ValueError(f"--inception_weights={weights_path}: not readable as the FID Inception "
                         f"weights ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                         f"download {inception.FID_WEIGHTS_FILENAME} again from "
                         f"{inception.FID_WEIGHTS_URL}.") from None
    model = inception.InceptionV3(resize_to=resize_to)

    @jax.jit
    def apply(variables, x):
        out = model.apply(variables, x)
        return dict(features=out["pool3"], logits=out["logits"])

    return FeatureNet(kind="inception", name="inception-v3-fid-2015-12-05", weights_sha256=sha256,
                      score_prefix="", channels=3, apply=functools.partial(apply, variables),
                      batch_size=batch_size)


def make_feature_net(kind: str, *, image_size: int, inception_weights: str | None = None,
                     cache_dir: str | None = None) -> FeatureNet:
    """`kind` "digits" or "inception" (see the module docstring)."""
    if kind == "digits":
        return digits_feature_net(image_size, cache_dir=cache_dir)
    if kind == "inception":
        return inception_feature_net(inception_weights)
    raise ValueError(f"Unknown feature net {kind!r}; choose one of {FEATURE_NETS}.")


def check_feature_net(kind: str, inception_weights: str | None) -> None:
    """ValueError (one line) when the feature net `kind` cannot be built: 'inception' without
    weights, or with a weights file that is missing, of other weights or unreadable. Reads the
    weights file once, so that a bad one stops an evaluation before any sampling."""
    if kind == "inception":
        inception_feature_net(inception_weights)


def compute_features(net: FeatureNet, images: np.ndarray, *, desc: str = "features",
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], logits [N, K]) as float32 NumPy from uint8 images [N, H, W, C].

    The last batch is padded to the batch size (`parallel.map_batches`), so the network
    compiles once; each process computes every feature itself.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"Feature nets take uint8 images [N, H, W, C], got {images.dtype} "
                         f"{images.shape}; convert model outputs with images.to_uint8.")
    if net.channels == 1 and images.shape[-1] != 1:
        raise ValueError(f"{net.name} takes 1-channel images, got {images.shape[-1]} channels; "
                         "use --feature_net=inception for colour data.")
    out = parallel.map_batches(lambda start, chunk: net.apply(chunk), [images], net.batch_size,
                               desc=desc, progress=progress, to_host=jax.device_get)
    return out["features"], out["logits"]


def reference_statistics(net: FeatureNet, *, dataset: str, split: str, image_size: int,
                         channels: int, data_dir: str | None = None,
                         cache_dir: str | None = None, max_images: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Statistics of a data split under `net`, cached as .npz with their protocol.

    Returns dict(mu [D], sigma [D, D] float64, kid_features [<= 10k, D], is_mean, is_std
    (Inception Score of the real images), protocol dict(dataset, split, image_size,
    num_images, feature_net, feature_net_sha256)).
    """
    cache_dir = digits_features.default_cache_dir(cache_dir)
    count = "all" if max_images is None else str(max_images)
    fname = (f"ref_{dataset}-{image_size}px-{split}-{count}_{net.name}-"
             f"{net.weights_sha256[:12]}.npz")
    path = os.path.join(cache_dir, "reference_stats", fname)
    if os.path.isfile(path):
        with np.load(path) as data:
            stats = {k: data[k] for k in ("mu", "sigma", "kid_features")}
            stats.update(json.loads(str(data["info"])))
        logging.info("Reference statistics from %s (%d images).", path,
                     stats["protocol"]["num_images"])
        return stats
    from ddpm_jax import data  # the TFDS import is slow: only on a cache miss
    images = data.load_split_uint8(dataset, split, data_dir, image_size=image_size,
                                   channels=channels, max_examples=max_images)
    features, logits = compute_features(net, images, desc=f"reference {split}", progress=progress)
    mu, sigma = metrics.feature_statistics(features)
    is_mean, is_std = metrics.inception_score(logits, splits=min(10, len(logits)))
    rng = np.random.RandomState(0)
    keep = np.sort(rng.permutation(len(features))[:KID_REFERENCE_FEATURES])
    protocol = dict(dataset=dataset, split=split, image_size=image_size,
                    num_images=len(images), **net.protocol())
    info = dict(is_mean=is_mean, is_std=is_std, protocol=protocol)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma, kid_features=features[keep], info=json.dumps(info))
        os.replace(tmp, path)
        logging.info("Cached reference statistics of %s/%s (%d images) at %s.", dataset, split,
                     len(images), path)
    return dict(mu=mu, sigma=sigma, kid_features=features[keep], **info)


def sample_quality(net: FeatureNet, samples: np.ndarray, reference: dict[str, Any], *,
                   scores: tuple[str, ...] = ("fid", "is"), is_splits: int = 10,
                   kid_subsets: int = 100, kid_subset_size: int = 1000,
                   progress: bool = True) -> dict[str, Any]:
    """FID / IS / KID of uint8 samples [N, H, W, C] against `reference_statistics`.

    Returns {score: dict(label, value(s), ...)} for each requested score; every entry names
    its feature net, weights hash, sample count and reference split.
    """
    unknown = sorted(set(scores) - {"fid", "is", "kid"})
    if unknown:
        raise ValueError(f"Unknown scores {unknown}; choose from fid, is, kid.")
    features, logits = compute_features(net, samples, desc="sample features", progress=progress)
    common = dict(num_samples=len(samples), reference=reference["protocol"], **net.protocol())
    out: dict[str, Any] = {}
    if "fid" in scores:
        mu, sigma = metrics.feature_statistics(features)
        fid = metrics.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
        out["fid"] = dict(label=net.label("FID"), value=fid, **common)
    if "is" in scores:
        splits = min(is_splits, len(samples))
        mean, std = metrics.inception_score(logits, splits=splits)
        out["is"] = dict(label=net.label("IS"), mean=mean, std=std, splits=splits,
                         reference_images_is=reference["is_mean"], **common)
    if "kid" in scores:
        mean, std = metrics.kernel_inception_distance(
                features, reference["kid_features"], num_subsets=kid_subsets,
                subset_size=kid_subset_size)
        out["kid"] = dict(label=net.label("KID"), mean=mean, std=std, subsets=kid_subsets,
                          subset_size=min(kid_subset_size, len(samples),
                                          len(reference["kid_features"])), **common)
    return out
