"""Loads diffusers-format `UNet2DModel` checkpoints (the released DDPM models) into our UNet.

A checkpoint is a folder with `config.json` and `diffusion_pytorch_model.safetensors` (read with
`safetensors.numpy`, no torch needed) or `diffusion_pytorch_model.bin` (needs torch). The
google/ddpm-* repositories keep both at their root; a pipeline folder with a `unet/` subfolder
works too. Only the DDPM architecture is representable: single-head attention, sin-then-cos
timestep embedding with frequencies exp(-log(10000) i / (half - 1)) (diffusers
flip_sin_to_cos=False, freq_shift=1), TF-"SAME" downsampling (downsample_padding=0),
GroupNorm eps 1e-6; anything else is rejected with the field to blame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.unet import NORM_EPS, UNet, param_shapes

Array = jax.Array
Params = Any

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel's constructor defaults: a config.json written by an old diffusers omits newer keys.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None,
)

# Settings the DDPM architecture fixes: (diffusers field, required value, why).
_REQUIRED = (
    ("time_embedding_type", "positional", "only the sinusoidal timestep embedding is implemented"),
    ("flip_sin_to_cos", False, "our embedding is [sin, cos], the official DDPM order"),
    ("freq_shift", 1, "our frequencies are exp(-log(10000) i / (half - 1)), i.e. freq_shift=1"),
    ("center_input_sample", False, "inputs are expected in [-1, 1] already"),
    ("mid_block_type", "UNetMidBlock2D", "the middle is ResBlock, attention, ResBlock"),
    ("add_attention", True, "the middle block always has attention"),
    ("mid_block_scale_factor", 1, "residuals are not rescaled"),
    ("downsample_padding", 0, "TF-'SAME' stride-2 convs pad (0, 1), which is downsample_padding=0"),
    ("downsample_type", "conv", "downsampling is a stride-2 conv"),
    ("upsample_type", "conv", "upsampling is nearest-neighbour then a conv"),
    ("resnet_time_scale_shift", "default", "the time embedding is added, not a scale-shift"),
    ("class_embed_type", None, "class labels use a learned embedding table (num_class_embeds)"),
)


def _reject(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"cannot represent diffusers UNet2DModel config {field}={value!r}: {why}.")


def read_diffusers_config(path: str | Path) -> dict[str, Any]:
    """The folder's UNet2DModel config.json with diffusers' defaults filled in."""
    folder = _unet_folder(path)
    try:
        with open(folder / CONFIG_NAME, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({e}): download it again "
                         "with the model repository.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_NAME} holds a JSON {type(config).__name__}, not the "
                         "object of a UNet2DModel config: download it again.")
    return {**DIFFUSERS_DEFAULTS, **config}


def unet_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's constructor arguments for a diffusers UNet2DModel config (defaults filled)."""
    config = {**DIFFUSERS_DEFAULTS, **config}
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise _reject("_class_name", class_name, "only UNet2DModel checkpoints are supported")
    for field, required, why in _REQUIRED:
        if config[field] != required:
            raise _reject(field, config[field], f"{why} (need {required!r})")
    if config["act_fn"] not in ("silu", "swish"):
        raise _reject("act_fn", config["act_fn"], "the DDPM UNet uses swish (silu)")
    if config["norm_eps"] != NORM_EPS:
        raise _reject("norm_eps", config["norm_eps"], f"GroupNorm epsilon is fixed at {NORM_EPS}")
    num_groups = config["norm_num_groups"]
    if config["attn_norm_num_groups"] not in (None, num_groups):
        raise _reject("attn_norm_num_groups", config["attn_norm_num_groups"],
                      f"attention GroupNorms use norm_num_groups={num_groups}")

    channels = [int(c) for c in config["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise _reject("block_out_channels", channels, f"every entry must be a multiple of the first ({ch})")
    ch_mult = tuple(c // ch for c in channels)
    num_levels = len(channels)
    time_dim = config["time_embedding_dim"]
    if time_dim not in (None, 4 * ch):
        raise _reject("time_embedding_dim", time_dim, f"the time embedding has 4 * ch = {4 * ch} units")

    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != num_levels or len(up) != num_levels:
        raise _reject("down_block_types", down, "need one down and one up block type per block_out_channels")
    for field, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if any(kind not in kinds for kind in types):
            raise _reject(field, types, f"only {kinds} are supported")
    attn_levels = [level for level, kind in enumerate(down) if kind.startswith("Attn")]
    # up_block_types run from the lowest resolution to the highest.
    up_attn_levels = [num_levels - 1 - j for j, kind in enumerate(up) if kind.startswith("Attn")]
    if sorted(up_attn_levels) != attn_levels:
        raise _reject("up_block_types", up, f"attention must sit at the same resolutions as in "
                      f"down_block_types={down} (mirrored)")

    head_dim = config["attention_head_dim"]
    attended = [channels[level] for level in attn_levels] + [channels[-1]]
    if head_dim is not None and any(head_dim != c for c in attended):
        raise _reject("attention_head_dim", head_dim, f"attention is single-head, so it must be None or "
                      f"equal the attended channels {sorted(set(attended))}")

    sample_size = config["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    if attn_levels and not isinstance(sample_size, int):
        raise _reject("sample_size", sample_size, "attention resolutions are derived from the image size")
    attn_resolutions = tuple(sample_size // 2 ** level for level in attn_levels)

    num_classes = config["num_class_embeds"]
    return dict(
        ch=ch, ch_mult=ch_mult, num_res_blocks=int(config["layers_per_block"]),
        attn_resolutions=attn_resolutions, dropout=float(config["dropout"]),
        out_channels=int(config["out_channels"]),
        # A diffusers table of N rows maps to our num_classes = N - 1 (+ 1 null row): the same rows
        # for the same integer labels, so label N - 1 plays our "null class".
        num_classes=None if num_classes is None else int(num_classes) - 1,
        num_groups=int(num_groups),
    )


def load_diffusers_unet(path: str | Path, *, dtype: Any = jnp.float32) -> tuple[UNet, Params]:
    """Loads a diffusers UNet2DModel folder as (model, params), params float32 on the host.

    `model.apply({"params": params}, x, t, train=False)` with x: [B, H, W, C] (NHWC) in [-1, 1]
    and t: [B] int equals the PyTorch model on the NCHW transpose of x.
    """
    folder = _unet_folder(path)
    config = read_diffusers_config(folder)
    model = UNet(**unet_kwargs_from_diffusers(config), dtype=dtype)
    size = config["sample_size"] or 2 ** (len(model.ch_mult) - 1)  # shapes do not depend on it
    height, width = (size, size) if isinstance(size, int) else size
    shapes = param_shapes(model, (height, width, int(config["in_channels"])))
    params = convert_state_dict(_load_state_dict(folder), shapes, num_levels=len(model.ch_mult))
    return model, params


def load_diffusers_run(path: str | Path) -> tuple[Any, UNet, Params]:
    """(config, model, params) of a diffusers UNet2DModel folder, as
    `runs.load_for_sampling` gives for a work dir (which calls this for a diffusers_dir). The config holds the image shape
    (data), the paper's diffusion (linear 1e-4..0.02, T=1000, eps) and its sampling settings,
    with the variance of the official sampling scripts: fixedlarge for CIFAR-10 (below 64 px),
    fixedsmall for 256 px."""
    import ml_collections  # only here: the rest of the module takes plain arguments

    unet_config = read_diffusers_config(path)
    model, params = load_diffusers_unet(path)
    size = unet_config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    var_type = "fixedlarge" if size < 64 else "fixedsmall"
    config = ml_collections.ConfigDict(dict(
            data=dict(image_size=size, channels=unet_config["in_channels"]),
            diffusion=dict(schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           mean_type="eps", var_type=var_type),
            sampling=dict(sampler="ddpm", steps=None, eta=0.0, spacing="time", order=2,
                          threshold=None, clip_denoised=True, batch_size=64, var_type=var_type)))
    return config, model, params


def convert_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Params, *, num_levels: int) -> Params:
    """Maps diffusers tensors onto our parameter tree (shapes: ShapeDtypeStructs from param_shapes)."""
    remaining = dict(state_dict)
    converted = {}
    for path, expected in flax.traverse_util.flatten_dict(shapes).items():
        candidates = _diffusers_keys(path, num_levels)
        key = next((k for k in candidates if k in remaining), None)
        if key is None:
            raise ValueError(f"checkpoint has no tensor {candidates[0]!r} (for our parameter "
                             f"{'/'.join(path)}): the weights do not match config.json.")
        tensor = np.asarray(remaining.pop(key), dtype=np.float32)
        # Aliases of the same tensor (Conv2d_0 beside conv, pre-0.14 attention names) go too.
        for alias in candidates:
            remaining.pop(alias, None)
        value = _to_flax(tensor, path[-1])
        if value.shape != tuple(expected.shape):
            raise ValueError(f"tensor {key!r} has shape {tensor.shape}, which maps to {value.shape}, but "
                             f"our parameter {'/'.join(path)} needs {tuple(expected.shape)}: the weights "
                             "do not match config.json.")
        converted[path] = jnp.asarray(value)
    if remaining:
        raise ValueError(f"checkpoint tensors not used by the model built from config.json: "
                         f"{sorted(remaining)[:8]}{' ...' if len(remaining) > 8 else ''}.")
    return flax.traverse_util.unflatten_dict(converted)


_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_RESBLOCK = {"norm_0": "norm1", "conv_0": "conv1", "time_proj": "time_emb_proj", "norm_1": "norm2",
             "conv_1": "conv2", "shortcut": "conv_shortcut"}
# Current diffusers names first, then the pre-0.14 AttentionBlock names the released files may use.
_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
         "proj_out": ("to_out.0", "proj_attn")}
_TOP = {"conv_in": "conv_in", "time_dense_0": "time_embedding.linear_1",
        "time_dense_1": "time_embedding.linear_2", "class_embed": "class_embedding",
        "norm_out": "conv_norm_out", "conv_out": "conv_out", "mid_block_0": "mid_block.resnets.0",
        "mid_block_1": "mid_block.resnets.1", "mid_attn": "mid_block.attentions.0"}


def _diffusers_keys(path: tuple[str, ...], num_levels: int) -> list[str]:
    """Candidate diffusers keys for one of our parameter paths, preferred first."""
    module, leaf = path[0], _LEAF[path[-1]]
    is_attn = module == "mid_attn"
    if module in _TOP:
        prefix = _TOP[module]
    elif match := re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", module):
        direction, level, kind, index = match.groups()
        # diffusers numbers up_blocks from the lowest resolution; we number levels by resolution.
        block = int(level) if direction == "down" else num_levels - 1 - int(level)
        base = f"{direction}_blocks.{block}"
        if kind in ("downsample", "upsample"):
            return [f"{base}.{kind}rs.0.{name}.{leaf}" for name in ("conv", "Conv2d_0")]
        is_attn = kind == "attn"
        prefix = f"{base}.{'attentions' if is_attn else 'resnets'}.{index}"
    else:
        raise ValueError(f"no diffusers name known for our parameter {'/'.join(path)}.")
    if is_attn:
        return [f"{prefix}.{name}.{leaf}" for name in _ATTN[path[1]]]
    if len(path) == 3:
        return [f"{prefix}.{_RESBLOCK[path[1]]}.{leaf}"]
    return [f"{prefix}.{leaf}"]


def _to_flax(tensor: np.ndarray, leaf: str) -> np.ndarray:
    """torch layouts -> flax: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if leaf == "kernel" and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if leaf == "kernel" and tensor.ndim == 2:
        return tensor.T
    return tensor


def _unet_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder: pass the directory holding {CONFIG_NAME} and {WEIGHT_NAMES[0]} "
            "(e.g. from `hf download google/ddpm-cifar10-32 --local-dir DIR`).")
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet" / CONFIG_NAME).is_file():
        return folder / "unet"
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} (nor in {folder / 'unet'}): download the "
                                "whole model repository, not only the weights.")
    return folder


def _load_state_dict(folder: Path) -> dict[str, np.ndarray]:
    safetensors_file, bin_file = (folder / name for name in WEIGHT_NAMES)
    if safetensors_file.is_file():
        from safetensors.numpy import load_file

        try:
            return load_file(str(safetensors_file))
        except Exception as e:  # safetensors' own error type: a truncated or damaged file
            raise ValueError(f"{safetensors_file} cannot be read ({type(e).__name__}: {e}); it is "
                             "truncated or damaged: download it again.") from None
    if bin_file.is_file():
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{bin_file} is a PyTorch pickle and reading it needs torch, which is not "
                              f"installed: install torch, or download {WEIGHT_NAMES[0]} instead.") from err
        state_dict = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {key: value.float().numpy() for key, value in state_dict.items()}
    raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]} next "
                            f"to {CONFIG_NAME}.")
