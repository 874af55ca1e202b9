"""Parameter transforms for fine-tuning a trained run: what trains, LoRA, loading a base run.

A fine-tuning run trains a *trainable tree* and keeps the base run's parameters frozen outside
its state; `merge(base, trainable, transform)` makes the plain UNet parameters inside the train
step and the sampler (no second model class). The trainable tree of each method:

- ``full``: the whole parameter tree (merge returns it).
- ``lora``: ``{"lora": adapters, "rows": class rows}``: each targeted kernel W (a Dense
  [in, out], or a convolution [kh, kw, cin, out] read as a (kh*kw*cin) x out matrix) becomes
  W + (alpha / r) down @ up with down [in, r] and up [r, out] (Hu et al. 2021's A and B); up
  starts at zero, so the adapted model equals the base bit for bit at step 0.
- ``embedding``: ``{"rows": class rows}`` only (class-embedding inversion).
- ``control``: a ControlNet's branch (`models.controlnet`), merged as the ``control`` subtree
  beside the base's leaves (a ControlNet run, `ddpm_jax.control`; not a `finetune.method`).

``rows`` [k, D] are the trained rows of the class-embedding table (`EMBED_PATH`), written over
the base's table by row id; every other leaf of the merged tree is the base's, bit for bit.

Leaves are named by their tree path joined with "/" (``up_1_attn_0/q/kernel``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
Array = jax.Array

METHODS = ("full", "lora", "embedding")
EMBED_PATH = "class_embed/embedding"  # the UNet's class-embedding table [num_classes + 1, D]
# LoRA target groups: regular expressions over leaf paths (kernels only).
LORA_GROUPS = {
    "attn": r"(^|/)[^/]*attn_\d+/(q|k|v|proj_out)/kernel$",  # attention q, k, v and output
    "time": r"(^time_dense_\d+|/time_proj)/kernel$",         # time-embedding projections
    "conv": r"CONV",                                         # every 4-D (convolution) kernel
}


def path_of(key_path: Sequence[Any]) -> str:
    """A jax tree path -> 'a/b/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested parameter dict -> {'a/b/kernel': leaf}."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def nested(leaves: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/kernel': leaf} -> the nested dict."""
    return traverse_util.unflatten_dict(dict(leaves), sep="/")


@dataclasses.dataclass(frozen=True)
class Transform:
    """What a fine-tuning run trains (hashable: part of the train step's static settings).

    method: one of METHODS. lora_paths: the adapted kernels; rank r, alpha: the scale alpha / r.
    rows: class ids whose class-embedding rows train (lora, embedding; with full, the taught
    rows of the table, which trains whole); () for none. row_lr_scale: those rows' learning
    rate as a multiple of the run's (`scale_row_updates`). row_ema_warmup: their EMA warms up
    (`training.ema_decay_at` with warmup, forgetting their start) whatever the run's setting.
    """

    method: str
    lora_paths: tuple[str, ...] = ()
    rank: int = 4
    alpha: float = 4.0
    rows: tuple[int, ...] = ()
    row_lr_scale: float = 1.0
    row_ema_warmup: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_paths(shapes: PyTree, targets: Sequence[str]) -> tuple[str, ...]:
    """The kernels of `shapes` (a parameter tree of arrays or ShapeDtypeStructs) that the LoRA
    target groups (`LORA_GROUPS` keys) select, sorted; ValueError naming an unknown group."""
    unknown = [t for t in targets if t not in LORA_GROUPS]
    if unknown:
        raise ValueError(f"config.lora.targets={tuple(targets)!r}: unknown {unknown}; use some "
                         f"of {tuple(LORA_GROUPS)}.")
    chosen = []
    for path, leaf in flat(shapes).items():
        if not path.endswith("/kernel"):
            continue
        if any((len(leaf.shape) == 4) if LORA_GROUPS[t] == "CONV" else
               re.search(LORA_GROUPS[t], path) is not None for t in targets):
            chosen.append(path)
    return tuple(sorted(chosen))


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """A kernel's shape -> (rows, cols) of its matrix view: (prod of all but last, last)."""
    return int(np.prod(shape[:-1])), int(shape[-1])


def init_trainable(base: PyTree, transform: Transform, key: Array) -> PyTree:
    """The trainable tree at step 0 (see the module docstring) from the (already grown) base
    parameters: a copy of them (full), or adapters with down ~ N(0, 1 / in) and up = 0 plus a
    copy of the trained class rows."""
    if transform.method == "full":
        return jax.tree.map(jnp.copy, base)
    tree: dict[str, Any] = {}
    leaves = flat(base)
    if transform.method == "lora":
        adapters = {}
        keys = jax.random.split(key, max(len(transform.lora_paths), 1))
        for k, path in zip(keys, transform.lora_paths):
            rows, cols = _matrix_shape(leaves[path].shape)
            adapters[path + "/down"] = jax.random.normal(k, (rows, transform.rank),
                                                         jnp.float32) / np.sqrt(rows)
            adapters[path + "/up"] = jnp.zeros((transform.rank, cols), jnp.float32)
        tree["lora"] = nested(adapters)
    if transform.rows:
        tree["rows"] = jnp.asarray(leaves[EMBED_PATH])[np.asarray(transform.rows)]
    return tree


def taught_rows(tree: PyTree, transform: Transform) -> Array | None:
    """The taught class rows [k, D] of a trainable tree (or of its update or EMA): the ``rows``
    leaf (lora, embedding) or those rows of the whole table (full); None when none is taught."""
    if not transform.rows:
        return None
    if transform.method == "full":
        return flat(tree)[EMBED_PATH][np.asarray(transform.rows)]
    return tree.get("rows")


def with_taught_rows(tree: PyTree, rows: Array, transform: Transform) -> PyTree:
    """`tree` with its taught class rows (see `taught_rows`) replaced by rows [k, D]."""
    if transform.method == "full":
        leaves = flat(tree)
        table = jnp.asarray(leaves[EMBED_PATH])
        leaves[EMBED_PATH] = table.at[np.asarray(transform.rows)].set(rows)
        return nested(leaves)
    return {**tree, "rows": rows}


def scale_row_updates(direction: PyTree, transform: Transform) -> PyTree:
    """The optimizer's update direction of a trainable tree with the taught class rows' entries
    multiplied by transform.row_lr_scale (the rows then move at lr * row_lr_scale). Pure; the
    same tree when the scale is 1 or no row is taught."""
    rows = taught_rows(direction, transform)
    if transform.row_lr_scale == 1.0 or rows is None:
        return direction
    return with_taught_rows(direction, rows * jnp.float32(transform.row_lr_scale), transform)


def lora_delta(down: Array, up: Array, shape: Sequence[int], scale: float) -> Array:
    """(alpha / r) down @ up, reshaped to the kernel's shape. down: [in, r]; up: [r, out]."""
    return (scale * (down @ up)).reshape(shape)


def merge(base: PyTree, trainable: PyTree, transform: Transform) -> PyTree:
    """Plain UNet parameters: the base with the transform's trained parts applied (see the
    module docstring); pure and jittable. Leaves the transform does not touch are the base's
    own arrays, bit for bit."""
    if transform.method == "full":
        return trainable
    if transform.method == "control":  # ControlNet: the branch beside the base (models.controlnet)
        return {**base, "control": trainable}
    leaves = flat(base)
    if "lora" in trainable:
        adapters = flat(trainable["lora"])
        for path in transform.lora_paths:
            w = leaves[path]
            leaves[path] = w + lora_delta(adapters[path + "/down"], adapters[path + "/up"],
                                          w.shape, transform.scale).astype(w.dtype)
    if "rows" in trainable:
        leaves[EMBED_PATH] = leaves[EMBED_PATH].at[np.asarray(transform.rows)].set(
                trainable["rows"])
    return nested(leaves)


def count(tree: PyTree) -> tuple[int, int]:
    """(number of values, bytes) of a tree's leaves."""
    leaves = jax.tree.leaves(tree)
    return (sum(int(np.prod(x.shape)) for x in leaves),
            sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def grow_base(base: PyTree, shapes: PyTree, *, new_class: bool, where: str) -> PyTree:
    """The base run's parameters laid out for the fine-tuning model `shapes`, leaf by tree path.

    Every leaf of `shapes` takes the base's leaf of the same path and shape. With new_class the
    class-embedding table grows by one row: a base with N classes (rows 0..N-1, null row N)
    gives rows 0..N-1 as they were, row N (the new class) = a copy of the base's null row (the
    new class starts as the base's unconditional model) and row N+1 = the null row (the null
    label moves from N to N+1); an unconditional base (no table) gives a zero table [2, D]
    (class 0 new, null 1; zero rows add nothing to the time embedding, so the model still
    equals the base). ValueError with one line, prefixed by `where`, naming the first leaf
    that is missing, extra or of another shape.
    """
    have, want = flat(base), flat(shapes)
    out = {}
    for path, spec in want.items():
        if path == EMBED_PATH and new_class:
            rows, dim = spec.shape
            if path not in have:
                out[path] = jnp.zeros(spec.shape, spec.dtype)
                continue
            table = jnp.asarray(have[path])
            if table.shape != (rows - 1, dim):
                raise ValueError(f"{where}: leaf {path} has shape {tuple(table.shape)} in the base "
                                 f"run, but a new class needs ({rows - 1}, {dim}); fine-tune a "
                                 "base with model.num_classes one less than this model's.")
            null = table[-1:]
            out[path] = jnp.concatenate([table[:-1], null, null], axis=0)
            continue
        if path not in have:
            raise ValueError(f"{where}: leaf {path} {tuple(spec.shape)} of this model is not in "
                             "the base run (another architecture); use the base run's model "
                             "settings.")
        if tuple(have[path].shape) != tuple(spec.shape):
            raise ValueError(f"{where}: leaf {path} has shape {tuple(have[path].shape)} in the "
                             f"base run, {tuple(spec.shape)} in this model (another "
                             "architecture); use the base run's model settings.")
        out[path] = have[path]
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{where}: leaf {extra[0]} of the base run is not in this model "
                         f"({len(extra)} such leaves; another architecture); use the base run's "
                         "model settings.")
    return nested(out)
