"""Checksums of a pytree of arrays, as saved beside each checkpoint (ddpm_jax/checkpoint.py).

Orbax and tensorstore checksum no array data (only zarr3 shard indexes and the OCDBT manifest
carry CRC-32C), so a flipped byte inside array data that still decodes would load as other
weights. Per leaf: its path in the tree ("ema_params/Conv_0/kernel"), shape, dtype and the
CRC-32 of its bytes, from this process's first addressable copy. CRC-32 catches accidental
damage (bit flips, torn or truncated files), not deliberate tampering.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any


def _leaf_name(path: tuple[Any, ...]) -> str:
    """A tree path as "ema_params/Conv_0/kernel" (dict keys, attributes, indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _host_copy(x: Any) -> np.ndarray | None:
    """The whole value of a leaf on the host, from this process's first addressable copy;
    None when this process holds no whole copy (a sharded array)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        shard = x.addressable_data(0)
        if shard.shape != x.shape:
            return None
        x = shard
    return np.ascontiguousarray(np.asarray(x))


def _array_entry(x: Any) -> dict[str, Any]:
    host = _host_copy(x)
    if host is None:
        return {"shape": list(x.shape), "dtype": str(x.dtype), "crc32": None}
    return {"shape": list(host.shape), "dtype": str(host.dtype),
            "crc32": zlib.crc32(host.reshape(-1).view(np.uint8))}  # any dtype, 0-d too


def array_checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """{path in the tree: {"shape", "dtype", "crc32" of the bytes}} for every leaf of `tree`."""
    return {_leaf_name(path): _array_entry(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def config_crc32(config: Mapping[str, Any]) -> int:
    """CRC-32 of a JSON config (or any JSON-able dict, such as a data iterator's state),
    independent of key order."""
    return zlib.crc32(json.dumps(config, sort_keys=True).encode())
