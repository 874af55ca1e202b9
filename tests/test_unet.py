"""The UNet: official parameter counts, shapes, zero-init head, dtypes, remat, conditioning, and
the config checks that reject impossible architectures."""

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs` lives at the repo root

from configs import celebahq, cifar10, digits, lsun_bedroom, lsun_cat, lsun_church  # noqa: E402
from ddpm_jax.config import model_from_config, validate  # noqa: E402
from ddpm_jax.models.unet import UNet, count_params, param_shapes, timestep_embedding  # noqa: E402

CONFIG_MODULES = (cifar10, celebahq, lsun_church, lsun_bedroom, lsun_cat, digits)
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8)
# Compiling initialisers is slow on a CPU (8-25 s for TINY): only this one-level model is initialised
# for real; the other tests draw random parameters from the shapes.
MINIMAL = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=8)
SHAPE = (2, 8, 8, 3)


def _inputs(batch: int = SHAPE[0]):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, *SHAPE[1:]))
    t = jnp.array([0, 999, 500, 17][:batch], dtype=jnp.int32)
    return x, t


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _apply(model: UNet, params, x, t, y=None, *, train: bool = False, dropout_key=None):
    """Jitted once per (model, shapes): eager flax would compile every primitive separately."""
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)


def _shapes(model: UNet, shape=SHAPE, y=None):
    """(parameter ShapeDtypeStructs, output ShapeDtypeStruct) without compiling anything."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    out, variables = jax.eval_shape(
        lambda x, t: model.init_with_output(jax.random.PRNGKey(0), x, t, y, train=False), x, t)
    return variables["params"], out


def _random_params(shapes, scale: float = 0.1):
    """N(0, scale^2) for every parameter (GroupNorm scales around 1), none zero as at init."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + scale * rng.standard_normal(leaf.shape, np.float32))

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_model_and_params():
    model = UNet(**TINY)
    return model, _random_params(_shapes(model)[0])


@pytest.fixture(scope="module")
def minimal_model_and_params():
    """One level (ResBlocks, the middle attention, no resampling): the cheapest graph to compile."""
    model = UNet(**MINIMAL)
    return model, _random_params(_shapes(model)[0])


@pytest.mark.parametrize("module, expected", [(cifar10, 35_746_307), (celebahq, 113_673_219),
                                              (lsun_church, 113_673_219), (lsun_bedroom, 113_673_219),
                                              (lsun_cat, 113_673_219)])
def test_parameter_count_matches_official_model(module, expected):
    config = module.get_config()
    model = model_from_config(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    assert count_params(param_shapes(model, image_shape)) == expected


@pytest.mark.parametrize("variant, expected", [(None, 1_623_169), ("16px", 1_112_801)])
def test_digits_configs_have_their_documented_sizes(variant, expected):
    # The default equals the diffusers digits peer's UNet2DModel (32, 64, 64), 2 layers per block,
    # attention at 4x4 and in the middle: 1,623,169 parameters (bench/quality_digits.py builds it).
    config = digits.get_config(variant)
    validate(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    assert count_params(param_shapes(model_from_config(config), image_shape)) == expected


def test_one_attention_block_per_res_block_at_16px():
    # 2 down + 3 up attention blocks at 16x16 plus the middle one: 6 (score_sde's port has 4).
    shapes = param_shapes(model_from_config(cifar10.get_config()), (32, 32, 3))
    attn = sorted(name for name in shapes if "attn" in name)
    assert attn == ["down_1_attn_0", "down_1_attn_1", "mid_attn", "up_1_attn_0", "up_1_attn_1",
                    "up_1_attn_2"]


def test_timestep_embedding_is_sin_then_cos():
    t = np.array([0, 1, 37, 999])
    dim = 16
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    # float32 arguments: t * freq near 999 carries an absolute rounding error of ~6e-5.
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)


def test_fresh_network_outputs_exactly_zero():
    model = UNet(**MINIMAL)
    x, t = _inputs()
    params = jax.jit(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False)["params"])(x, t)
    out = _apply(model, params, x, t)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)  # zero-initialised conv_out
    # ... and zero-initialised last layers in every block; the rest is Glorot-uniform.
    for block, layer in (("down_0_block_0", "conv_1"), ("mid_attn", "proj_out"), ("conv_out", None)):
        kernel = params[block][layer]["kernel"] if layer else params[block]["kernel"]
        assert not np.any(np.asarray(kernel))
    kernel = np.asarray(params["conv_in"]["kernel"])  # [3, 3, 3, 16]: fan_avg = 9 * (3 + 16) / 2
    limit = np.sqrt(3.0 / (9 * (3 + 16) / 2))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit


def test_output_channels_default_to_input_and_can_be_doubled():
    assert _shapes(UNet(**TINY))[1].shape == SHAPE
    assert _shapes(UNet(**TINY), (2, 8, 8, 1))[1].shape == (2, 8, 8, 1)
    assert _shapes(UNet(**TINY, out_channels=6))[1].shape == (*SHAPE[:3], 6)  # learned variances


def test_output_depends_on_x_and_t(tiny_model_and_params):
    model, params = tiny_model_and_params
    x, t = _inputs()
    out = _apply(model, params, x, t)
    assert float(jnp.abs(out).max()) > 1e-3
    assert not np.allclose(out, _apply(model, params, x, t + 1))
    assert not np.allclose(out, _apply(model, params, -x, t))


def test_images_in_a_batch_do_not_interact(tiny_model_and_params):
    # GroupNorm and attention must act per image: a batch of 2 equals two batches of 1.
    model, params = tiny_model_and_params
    x, t = _inputs()
    together = _apply(model, params, x, t)
    alone = _apply(model, params, x[1:], t[1:])
    np.testing.assert_allclose(together[1:], alone, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(minimal_model_and_params):
    _, params = minimal_model_and_params
    model = UNet(**MINIMAL, dropout=0.5)
    x, t = _inputs()
    a = _apply(model, params, x, t, train=True, dropout_key=jax.random.PRNGKey(0))
    b = _apply(model, params, x, t, train=True, dropout_key=jax.random.PRNGKey(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(_apply(model, params, x, t), _apply(UNet(**MINIMAL), params, x, t))


def test_bfloat16_compute_keeps_float32_params(minimal_model_and_params):
    model, params = minimal_model_and_params
    bf16 = UNet(**MINIMAL, dtype=jnp.bfloat16)
    bf16_params, bf16_out = _shapes(bf16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    assert bf16_out.dtype == jnp.float32
    x, t = _inputs()
    ref = _apply(model, params, x, t)
    out = _apply(bf16, params, x, t)
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@pytest.mark.slow
def test_remat_gives_same_params_output_and_gradients(minimal_model_and_params):
    model, params = minimal_model_and_params
    remat = UNet(**MINIMAL, remat=True)
    assert jax.tree_util.tree_structure(_shapes(remat)[0]) == jax.tree_util.tree_structure(params)
    x, t = _inputs()

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, t, train=False) ** 2)

    (l_remat, g_remat), (l_plain, g_plain) = (
        jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (remat, model))
    np.testing.assert_allclose(l_remat, l_plain, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_class_conditioning_with_null_class(minimal_model_and_params):
    _, params = minimal_model_and_params
    model = UNet(**MINIMAL, num_classes=3)
    shapes, _ = _shapes(model)
    assert shapes["class_embed"]["embedding"].shape == (4, 4 * TINY["ch"])  # 3 classes + null
    table = np.random.default_rng(1).standard_normal((4, 4 * TINY["ch"]), np.float32)
    params = {**params, "class_embed": {"embedding": jnp.asarray(table)}}
    x, t = _inputs()
    null = _apply(model, params, x, t)
    np.testing.assert_allclose(null, _apply(model, params, x, t, jnp.array([3, 3])), rtol=1e-6, atol=1e-6)
    labelled = _apply(model, params, x, t, jnp.array([0, 2]))
    assert labelled.shape == SHAPE and not np.allclose(labelled, null)
    with pytest.raises(ValueError, match="num_classes=None"):
        _shapes(UNet(**MINIMAL), y=jnp.array([0, 1]))


@pytest.mark.parametrize("shape, t_shape, match", [
    ((2, 7, 7, 3), (2,), r"image size 7 is not divisible by 2\*\*1"),
    ((2, 12, 12, 3), (2,), r"contains 4, but a 12px image only reaches resolutions \[12, 6\]"),
    ((2, 8, 8, 3), (), r"t must have shape \[B\] = \(2,\), got \(\)"),
])
def test_bad_inputs_are_rejected(shape, t_shape, match):
    with pytest.raises(ValueError, match=match):
        _shapes(UNet(**TINY), shape) if t_shape else jax.eval_shape(
            lambda x, t: UNet(**TINY).init(jax.random.PRNGKey(0), x, t, train=False),
            jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(t_shape, jnp.int32))


@pytest.mark.parametrize("module", CONFIG_MODULES)
@pytest.mark.parametrize("variant", [None, "tiny"])
def test_shipped_configs_validate_and_build(module, variant):
    config = module.get_config(variant)
    validate(config)
    model = model_from_config(config)
    size, channels = config.data.image_size, config.data.channels
    if variant == "tiny":  # trace a forward pass (no compute) to check the architecture end to end
        assert _shapes(model, (1, size, size, channels))[1].shape == (1, size, size, channels)


def test_model_from_config_fills_out_channels_and_dtype():
    config = digits.get_config()
    config.diffusion.var_type, config.diffusion.loss_type = "learned", "kl"
    config.training.compute_dtype = "bfloat16"
    validate(config)
    model = model_from_config(config)
    assert model.out_channels == 2 and model.dtype == jnp.bfloat16


def _set(path: str, value, *more):
    """mutate(config) setting path to value (and any further path, value pairs)."""
    def mutate(config):
        for p, v in zip((path,) + more[::2], (value,) + more[1::2]):
            section, field = p.split(".")
            config[section][field] = v
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set("model.attn_resolutions", (64,)), r"contains 64.*reaches resolutions \[32, 16, 8, 4\]"),
    (_set("model.ch", 48), r"48 channels is not divisible by model.num_groups=32"),
    (_set("data.image_size", 36), r"image size 36 is not divisible by 2\*\*3 = 8.*data.image_size"),
    (_set("model.dropout", 1.0), r"config.model.dropout=1.0: use a value in \[0.0, 1.0\)"),
    (_set("model.ch_mult", ()), r"config.model.ch_mult=\(\): use a non-empty tuple"),
    (_set("model.out_channels", 6), r"config.model.out_channels=6: .*needs 3 output channels"),
    (_set("model.heads", 4), r"config.model has unknown fields \['heads'\]"),
    (_set("diffusion.schedule", "sigmoid"), r"config.diffusion.schedule='sigmoid': use one of"),
    (_set("diffusion.var_type", "learned"), r"var_type='learned': a learned variance needs loss_type='kl'"),
    (_set("diffusion.loss_type", "hybrid"), r"loss_type='hybrid': 'hybrid' trains a learned variance"),
    (_set("diffusion.beta_end", 1e-5), r"config.diffusion.beta_end=1e-05: use a value in"),
    (_set("data.dataset", "imagenet"), r"config.data.dataset='imagenet': use one of"),
    (_set("training.batch_size", 0), r"config.training.batch_size=0: use an integer >= 1"),
    (_set("training.lr", -1.0), r"config.training.lr=-1.0"),
    (_set("training.compute_dtype", "float16"), r"'float16': use one of \('float32', 'bfloat16'\)"),
    (_set("training.ema_decay", 1.0), r"config.training.ema_decay=1.0"),
    (_set("sampling.steps", 2000), r"config.sampling \(sampler 'ddpm'\): steps must lie in 1..1000 \(the schedule's T\); got 2000"),
    (_set("sampling.sampler", "euler"), r"config.sampling.sampler='euler'"),
    (_set("sampling.order", 4), r"config.sampling \(sampler 'ddpm'\): order=4: dpm\+\+ has orders 1..3"),
    (_set("sampling.spacing", "karras"), r"config.sampling.spacing='karras': use one of"),
    (_set("sampling.sampler", "dpm++sde", "sampling.order", 3),
     r"config.sampling \(sampler 'dpm\+\+sde'\): order=3: dpm\+\+sde has orders 1..2"),
    (_set("sampling.steps", None, "sampling.steps", "ddim50", "sampling.spacing", "logsnr"),
     r"config.sampling \(sampler '.*'\): spacing='logsnr' places an int number of steps S; got steps='ddim50'"),
    (_set("sampling.sampler", "dpm++", "sampling.steps", 2, "sampling.order", 3),
     r"config.sampling \(sampler 'dpm\+\+'\): DPM-Solver\+\+ of order 3 needs at least 3 steps"),
    (_set("sampling.threshold", 1.0), r"config.sampling.threshold=1.0: use a value in \(0.0, 1.0\)"),
    (_set("sampling.var_type", "learned"), r"config.sampling.var_type='learned'"),
    (_set("eval.fid_reference", "val"), r"config.eval.fid_reference='val'"),
    (_set("eval.metrics", ""), r"config.eval.metrics='': use a comma-separated string"),
    (_set("training.keep_every", 0), r"config.training.keep_every=0: use an integer >= 1"),
    (_set("training.label_dropout", 1.5), r"config.training.label_dropout=1.5: use a value in \[0.0, 1.0\]"),
    (_set("eval.labels", "balanced"), r"config.eval.labels='balanced' needs a class-conditional model"),
    (_set("eval.guidance", 1.5), r"config.eval.guidance=1.5 needs config.eval.labels: guidance steers"),
    (_set("training.microbatches", 0), r"config.training.microbatches=0: use an integer >= 1"),
    (_set("training.lr_decay", "exp"), r"config.training.lr_decay='exp': use one of \('none', 'cosine'"),
    (_set("training.lr_decay", "cosine", "training.num_steps", 5000),
     r"config.training.lr_decay='cosine': a decay after the warmup needs training.num_steps=5000 > "
     r"training.warmup_steps=5000"),
    (_set("training.loss_weight", "p2"), r"config.training.loss_weight='p2': use one of \('uniform', 'min_snr'\)"),
    (_set("training.loss_weight", "min_snr", "diffusion.mean_type", "xprev"),
     r"config.training.loss_weight='min_snr': it weighs the regression loss"),
    (_set("training.min_snr_gamma", 0.0), r"config.training.min_snr_gamma=0.0: use a value in \(0.0, inf\]"),
    (_set("training.microbatches", 3), r"config.training.microbatches=3: it must divide training.batch_size=128"),
])
def test_validate_rejects_with_field_and_fix(mutate, match):
    config = cifar10.get_config()
    validate(config)
    mutate(config)
    with pytest.raises(ValueError, match=match):
        validate(config)


# Every float field of the config; guidance and grad_clip may also be None.
FLOAT_FIELDS = ("diffusion.beta_start", "diffusion.beta_end", "model.dropout", "training.lr",
                "training.grad_clip", "training.ema_decay", "training.adam_eps",
                "training.min_snr_gamma",
                "training.label_dropout", "sampling.eta", "eval.guidance", "distill.teacher_eta",
                "finetune.prior_weight", "finetune.row_lr_scale", "lora.alpha",
                "control.condition_dropout",
                "latent.kl_weight")


def test_float_field_list_covers_every_float_of_the_config():
    config = cifar10.get_config()
    floats = {f"{section}.{field}" for section in config for field, value in config[section].items()
              if isinstance(value, float)}
    assert floats <= set(FLOAT_FIELDS), floats - set(FLOAT_FIELDS)


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_validate_rejects_non_finite_floats_naming_the_field(path, value):
    # NaN compares False with every bound, so a range check alone lets it through.
    config = cifar10.get_config()
    _set(path, value)(config)
    with pytest.raises(ValueError, match=rf"config\.{path}={value!r}: use a finite value in"):
        validate(config)


def test_learned_variance_needs_twice_the_channels():
    config = cifar10.get_config()
    config.diffusion.var_type, config.diffusion.loss_type = "learned_range", "kl"
    config.model.out_channels = 3
    with pytest.raises(ValueError, match="needs 6 output channels: set it to 6 or None"):
        validate(config)
    config.model.out_channels = 6
    validate(config)


def test_sampling_steps_accept_none_and_respacing_strings():
    config = cifar10.get_config()
    config.sampling.steps = None  # all T steps
    validate(config)
    config.sampling.steps = "ddim50"
    validate(config)
    config.sampling.steps = "abc"
    with pytest.raises(ValueError, match=r"config.sampling \(sampler 'ddpm'\): Bad steps 'abc'"):
        validate(config)
