"""The diffusion classifier (Li et al. 2023): zero-shot classification with a class-conditional
noise predictor,

    y* = argmin_y  E_{t, eps} || eps - eps_theta(x_t, t, y) ||^2,
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,

estimated with S pairs (t_j, eps_j) per image that every class shares (paired noise: the
class-independent part of the error cancels in the comparison). t_j is stratified, one in each
of S equal bins of 0..T-1 at a per-image random offset; eps_j ~ N(0, I) from (key, image index).
One compiled program per (batch, S, classes): the classes are rows of one model call per
pair, and the pairs are a `lax.scan`.

For Gaussian class-conditional data with the exact noise predictor the expected error of class
y is a constant plus c_t^2 abar_t ||x - mu_y||^2, so the decision is the nearest class mean:
the Bayes decision for equal priors and isotropic covariance (tests/test_zero_shot.py).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedule import Schedule

Array = jax.Array


def _check(apply_fn: Any, num_samples: int, images: np.ndarray | Array) -> int:
    num_classes = getattr(apply_fn, "null_label", None)
    if num_classes is None:
        raise ValueError("the diffusion classifier needs a class-conditional model (an apply_fn "
                         "with null_label, e.g. ModelApply of a UNet with num_classes set); this "
                         "one is unconditional.")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: use an int >= 1, the (t, eps) pairs per "
                         "image (Li et al. use hundreds; 32-256 suffice on digits).")
    if np.ndim(images) != 4:
        raise ValueError(f"images must be [B, H, W, C] in [-1, 1]; got shape {np.shape(images)}.")
    return int(num_classes)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_samples", "num_classes"))
def _errors(apply_fn: Any, params: Any, alphas_cumprod: Array, images: Array, key: Array,
            rows: Array, *, num_samples: int, num_classes: int) -> Array:
    """[B, K] mean over S pairs of the per-pixel mean squared error of each class."""
    batch, image_shape = images.shape[0], images.shape[1:]
    num_timesteps = alphas_cumprod.shape[0]
    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(rows)                 # [B]
    offsets = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1 << 30)))(keys)
    classes = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), batch)      # class-major

    def one_pair(total: Array, j: Array) -> tuple[Array, None]:
        t = jnp.floor((j + offsets) * num_timesteps / num_samples).astype(jnp.int32)
        t = jnp.clip(t, 0, num_timesteps - 1)                                   # [B]
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), image_shape,
                                                   jnp.float32))(keys)
        abar = alphas_cumprod[t][:, None, None, None]
        x_t = jnp.sqrt(abar) * images.astype(jnp.float32) + jnp.sqrt(1.0 - abar) * eps
        out = apply_fn(params, jnp.tile(x_t, (num_classes, 1, 1, 1)), jnp.tile(t, num_classes),
                       classes)[..., :image_shape[-1]]
        err = jnp.mean(jnp.square(out - jnp.tile(eps, (num_classes, 1, 1, 1))), axis=(1, 2, 3))
        return total + err.reshape(num_classes, batch).T, None

    total, _ = jax.lax.scan(one_pair, jnp.zeros((batch, num_classes), jnp.float32),
                            jnp.arange(num_samples))
    return total / num_samples


def classify(apply_fn: Any, params: Any, schedule: Schedule, images: np.ndarray | Array,
             key: Array, *, num_samples: int = 64, batch_size: int = 64,
             example_offset: int = 0) -> dict[str, np.ndarray]:
    """The diffusion classifier on `images` [N, H, W, C] (floats in [-1, 1]).

    apply_fn: a class-conditional eps-predicting `(params, x_t, t, y) -> [B, H, W, >= C]`
    (`ModelApply`); num_samples: (t, eps) pairs per image, shared by every class; batch_size:
    images per compiled call (each call runs K * batch rows per pair). Image n's pairs depend
    only on (key, example_offset + n). Returns errors [N, K] (mean squared error per pixel,
    averaged over the pairs) and labels [N] int32 (the argmin).
    """
    num_classes = _check(apply_fn, num_samples, images)
    images = np.asarray(images, np.float32)
    count = images.shape[0]
    batch = min(batch_size, count)
    errors = np.empty((count, num_classes), np.float32)
    for start in range(0, count, batch):
        chunk = images[start:start + batch]
        real = chunk.shape[0]
        if real < batch:  # pad the last batch: one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        rows = jnp.arange(batch, dtype=jnp.int32) + example_offset + start
        out = _errors(apply_fn, params, schedule.alphas_cumprod, jnp.asarray(chunk), key, rows,
                      num_samples=int(num_samples), num_classes=num_classes)
        errors[start:start + real] = np.asarray(out)[:real]
    return dict(errors=errors, labels=np.argmin(errors, axis=1).astype(np.int32))


def confusion_matrix(true: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """[K, K] int64 counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(true, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def evaluate_zero_shot(apply_fn: Any, params: Any, schedule: Schedule, images_uint8: np.ndarray,
                       labels: np.ndarray, key: Array, *, num_samples: int,
                       batch_size: int = 64) -> dict[str, Any]:
    """Held-out accuracy of the diffusion classifier: images uint8 [N, H, W, C], labels [N].
    Returns accuracy, its standard error, the confusion matrix (list of lists), the
    predictions, num_images, num_samples, seconds and model rows per image (K S)."""
    start = time.time()
    x = images_uint8.astype(np.float32) / 127.5 - 1.0
    result = classify(apply_fn, params, schedule, x, key, num_samples=num_samples,
                      batch_size=batch_size)
    correct = result["labels"] == np.asarray(labels)
    accuracy = float(np.mean(correct))
    num_classes = result["errors"].shape[1]
    return dict(accuracy=accuracy,
                accuracy_stderr=float(np.sqrt(accuracy * (1 - accuracy) / len(correct))),
                confusion=confusion_matrix(labels, result["labels"], num_classes).tolist(),
                predictions=result["labels"], num_images=int(len(correct)),
                num_samples=int(num_samples), seconds=round(time.time() - start, 2),
                model_rows_per_image=int(num_classes * num_samples))


# ------------------------------------------------------------------ evaluate.py's section

def load_split_with_labels(dataset: str, split: str, data_dir: str | None, *, image_size: int,
                           channels: int, max_examples: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int64 [N]) of a prepared split, in stored order."""
    from ddpm_jax.data import builders
    from ddpm_jax.data.pipeline import SplitReader
    reader = SplitReader(dataset, split, data_dir, image_size, channels)
    count = len(reader) if max_examples is None else min(max_examples, len(reader))
    pairs = reader.read(range(count))
    images = np.stack([builders.fit_image(image, image_size, channels) for image, _ in pairs])
    return images, np.asarray([label for _, label in pairs], np.int64)


def zero_shot_section(apply_fn: Any, params: Any, schedule: Schedule, key: Array, *,
                      dataset: str, split: str, data_dir: str | None, image_size: int,
                      channels: int, num_samples: int, max_images: int | None,
                      batch_size: int, stem: str | None, where: str) -> tuple[dict[str, Any], str]:
    """evaluate.py's `--metrics zero_shot`: (summary, protocol line) of the diffusion
    classifier on the split; with `stem`, writes stem + '_zero_shot_confusion.png'."""
    from ddpm_jax import plots
    _check(apply_fn, num_samples, np.zeros((1, 1, 1, 1)))
    images, labels = load_split_with_labels(dataset, split, data_dir, image_size=image_size,
                                            channels=channels, max_examples=max_images)
    result = evaluate_zero_shot(apply_fn, params, schedule, images, labels, key,
                                num_samples=num_samples, batch_size=batch_size)
    result.pop("predictions")
    result.update(split=split)
    line = (f"zero-shot accuracy {100 * result['accuracy']:.2f}% (+- "
            f"{100 * result['accuracy_stderr']:.2f} s.e.): the diffusion classifier, argmin over "
            f"{apply_fn.null_label} classes of E||eps - eps(x_t, t, y)||^2 with {num_samples} "
            f"shared (t, eps) pairs per image, {result['num_images']} images of "
            f"{dataset}/{split}, {where}, {result['seconds']:.1f} s.")
    if stem is not None:
        result["confusion_png"] = stem + "_zero_shot_confusion.png"
        plots.save_matrix_plot(result["confusion_png"], np.asarray(result["confusion"]),
                               title=f"diffusion classifier on {dataset}/{split}: "
                                     f"{100 * result['accuracy']:.1f}%")
    return result, line
