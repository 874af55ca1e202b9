"""Visual Anagrams (Geng et al. 2024): one image denoised under several views at once.

A view v is an invertible array transform of the image's spatial axes (a rotation, a flip, the
transpose, a fixed pixel permutation): all of them permute pixels, so they are orthogonal and
keep i.i.d. Gaussian noise i.i.d. Gaussian. With views v_1..v_N and one class y_i per view,
every step of the chain uses

    eps~(x_t, t) = (1/N) sum_i v_i^{-1}( eps_theta(v_i(x_t), t, y_i) )

and the image reads as y_1 under v_1 and y_2 under v_2 (a 6 that is a 9 upside down).

This is a model call (`ViewsApply`, an apply_fn wrapping another) and per-row data (the N
classes of each row, packed into the one label per row the chain already carries:
`pack_labels`), so it runs in the one compiled chain with every sampler, and with
classifier-free guidance: the null label unpacks to the null label of every view, and the
guided combination is linear, so it equals the average of the per-view guided predictions.

    views = make_views(["identity", "rot180"], image_shape=(8, 8, 1))
    apply_fn = ViewsApply(ModelApply(model), views)
    sampler = make_sampler(apply_fn, schedule, (B, 8, 8, 1), spec, guidance=1.0)
    images = sampler(params, key, labels=pack_labels([[6, 9]] * B, 10))["images"]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Transform = Callable[[Array], Array]  # [B, H, W, C] -> [B, H, W, C]


@dataclasses.dataclass(frozen=True)
class View:
    """An invertible transform of images [B, H, W, C] (spatial axes 1, 2) and its inverse.
    permutation: for a pixel permutation, the flat source index of each output pixel
    (a tuple, so views hash and key the compile cache); None for the named transforms."""

    name: str
    forward: Transform
    inverse: Transform
    permutation: tuple[int, ...] | None = None

    def __call__(self, x: Array) -> Array:
        return self.forward(x)


def _identity(x: Array) -> Array:
    return x


def _rot90(x: Array) -> Array:
    return jnp.rot90(x, 1, axes=(1, 2))


def _rot180(x: Array) -> Array:
    return jnp.rot90(x, 2, axes=(1, 2))


def _rot270(x: Array) -> Array:
    return jnp.rot90(x, 3, axes=(1, 2))


def _flip_h(x: Array) -> Array:  # left-right
    return jnp.flip(x, axis=2)


def _flip_v(x: Array) -> Array:  # upside down (a mirror, not a rotation)
    return jnp.flip(x, axis=1)


def _transpose(x: Array) -> Array:
    return jnp.swapaxes(x, 1, 2)


VIEWS = {"identity": View("identity", _identity, _identity),
         "rot90": View("rot90", _rot90, _rot270),
         "rot180": View("rot180", _rot180, _rot180),
         "rot270": View("rot270", _rot270, _rot90),
         "flip_h": View("flip_h", _flip_h, _flip_h),
         "flip_v": View("flip_v", _flip_v, _flip_v),
         "transpose": View("transpose", _transpose, _transpose)}
SQUARE_ONLY = ("rot90", "rot270", "transpose")  # they swap H and W


@dataclasses.dataclass(frozen=True)
class _Gather:
    """x -> x's pixels in the order `index` (flat over H*W), per channel."""

    index: tuple[int, ...]

    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        flat = x.reshape(batch, height * width, channels)
        return jnp.take(flat, jnp.asarray(self.index, jnp.int32), axis=1).reshape(x.shape)


def permutation_view(permutation: Sequence[int] | np.ndarray, name: str = "permutation") -> View:
    """The view that moves pixel permutation[k] (flat index over H*W) to position k.
    ValueError (one line) when `permutation` is not a permutation of 0..H*W-1: such a map
    drops or repeats pixels and has no inverse."""
    perm = np.asarray(permutation)
    if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer) or \
            not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise ValueError(f"view {name!r} is not invertible: its pixel map must be a permutation "
                         f"of 0..{perm.size - 1} (each pixel exactly once); got {perm.size} "
                         f"entries with {perm.size - np.unique(perm).size} repeats.")
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    index = tuple(int(i) for i in perm)
    return View(name, _Gather(index), _Gather(tuple(int(i) for i in inverse)), index)


def random_permutation_view(image_shape: Sequence[int], seed: int = 0) -> View:
    """A fixed random pixel permutation of H*W pixels (the paper's 'jigsaw'-like views are
    permutations too)."""
    height, width = image_shape[:2]
    return permutation_view(np.random.default_rng(seed).permutation(height * width),
                            name=f"permutation{seed}")


def check_view(view: View, image_shape: Sequence[int]) -> None:
    """ValueError (one line) unless view keeps [1, H, W, C] and its inverse undoes it exactly
    (both ways), on a probe array whose every entry differs."""
    shape = (1,) + tuple(image_shape)
    probe = jnp.arange(int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
    out = view.forward(probe)
    if tuple(out.shape) != shape:
        raise ValueError(f"view {view.name!r} maps images of shape {shape[1:]} to "
                         f"{tuple(out.shape)[1:]}; a view must keep the shape (square images "
                         f"for {', '.join(SQUARE_ONLY)}).")
    if not (np.array_equal(np.asarray(view.inverse(out)), np.asarray(probe)) and
            np.array_equal(np.asarray(view.forward(view.inverse(probe))), np.asarray(probe))):
        raise ValueError(f"view {view.name!r} is not invertible: its inverse does not undo it; "
                         "give the exact inverse transform.")
    if not np.array_equal(np.sort(np.asarray(out).ravel()), np.asarray(probe).ravel()):
        raise ValueError(f"view {view.name!r} is not a pixel permutation: it would change the "
                         "noise's distribution; use rotations, flips, the transpose or "
                         "permutation_view.")


def make_views(names: Sequence[str | View], image_shape: Sequence[int]) -> tuple[View, ...]:
    """Views by name ('identity', 'rot90', 'rot180', 'rot270', 'flip_h', 'flip_v', 'transpose',
    'permutationS': the fixed permutation of seed S) or given as `View`s, each checked."""
    if len(names) < 1:
        raise ValueError("views: name at least one view, e.g. 'identity,rot180'.")
    views = []
    for name in names:
        if isinstance(name, View):
            view = name
        elif name in VIEWS:
            view = VIEWS[name]
        elif isinstance(name, str) and name.startswith("permutation") and \
                name[len("permutation"):].isdigit():
            view = random_permutation_view(image_shape, int(name[len("permutation"):]))
        else:
            raise ValueError(f"unknown view {name!r}: choose from {', '.join(VIEWS)} or "
                             "'permutationS' (a fixed pixel permutation of seed S).")
        check_view(view, image_shape)
        views.append(view)
    return tuple(views)


# ------------------------------------------------------------------------------ labels

def pack_labels(labels: Sequence[Sequence[int]] | np.ndarray, null_label: int) -> np.ndarray:
    """[B, N] classes (one per view, each in 0..null_label, the null label included) -> [B]
    int32 codes sum_i y_i (null_label + 1)^i: the one label per row that the chain carries.
    The code of all-null is `packed_null(null_label, N)`."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be [B, N] ints, one class per view; got {labels.dtype} "
                         f"{labels.shape}.")
    if labels.min() < 0 or labels.max() > null_label:
        raise ValueError(f"labels must lie in 0..{null_label - 1} (or {null_label}, the null "
                         f"label); got {labels.min()}..{labels.max()}.")
    base = null_label + 1
    if base ** labels.shape[1] > np.iinfo(np.int32).max:
        raise ValueError(f"{labels.shape[1]} views of {null_label} classes do not pack into "
                         "one int32 label per row; use fewer views.")
    return (labels.astype(np.int64) * base ** np.arange(labels.shape[1])).sum(1).astype(np.int32)


def packed_null(null_label: int, num_views: int) -> int:
    """The packed code of the null label in every view."""
    return int(sum(null_label * (null_label + 1) ** i for i in range(num_views)))


def unpack_labels(codes: Array, null_label: int, num_views: int) -> Array:
    """[B] codes -> [N, B] classes (inverse of `pack_labels`)."""
    base = null_label + 1
    return jnp.stack([(codes // base ** i) % base for i in range(num_views)])


# --------------------------------------------------------------------------- the model

@dataclasses.dataclass(frozen=True)
class ViewsApply:
    """`(params, x_t, t, y) -> (1/N) sum_i v_i^{-1}(apply_fn(params, v_i(x_t), t, y_i))`: a
    class-conditional apply_fn (with `null_label`) under N views; y [B] are packed per-view
    classes (`pack_labels`). The N views run as one call of N*B rows. Every output channel
    (eps and a learned variance alike) is mapped back by the inverse view."""

    apply_fn: Any
    views: tuple[View, ...]

    def __post_init__(self) -> None:
        if getattr(self.apply_fn, "null_label", None) is None:
            raise ValueError("views need a class-conditional model (one class per view): this "
                             "model is unconditional; train with model.num_classes set.")
        if not self.views:
            raise ValueError("views: name at least one view.")

    @property
    def null_label(self) -> int:
        """The packed code of the null label in every view (classifier-free guidance's)."""
        return packed_null(self.apply_fn.null_label, len(self.views))

    @property
    def num_classes(self) -> int:
        return self.apply_fn.null_label

    def __call__(self, params: Any, x_t: Array, t: Array, y: Array | None = None) -> Array:
        num, batch = len(self.views), x_t.shape[0]
        if y is None:
            y = jnp.full((batch,), self.null_label, jnp.int32)
        per_view = unpack_labels(y, self.apply_fn.null_label, num)             # [N, B]
        stacked = jnp.concatenate([view.forward(x_t) for view in self.views])  # [N*B, ...]
        out = self.apply_fn(params, stacked, jnp.tile(t, num), per_view.reshape(-1))
        parts = jnp.split(out, num)
        return sum(view.inverse(part) for view, part in zip(self.views, parts)) / num


def view_tiles(images: np.ndarray, views: Sequence[View]) -> np.ndarray:
    """Each image under each view, image-major: [N, H, W, C] -> [N * V, H, W, C] (for a grid
    with V tiles per image, v_i(x) reading as y_i)."""
    shown = [np.asarray(view.forward(jnp.asarray(images))) for view in views]
    return np.stack(shown, axis=1).reshape((-1,) + images.shape[1:])
