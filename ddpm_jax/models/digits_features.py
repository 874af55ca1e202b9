"""A small CNN trained on the digits train split: the feature network of "digits-FID" and
"digits-IS" for the offline default (InceptionV3 on 16x16 grey digits would say little).

Features are the 128-d penultimate layer before its ReLU (no dead, constant dimensions in
the covariance), logits the 10 classes. Training is
deterministic (fixed seed, NumPy batch order and shifts, Adam) and takes seconds on a CPU; the
parameters are cached as msgpack under a cache dir, and the SHA-256 of that file is the
"weights hash" printed with every score. Scores from different hashes are not comparable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

Array = jax.Array

NUM_CLASSES = 10
FEATURE_DIM = 128
# Bump when the architecture or the training recipe changes: it names the cache file.
VERSION = 1
_TRAIN = dict(epochs=8, batch_size=64, lr=2e-3, max_shift=1)


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """cache_dir, else $DDPM_JAX_CACHE, else ~/.cache/ddpm_jax."""
    cache_dir = cache_dir or os.environ.get("DDPM_JAX_CACHE") or "~/.cache/ddpm_jax"
    return os.path.expanduser(os.fspath(cache_dir))


class DigitsClassifier(nn.Module):
    """uint8 images [B, H, W, 1] -> dict(features [B, 128], logits [B, 10]). Two conv stages
    with 2x average pooling (H and W divisible by 4), a 128-unit hidden layer (its
    pre-activations are the features), 10 logits."""

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        x = images.astype(jnp.float32) / 127.5 - 1.0
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{width}_a")(x))
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{width}_b")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.Dense(FEATURE_DIM, name="hidden")(x.reshape(x.shape[0], -1))
        logits = nn.Dense(NUM_CLASSES, name="logits")(nn.relu(features))
        return dict(features=features, logits=logits)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] % 4 or images.dtype != np.uint8:
        raise ValueError(f"The digits classifier takes uint8 [N, H, W, 1] with H, W divisible by "
                         f"4; got {images.dtype} {images.shape}.")


def _shift(images: np.ndarray, rng: np.random.RandomState, max_shift: int) -> np.ndarray:
    """Random integer translations by up to max_shift pixels (zero fill), per image."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.randint(0, 2 * max_shift + 1, size=(2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _train_step(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                images: Array, labels: Array) -> tuple[Any, Any, Array]:
    def loss_fn(p):
        logits = DigitsClassifier().apply({"params": p}, images)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def _apply(params: Any, images: Array) -> dict[str, Array]:
    return DigitsClassifier().apply({"params": params}, images)


def apply_classifier(params: Any, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """features [N, 128] and logits [N, 10] (float32 NumPy) of uint8 images [N, H, W, 1]."""
    _check_images(images)
    outs = [jax.device_get(_apply(params, images[i:i + batch_size]))
            for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("features", "logits")}


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the classifier on uint8 images [N, H, W, 1] with labels [N]."""
    return float(np.mean(apply_classifier(params, images)["logits"].argmax(-1) == labels))


def _param_shapes(image_size: int) -> Any:
    return jax.eval_shape(lambda: DigitsClassifier().init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, 1), jnp.uint8))["params"])


def init_params(image_size: int, seed: int) -> Any:
    """He-normal kernels and zero biases drawn with NumPy: bit-identical on every platform,
    and no XLA compile of `Module.init`."""
    rng = np.random.RandomState(seed)

    def draw(leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if len(leaf.shape) == 1:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.randn(*leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree.map(draw, _param_shapes(image_size))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> Any:
    """Trains the classifier from scratch (deterministic for a given seed). images: uint8
    [N, H, W, 1]; labels: [N] int in 0..9. Returns the parameters."""
    _check_images(images)
    rng = np.random.RandomState(seed)
    params = init_params(images.shape[1], seed)
    optimizer = optax.adam(_TRAIN["lr"])
    opt_state = optimizer.init(params)
    batch = _TRAIN["batch_size"]
    for epoch in range(_TRAIN["epochs"]):
        order = rng.permutation(len(images))
        losses = []
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            x = _shift(images[idx], rng, _TRAIN["max_shift"])
            params, opt_state, loss = _train_step(optimizer, params, opt_state, x,
                                                  labels[idx].astype(np.int32))
            losses.append(loss)
        logging.info("digits classifier epoch %d: loss %.4f", epoch, float(np.mean(losses)))
    return params


def _digits_split(image_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    from ddpm_jax.data import builders  # the TFDS import is slow: only when training
    return builders.digits_arrays(image_size)[split]


def load_or_train(image_size: int = 16, *, cache_dir: str | os.PathLike | None = None,
                  seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The digits classifier for `image_size`, trained on the digits train split on first use
    and cached at cache_dir/digits_classifier_v{VERSION}_{size}px_seed{seed}.msgpack.

    Returns (params, info) with info = dict(name, path, sha256, test_accuracy, image_size).
    """
    cache_dir = default_cache_dir(cache_dir)
    stem = os.path.join(cache_dir, f"digits_classifier_v{VERSION}_{image_size}px_seed{seed}")
    path, meta_path = stem + ".msgpack", stem + ".json"
    template = _param_shapes(image_size)
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(path, "rb") as f:
            blob = f.read()
        params = flax.serialization.from_bytes(template, blob)
        with open(meta_path, encoding="utf-8") as f:
            test_accuracy = json.load(f)["test_accuracy"]
    else:
        logging.info("Training the digits classifier (%dpx, seed %d); cached at %s.",
                     image_size, seed, path)
        train_images, train_labels = _digits_split(image_size, "train")
        params = train_classifier(train_images, train_labels, seed=seed)
        test_accuracy = accuracy(params, *_digits_split(image_size, "test"))
        blob = flax.serialization.to_bytes(params)
        os.makedirs(cache_dir, exist_ok=True)
        # Write-then-rename: concurrent evaluations never read a half-written file.
        for target, data in ((meta_path, json.dumps(dict(test_accuracy=test_accuracy)).encode()),
                             (path, blob)):
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        logging.info("Digits classifier test accuracy: %.4f", test_accuracy)
    info = dict(name=f"digits-classifier-v{VERSION}-{image_size}px", path=path,
                sha256=hashlib.sha256(blob).hexdigest(), test_accuracy=test_accuracy,
                image_size=image_size)
    return params, info
