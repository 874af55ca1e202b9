"""InceptionV3 as used for FID: the TensorFlow "2015-12-05" graph, in Flax linen.

The structure is that of pytorch-fid's `fid_inception_v3` (torchvision's InceptionV3 with the
FID graph's quirks), so its released weights load one-to-one:
  * the 3x3 average pools inside the A, C and first E blocks exclude the zero padding from the
    average (`count_include_pad=False`, TensorFlow's behaviour);
  * the last E block (Mixed_7c) max-pools in its pool branch instead of average-pooling;
  * the classifier has 1008 outputs (the graph's class count), no auxiliary head.
Outputs: `pool3`, the 2048-d global average pool of Mixed_7c (the FID features), and `logits`
[B, 1008] = pool3 @ W without the bias, as the original Inception Score code takes them from
the graph's `softmax/logits/MatMul` (torchmetrics/torch-fidelity call these "logits_unbiased").

Weights: `pt_inception-2015-12-05-6726825d.pth` from pytorch-fid's GitHub release
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth),
a port of http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz; its
SHA-256 starts with 6726825d (the torch-hub naming convention). Nothing is downloaded here:
pass the local file to `load_inception_weights` (.pth, read with torch; or an .npz of the
same state-dict keys, e.g. written by `export_npz`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

Array = jax.Array

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
NUM_CLASSES = 1008
FEATURE_DIM = 2048


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, torchvision's
    BasicConv2d. Padding is explicit and symmetric, as in PyTorch."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: Array) -> Array:
    # TensorFlow's SAME average pool ignores padded zeros (pytorch-fid's count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_stride2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = BasicConv(64, 1, name="branch1x1")(x)
        b5 = BasicConv(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        b1 = BasicConv(192, 1, name="branch1x1")(x)
        b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = BasicConv(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool_branch=True` is the FID graph's Mixed_7c (pytorch-fid's FIDInceptionE_2)."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = BasicConv(320, 1, name="branch1x1")(x)
        b3 = BasicConv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)],
                             axis=-1)
        bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                             axis=-1)
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = BasicConv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3. Input: uint8 images [B, H, W, C] (C = 1 is repeated to 3), resized
    bilinearly (half-pixel centres, no antialiasing, as torch's align_corners=False) to
    `resize_to` and scaled to [-1, 1]. Returns dict(pool3 [B, 2048], logits [B, 1008]).

    `resize_to` is 299 for real scores; any size >= 75 runs (smaller sizes only for tests).
    """

    resize_to: int = 299

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"InceptionV3 takes images [B, H, W, 1 or 3], got {images.shape}.")
        if self.resize_to < 75:
            raise ValueError(f"resize_to={self.resize_to} is below InceptionV3's minimum of 75.")
        x = images.astype(jnp.float32) / 255.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = jax.image.resize(x, (x.shape[0], self.resize_to, self.resize_to, 3), "bilinear",
                             antialias=False)
        x = 2.0 * x - 1.0
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        # The bias of `fc` is loaded (and used by nothing here): the IS reference omits it.
        kernel = self.param("fc_kernel", nn.initializers.lecun_normal(),
                            (FEATURE_DIM, NUM_CLASSES))
        self.param("fc_bias", nn.initializers.zeros, (NUM_CLASSES,))
        return dict(pool3=pool3, logits=pool3 @ kernel)


def variable_shapes() -> dict[str, Any]:
    """{"params", "batch_stats"} as `jax.ShapeDtypeStruct`s, traced abstractly (no compute)."""
    model = InceptionV3(resize_to=75)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.uint8))


def random_variables(seed: int = 0) -> dict[str, Any]:
    """Random variables of the right shapes, drawn with NumPy (for tests: `Module.init` would
    run the whole network). Kernels ~ N(0, 2 / fan_in) keep ReLU activations O(1); batch
    statistics are the identity (mean 0, var 1)."""
    rng = np.random.RandomState(seed)
    out = {}
    for path, leaf in flatten_dict(variable_shapes()).items():
        if path[-1] in ("kernel", "fc_kernel"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.randn(*leaf.shape) * np.sqrt(2.0 / fan_in)
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        out[path] = jnp.asarray(value, dtype=jnp.float32)
    return unflatten_dict(out)


# ------------------------------------------------------------------------------------ weights

def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _torch_name(path: Sequence[str]) -> str:
    """Flax variable path -> pytorch-fid state-dict key."""
    *modules, leaf = path
    if modules == [] and leaf in ("fc_kernel", "fc_bias"):
        return "fc.weight" if leaf == "fc_kernel" else "fc.bias"
    table = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
             ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
             ("bn", "var"): "bn.running_var"}
    return ".".join(modules[:-1] + [table[(modules[-1], leaf)]])


def _to_flax(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("conv.weight"):
        return value.transpose(2, 3, 1, 0)        # [O, I, kh, kw] -> [kh, kw, I, O]
    if name == "fc.weight":
        return value.T                            # [1008, 2048] -> [2048, 1008]
    return value


def state_dict_to_variables(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """Maps a pytorch-fid state dict (name -> array) onto this module's variables."""
    flat = flatten_dict(variable_shapes())
    out, used = {}, set()
    for path, shape_dtype in flat.items():
        name = _torch_name(path[1:])
        if name not in state_dict:
            raise ValueError(f"Inception weights lack {name!r}; is this pytorch-fid's "
                             f"{FID_WEIGHTS_FILENAME} (or an .npz export of it)?")
        value = _to_flax(name, np.asarray(state_dict[name], dtype=np.float32))
        if value.shape != shape_dtype.shape:
            raise ValueError(f"Inception weight {name!r} has shape {value.shape} after "
                             f"transposition, expected {shape_dtype.shape}.")
        out[path] = jnp.asarray(value)
        used.add(name)
    extra = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise ValueError(f"Inception weights hold unexpected entries {extra[:5]}...; expected "
                         f"pytorch-fid's FID InceptionV3 ({FID_WEIGHTS_FILENAME}).")
    return unflatten_dict(out)


def variables_to_state_dict(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `state_dict_to_variables` (pytorch layouts), e.g. for an .npz export."""
    out = {}
    for path, value in flatten_dict(variables).items():
        name = _torch_name(path[1:])
        value = np.asarray(value)
        if name.endswith("conv.weight"):
            value = value.transpose(3, 2, 0, 1)
        elif name == "fc.weight":
            value = value.T
        out[name] = value
    return out


def export_npz(state_dict_path: str, npz_path: str) -> None:
    """Converts pytorch-fid's .pth into an .npz of the same keys (no torch needed to load it)."""
    np.savez(npz_path, **_read_state_dict(state_dict_path))


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"Reading {path} needs PyTorch (pip install torch); or convert it "
                          "once to .npz with ddpm_jax.models.inception.export_npz on a machine "
                          "that has torch.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def load_inception_weights(path: str | os.PathLike, *,
                           check_hash: bool = True) -> tuple[dict[str, Any], str]:
    """Loads the FID Inception weights from a local file. Returns (variables, sha256 hex).

    path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs torch) or an .npz with
    the same state-dict keys. For a .pth, `check_hash` requires the SHA-256 to start with
    6726825d, so that a score is never computed with other Inception weights by mistake.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
                f"No Inception weights at {path!r}. Download {FID_WEIGHTS_FILENAME} (SHA-256 "
                f"prefix {FID_WEIGHTS_SHA256_PREFIX}) from {FID_WEIGHTS_URL} on a machine with "
                "network access and pass its local path (--inception_weights).")
    sha256 = file_sha256(path)
    if check_hash and not path.endswith(".npz") and not sha256.startswith(FID_WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"{path} has SHA-256 {sha256[:16]}..., not the FID weights' "
                         f"{FID_WEIGHTS_SHA256_PREFIX}...; use {FID_WEIGHTS_FILENAME} from "
                         f"{FID_WEIGHTS_URL} (or pass check_hash=False knowingly).")
    return state_dict_to_variables(_read_state_dict(path)), sha256
