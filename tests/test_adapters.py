"""Parameter transforms of fine-tuning (ddpm_jax/adapters.py): LoRA against a float64 reference,
bit-identity at step 0, target selection, growing a base run's parameters by tree path, frozen
leaves through train steps, and the prior-preservation objective on a test double."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed_on_host

from configs import digits
from ddpm_jax import adapters, diffusion, finetune, training
from ddpm_jax import config as config_lib
from ddpm_jax.schedule import Schedule


@functools.cache
def _tiny(num_classes=3):
    config = digits.get_config("cond_tiny")
    config.model.num_classes = num_classes
    model = config_lib.model_from_config(config)
    params = perturbed_on_host(jax.jit(lambda k: training.init_params(
            model, k, config_lib.image_shape(config)))(jax.random.PRNGKey(0)), 1, 0.05)
    return config, model, params


def test_lora_merge_equals_the_float64_reference_for_dense_and_conv_kernels():
    rng = np.random.default_rng(0)
    base = {"attn_0": {"q": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                             "bias": np.zeros(5, np.float32)}},
            "conv": {"kernel": rng.normal(size=(3, 3, 4, 7)).astype(np.float32)}}
    transform = adapters.Transform("lora", ("attn_0/q/kernel", "conv/kernel"), rank=2, alpha=3.0)
    trainable = {"lora": {"attn_0": {"q": {"kernel": {
                    "down": rng.normal(size=(6, 2)).astype(np.float32),
                    "up": rng.normal(size=(2, 5)).astype(np.float32)}}},
                          "conv": {"kernel": {"down": rng.normal(size=(36, 2)).astype(np.float32),
                                              "up": rng.normal(size=(2, 7)).astype(np.float32)}}}}
    merged = jax.jit(adapters.merge, static_argnums=2)(base, trainable, transform)
    for path, shape in (("attn_0/q/kernel", (6, 5)), ("conv/kernel", (3, 3, 4, 7))):
        ad = adapters.flat(trainable["lora"])
        w = adapters.flat(base)[path].astype(np.float64)
        want = w + 1.5 * (ad[path + "/down"].astype(np.float64)
                          @ ad[path + "/up"].astype(np.float64)).reshape(shape)
        np.testing.assert_allclose(adapters.flat(merged)[path], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adapters.flat(merged)["attn_0/q/bias"], base["attn_0"]["q"]["bias"])


def test_lora_targets_and_a_zero_up_leave_the_unet_bit_identical():
    config, model, params = _tiny(3)
    paths = adapters.lora_paths(params, ("attn", "time", "conv"))
    assert "up_1_attn_0/q/kernel" in paths and "time_dense_1/kernel" in paths
    assert "mid_block_1/time_proj/kernel" in paths and "conv_in/kernel" in paths
    assert not any(p.endswith(("bias", "scale", "embedding")) for p in paths)
    assert adapters.lora_paths(params, ("attn",)) == tuple(
            p for p in paths if "attn" in p and p.split("/")[-2] in ("q", "k", "v", "proj_out"))
    with pytest.raises(ValueError, match="unknown"):
        adapters.lora_paths(params, ("mlp",))
    transform = adapters.Transform("lora", paths, rank=2, alpha=2.0, rows=(1,))
    trainable = jax.jit(adapters.init_trainable, static_argnums=1)(params, transform,
                                                                    jax.random.PRNGKey(2))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    t, y = jnp.array([10, 500]), jnp.array([0, 1])

    @jax.jit
    def outputs(params, trainable):
        merged = adapters.merge(params, trainable, transform)
        return merged, [model.apply({"params": p}, x, t, y, train=False) for p in (merged, params)]

    merged, (adapted, plain) = outputs(params, trainable)
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    np.testing.assert_array_equal(adapted, plain)


def test_grow_base_adds_the_new_row_and_refuses_another_architecture_by_leaf():
    _, _, base = _tiny(3)
    config = digits.get_config("cond_tiny")
    config.model.num_classes = 4
    model = config_lib.model_from_config(config)
    shapes = jax.eval_shape(lambda k: training.init_params(model, k, (8, 8, 1)),
                            jax.random.PRNGKey(0))
    grown = adapters.grow_base(base, shapes, new_class=True, where="W")
    table, old = grown["class_embed"]["embedding"], base["class_embed"]["embedding"]
    np.testing.assert_array_equal(table[:3], old[:3])
    np.testing.assert_array_equal(table[3], old[3])   # the new class starts as the null row
    np.testing.assert_array_equal(table[4], old[3])   # the null label moves from 3 to 4
    assert grown["conv_in"]["kernel"] is base["conv_in"]["kernel"]
    with pytest.raises(ValueError, match=r"^W: leaf class_embed/embedding has shape \(4, 64\)"):
        adapters.grow_base(base, shapes, new_class=False, where="W")
    other = dict(shapes, conv_in={"kernel": jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32),
                                  "bias": jax.ShapeDtypeStruct((8,), jnp.float32)})
    with pytest.raises(ValueError, match=r"leaf conv_in/kernel has shape \(3, 3, 1, 16\) in the base"):
        adapters.grow_base(base, other, new_class=True, where="W")
    with pytest.raises(ValueError, match="leaf extra/kernel .* is not in the base run"):
        extra = {"kernel": jax.ShapeDtypeStruct((2,), jnp.float32)}
        adapters.grow_base(base, dict(shapes, extra=extra), new_class=True, where="W")
    with pytest.raises(ValueError, match="leaf conv_out/bias of the base run is not in this model"):
        adapters.grow_base(base, dict(shapes, conv_out={"kernel": shapes["conv_out"]["kernel"]}),
                           new_class=True, where="W")
    unconditional = {k: v for k, v in base.items() if k != "class_embed"}
    zero = adapters.grow_base(unconditional, shapes, new_class=True, where="W")
    np.testing.assert_array_equal(zero["class_embed"]["embedding"], np.zeros((5, 64)))


def test_prior_preservation_loss_equals_its_formula_on_a_test_double():
    # Batches of 4 instance rows (class 3) and 4 prior rows, weight lambda = 0.7.
    instances = np.full((2, 8, 8, 1), 200, np.uint8)
    prior = (np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 1), np.uint8),
             np.arange(6) % 3)
    batches = finetune.FewShotBatches(instances, 3, *prior, 0.7, 8, 0, 8, seed=0)
    batch = batches(5)
    np.testing.assert_array_equal(batch["label"][:4], 3)
    assert set(batch["label"][4:]) <= {0, 1, 2}
    np.testing.assert_array_equal(batches(5)["image"], batch["image"])  # deterministic per index
    schedule = Schedule.create("linear", 100)
    x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
    t = jnp.array([0, 10, 50, 99, 5, 20, 70, 90])
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    double = lambda x_t, t: 0.3 * x_t  # noqa: E731 (a test double of the denoiser)
    terms = diffusion.training_losses(schedule, double, x0=x0, t=t, noise=noise)
    loss = training.weighted_mean(terms["loss"], jnp.asarray(batch["weight"]))
    a = np.sqrt(np.asarray(schedule.alphas_cumprod, np.float64))[np.asarray(t)][:, None, None, None]
    s = np.sqrt(1 - np.asarray(schedule.alphas_cumprod, np.float64))[np.asarray(t)][:, None, None, None]
    x_t = a * np.asarray(x0, np.float64) + s * np.asarray(noise, np.float64)
    per_row = np.mean((0.3 * x_t - np.asarray(noise, np.float64)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, per_row[:4].mean() + 0.7 * per_row[4:].mean(), rtol=1e-5)


@pytest.mark.parametrize("method", ["embedding"])  # lora: through the loop, in test_finetune.py
def test_frozen_leaves_stay_bitwise_equal_through_train_steps(method):
    config, model, params = _tiny(4)
    paths = adapters.lora_paths(params, ("attn", "time")) if method == "lora" else ()
    transform = adapters.Transform(method, paths, rank=2, alpha=2.0, rows=(3,))
    config.training.lr, config.training.warmup_steps = 1e-2, 0
    settings = config_lib.step_config(config, model, transform=transform)
    state = jax.jit(functools.partial(finetune.create_state,
                                      finetune.Setup(config, model, transform, params, config, 3),
                                      settings.optimizer))(jax.random.PRNGKey(0))
    batch = {"image": jnp.ones((4, 8, 8, 1)) * 0.5, "label": jnp.array([3, 3, 0, 1]),
             "weight": jnp.array([2.0, 2.0, 1.0, 1.0])}
    step = jax.jit(training.train_step, static_argnums=3)
    for _ in range(2):
        state, metrics = step(state, batch, Schedule.create("linear", 1000), settings, params)
    assert np.isfinite(metrics["loss"])
    for tree in (state.params, state.ema_params):
        merged = adapters.flat(adapters.merge(params, tree, transform))
        for path, leaf in adapters.flat(params).items():
            if path in paths:
                assert not np.array_equal(merged[path], leaf), path  # it trained
            elif path == adapters.EMBED_PATH:
                np.testing.assert_array_equal(merged[path][np.arange(5) != 3], leaf[np.arange(5) != 3])
                assert not np.array_equal(merged[path][3], leaf[3])
            else:
                np.testing.assert_array_equal(merged[path], leaf, err_msg=path)



def test_row_rate_and_row_ema_warmup_act_on_the_taught_row_only():
    # One step of a full fine-tune from the same state and batch, plain and with the taught row
    # (class 3) at row_lr_scale 8 and row_ema_warmup (run's EMA: 0.99, no warm-up). Adam's
    # direction is the same, so that row moves exactly 8 times as far and every other value
    # as before; the row's EMA takes the warm-up's first decay (1 + 0) / (10 + 0) = 0.1.
    config, model, params = _tiny(4)
    config.training.lr, config.training.warmup_steps = 1e-3, 0
    config.training.ema_decay, config.training.ema_warmup = 0.99, False
    batch = {"image": jnp.ones((4, 8, 8, 1)) * 0.5, "label": jnp.array([3, 3, 0, 1]),
             "weight": jnp.array([2.0, 2.0, 1.0, 1.0])}
    out = []
    for scale, warm in ((1.0, False), (8.0, True)):
        transform = adapters.Transform("full", rows=(3,), row_lr_scale=scale, row_ema_warmup=warm)
        settings = config_lib.step_config(config, model, transform=transform)
        state = jax.jit(functools.partial(finetune.create_state,
                                          finetune.Setup(config, model, transform, params, config, 3),
                                          settings.optimizer))(jax.random.PRNGKey(0))
        new, _ = jax.jit(training.train_step, static_argnums=3)(
                state, batch, Schedule.create("linear", 1000), settings, params)
        out.append([adapters.flat(jax.device_get(t)) for t in (state.params, new.params,
                                                               new.ema_params)])
    (before, slow, slow_ema), (_, fast, fast_ema) = out
    taught = np.arange(5) == 3
    for path in before:
        b, p = before[path].astype(np.float64), fast[path].astype(np.float64)
        want_ema = 0.99 * b + 0.01 * p
        np.testing.assert_allclose(slow_ema[path], 0.99 * b + 0.01 * slow[path], rtol=1e-6,
                                   atol=1e-7, err_msg=path)
        if path != adapters.EMBED_PATH:
            np.testing.assert_array_equal(fast[path], slow[path], err_msg=path)
        else:
            np.testing.assert_array_equal(fast[path][~taught], slow[path][~taught])
            step = slow[path][taught].astype(np.float64) - b[taught]
            assert np.abs(step).max() > 1e-4  # the row did train
            np.testing.assert_allclose(p[taught] - b[taught], 8.0 * step, rtol=1e-3, atol=1e-7)
            want_ema[taught] = 0.1 * b[taught] + 0.9 * p[taught]
        np.testing.assert_allclose(fast_ema[path], want_ema, rtol=1e-6, atol=1e-7, err_msg=path)


def test_taught_rows_of_a_rows_leaf_and_of_the_whole_table():
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    full = adapters.Transform("full", rows=(3,), row_lr_scale=2.0)
    tree = {"class_embed": {"embedding": table}, "conv": {"kernel": np.ones((3,), np.float32)}}
    np.testing.assert_array_equal(adapters.taught_rows(tree, full), table[3:4])
    scaled = adapters.scale_row_updates(tree, full)
    want = table.copy()
    want[3] *= 2.0
    np.testing.assert_array_equal(scaled["class_embed"]["embedding"], want)
    np.testing.assert_array_equal(scaled["conv"]["kernel"], tree["conv"]["kernel"])
    lora = adapters.Transform("lora", ("conv/kernel",), rows=(3,), row_lr_scale=2.0)
    small = {"lora": {"conv": {"kernel": {"down": np.ones((3, 1)), "up": np.ones((1, 1))}}},
             "rows": table[3:4]}
    scaled = adapters.scale_row_updates(small, lora)
    np.testing.assert_array_equal(scaled["rows"], 2.0 * table[3:4])
    assert scaled["lora"] is small["lora"]
    replaced = adapters.with_taught_rows(small, np.zeros((1, 4), np.float32), lora)
    np.testing.assert_array_equal(replaced["rows"], np.zeros((1, 4)))
    untaught = adapters.Transform("full", row_lr_scale=2.0)  # no taught row: unchanged
    assert adapters.taught_rows(tree, untaught) is None
    assert adapters.scale_row_updates(tree, untaught) is tree
