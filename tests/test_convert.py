"""Loading diffusers UNet2DModel checkpoints: parity with PyTorch, key mapping, and the errors."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ddpm_jax.convert import _diffusers_keys, load_diffusers_unet, unet_kwargs_from_diffusers
from ddpm_jax.models.unet import UNet, count_params, param_shapes, timestep_embedding

# End-to-end through the loop, the command line or a reference framework: see pyproject's
# `slow` marker.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# The architecture of the released DDPM checkpoints, at test size: two levels, attention at 8x8.
SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=16, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
)
# google/ddpm-cifar10-32's config.json (diffusers omits nothing that differs from these).
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    act_fn="silu", mid_block_scale_factor=1, center_input_sample=False, time_embedding_type="positional",
)


def _write_checkpoint(folder: Path, config: dict, params, rename=lambda key: key) -> Path:
    """Writes our params in diffusers' layout (torch OIHW / [out, in]) without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
    num_levels = len(config["block_out_channels"])
    tensors = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        tensors[rename(_diffusers_keys(path, num_levels)[0])] = np.ascontiguousarray(value)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _random_params(model: UNet, image_shape):
    rng = np.random.default_rng(0)
    shapes = param_shapes(model, image_shape)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """(folder, our params) for the SMALL architecture, written without torch."""
    model = UNet(**unet_kwargs_from_diffusers(SMALL))
    params = _random_params(model, (16, 16, 3))
    return _write_checkpoint(tmp_path_factory.mktemp("small"), SMALL, params), params


def _assert_same_params(a, b):
    flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg="/".join(key))


def test_small_config_maps_to_our_arguments():
    assert unet_kwargs_from_diffusers(SMALL) == dict(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, out_channels=3,
        num_classes=None, num_groups=16)


def test_google_cifar10_config_is_the_papers_model():
    kwargs = unet_kwargs_from_diffusers(CIFAR10)
    assert kwargs == dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
                          out_channels=3, num_classes=None, num_groups=32)
    assert count_params(param_shapes(UNet(**kwargs), (32, 32, 3))) == 35_746_307


def test_roundtrip_reads_every_tensor_into_place(small_checkpoint):
    folder, params = small_checkpoint
    model, loaded = load_diffusers_unet(folder)
    assert model == UNet(**unet_kwargs_from_diffusers(SMALL))
    _assert_same_params(loaded, params)


@pytest.mark.slow
def test_safetensors_load_needs_no_torch(small_checkpoint):
    folder, _ = small_checkpoint
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from ddpm_jax.convert import load_diffusers_unet\n"
            f"model, params = load_diffusers_unet({str(folder)!r})\n"
            "print(sorted(params)[0])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_pre_0_14_attention_and_resampler_names_load_the_same(small_checkpoint, tmp_path):
    _, params = small_checkpoint
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn.",
           "downsamplers.0.conv.": "downsamplers.0.Conv2d_0."}

    def rename(key):
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        return key

    legacy = _write_checkpoint(tmp_path / "legacy", SMALL, params, rename)
    assert any(".query." in key for key in load_file(str(legacy / "diffusion_pytorch_model.safetensors")))
    _assert_same_params(load_diffusers_unet(legacy)[1], params)


def test_missing_files_are_named(small_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_diffusers_unet(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text((small_checkpoint[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="expected diffusion_pytorch_model.safetensors or "
                                                "diffusion_pytorch_model.bin"):
        load_diffusers_unet(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_garbage_config_json_is_named(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json (is not valid JSON|holds a "
                                         r"JSON list).*download it again"):
        load_diffusers_unet(tmp_path)


def test_a_truncated_safetensors_file_is_named(small_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((small_checkpoint[0] / "config.json").read_text())
    weights = (small_checkpoint[0] / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/diffusion_pytorch_model.safetensors cannot "
                                         r"be read .*truncated or damaged: download it again"):
        load_diffusers_unet(tmp_path)


def _rewrite(folder: Path, target: Path, edit) -> Path:
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(target / "diffusion_pytorch_model.safetensors"))
    return target


def test_wrong_shape_tensor_is_named(small_checkpoint, tmp_path):
    key = "down_blocks.1.attentions.0.to_q.weight"

    def edit(tensors):
        tensors[key] = np.zeros((64, 32), np.float32)

    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \(64, 32\).*down_1_attn_0/q/kernel "
                                         r"needs \(64, 64\)"):
        load_diffusers_unet(_rewrite(small_checkpoint[0], tmp_path / "bad", edit))


def test_missing_and_unexpected_tensors_are_named(small_checkpoint, tmp_path):
    def drop(tensors):
        del tensors["up_blocks.0.resnets.1.conv2.bias"]

    with pytest.raises(ValueError, match="no tensor 'up_blocks.0.resnets.1.conv2.bias'"):
        load_diffusers_unet(_rewrite(small_checkpoint[0], tmp_path / "missing", drop))

    def add(tensors):
        tensors["class_embedding.weight"] = np.zeros((10, 128), np.float32)

    with pytest.raises(ValueError, match=r"not used by the model.*\['class_embedding.weight'\]"):
        load_diffusers_unet(_rewrite(small_checkpoint[0], tmp_path / "extra", add))


@pytest.mark.parametrize("field, value, match", [
    ("flip_sin_to_cos", True, r"flip_sin_to_cos=True: our embedding is \[sin, cos\]"),
    ("freq_shift", 0, r"freq_shift=0: .*exp\(-log\(10000\) i / \(half - 1\)\)"),
    ("downsample_padding", 1, r"downsample_padding=1: TF-'SAME'"),
    ("attention_head_dim", 8, r"attention_head_dim=8: attention is single-head"),
    ("norm_eps", 1e-5, r"norm_eps=1e-05"),
    ("resnet_time_scale_shift", "scale_shift", r"resnet_time_scale_shift='scale_shift'"),
    ("act_fn", "gelu", r"act_fn='gelu'"),
    ("block_out_channels", (32, 48), r"block_out_channels=\[32, 48\]: every entry must be a multiple"),
    ("up_block_types", ("UpBlock2D", "UpBlock2D"), r"up_block_types=.*same resolutions"),
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"),
     r"down_block_types=.*only \('DownBlock2D', 'AttnDownBlock2D'\)"),
    ("_class_name", "UNet2DConditionModel", r"_class_name='UNet2DConditionModel'"),
])
def test_unrepresentable_configs_are_rejected(field, value, match):
    with pytest.raises(ValueError, match="cannot represent diffusers UNet2DModel config " + match):
        unet_kwargs_from_diffusers({**SMALL, field: value})


def test_old_configs_get_diffusers_defaults():
    # A config.json without attention_head_dim means diffusers' default 8: multi-head, rejected.
    config = {k: v for k, v in SMALL.items() if k != "attention_head_dim"}
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        unet_kwargs_from_diffusers(config)


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch: needs the `parity` extra (torch CPU + diffusers).


@pytest.fixture(scope="module")
def diffusers_unet():
    pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[parity]')")
    pytest.importorskip("diffusers", reason="parity tests need diffusers (pip install -e '.[parity]')")
    import torch
    from diffusers import UNet2DModel

    def build(folder: Path, config: dict, safe_serialization: bool = True):
        torch.manual_seed(0)
        model = UNet2DModel(**config).eval()
        with torch.no_grad():  # torch initialises GroupNorms to (1, 0): randomise them too
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_((name.endswith("weight")) + 0.1 * torch.randn_like(param))
        model.save_pretrained(folder, safe_serialization=safe_serialization)
        return model

    return build


def _compare(torch_model, folder: Path, t: list[int], labels: list[int] | None = None, tol: float = 1e-4):
    import torch

    model, params = load_diffusers_unet(folder)
    size, channels = torch_model.config.sample_size, torch_model.config.in_channels
    x = np.random.default_rng(1).standard_normal((len(t), channels, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x), torch.tensor(t),
                               None if labels is None else torch.tensor(labels)).sample.numpy()
    y = None if labels is None else jnp.asarray(labels)
    forward = jax.jit(functools.partial(model.apply, train=False))
    ours = np.asarray(forward({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), y))
    assert float(np.abs(expected).max()) > 0.1  # a real comparison, not zeros against zeros
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), expected, rtol=0, atol=tol)
    return model, params


def test_timestep_embedding_matches_diffusers(diffusers_unet):
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 10, 500, 999])
    expected = get_timestep_embedding(torch.tensor(t), 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    # Same formula; diffusers divides before exp, the official code (and we) multiply by
    # -log(10000) / (half - 1): one float32 ulp in a frequency, times t = 999, is ~3e-5.
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 128), expected.numpy(), atol=1e-4)


def test_parity_small(diffusers_unet, tmp_path):
    torch_model = diffusers_unet(tmp_path, SMALL)
    _compare(torch_model, tmp_path, t=[0, 1, 500, 999])


def test_parity_small_from_bin_with_class_labels(diffusers_unet, tmp_path):
    torch_model = diffusers_unet(tmp_path, {**SMALL, "num_class_embeds": 4}, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    model, _ = _compare(torch_model, tmp_path, t=[3, 250, 998], labels=[0, 3, 1])
    assert model.num_classes == 3  # 4 diffusers rows = our 3 classes + the null row


def test_parity_cifar10(diffusers_unet, tmp_path):
    torch_model = diffusers_unet(tmp_path, CIFAR10)
    _, params = _compare(torch_model, tmp_path, t=[10, 900])
    assert count_params(params) == 35_746_307
