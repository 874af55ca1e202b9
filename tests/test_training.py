"""The train step against the official recipe, written out independently in NumPy.

A one-parameter-pair toy network keeps compilation to a second; the step is model-agnostic.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import training
from ddpm_jax.schedule import Schedule

T = 50


class Toy(nn.Module):
    """eps_theta(x_t, t) = w * x_t + b (per channel), computed in `dtype`."""

    dtype: jnp.dtype = jnp.float32
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        w = self.param("w", nn.initializers.constant(0.3), (x.shape[-1],))
        b = self.param("b", nn.initializers.constant(-0.1), (x.shape[-1],))
        x = nn.Dropout(0.0, deterministic=not train)(x)
        w, b = (p.astype(self.dtype).reshape(1, 1, 1, -1) for p in (w, b))
        return x.astype(self.dtype) * w + b


def _setup(model=None, grad_clip=1.0, **overrides):
    model = model or Toy()
    optimizer = training.make_optimizer(grad_clip=grad_clip)
    state = training.create_train_state(model, optimizer, jax.random.PRNGKey(0), (4, 4, 2))
    kwargs = dict(model=model, optimizer=optimizer, base_lr=0.1, warmup_steps=3, ema_decay=0.9)
    kwargs.update(overrides)
    step = jax.jit(functools.partial(training.train_step, settings=training.StepConfig(**kwargs)))
    step.kwargs = kwargs
    return state, step


def _batch(seed=1):
    image = jax.random.uniform(jax.random.PRNGKey(seed), (8, 4, 4, 2), minval=-1, maxval=1)
    return {"image": image, "label": jnp.zeros((8,), jnp.int32)}


def test_learning_rate_is_linear_warmup_from_zero():
    lr = functools.partial(training.learning_rate, base_lr=2e-4, warmup_steps=5000)
    np.testing.assert_allclose([lr(0), lr(2500), lr(5000), lr(10**6)], [0.0, 1e-4, 2e-4, 2e-4],
                               rtol=1e-6)
    assert float(training.learning_rate(0, base_lr=1e-3, warmup_steps=0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_learning_rate_decays_to_zero_after_the_warmup(decay):
    base, warmup, total = 1e-3, 100, 1100
    lr = functools.partial(training.learning_rate, base_lr=base, warmup_steps=warmup, decay=decay,
                           total_steps=total)
    steps = np.array([0, 50, 100, 350, 600, 850, 1099, 1100, 5000])
    f = np.clip((steps - warmup) / (total - warmup), 0.0, 1.0)
    factor = (np.cos(np.pi * f) + 1.0) / 2.0 if decay == "cosine" else 1.0 - f
    expected = base * np.minimum(1.0, steps / warmup) * factor
    np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-5, atol=base * 1e-6)
    assert float(lr(100)) == pytest.approx(base) and float(lr(1100)) == 0.0
    assert float(lr(600)) == pytest.approx(base / 2, rel=1e-5)   # both halve at the midpoint
    with pytest.raises(ValueError, match="needs total_steps > warmup_steps=100"):
        training.learning_rate(5, base_lr=base, warmup_steps=warmup, decay=decay, total_steps=100)
    with pytest.raises(ValueError, match="Unknown lr decay 'step'"):
        training.learning_rate(5, base_lr=base, warmup_steps=warmup, decay="step", total_steps=total)


def test_train_step_applies_the_decayed_rate_and_the_min_snr_weight():
    # The step's lr metric follows learning_rate's decay, and its loss is the per-example mse
    # weighted by min(SNR_t, gamma) / SNR_t (eps), SNR_t = abar_t / (1 - abar_t) in float64.
    schedule = Schedule.create("linear", T)
    state, step = _setup(grad_clip=1e6, lr_decay="cosine", total_steps=7, loss_weight="min_snr",
                         min_snr_gamma=2.0)
    batch = _batch()
    x0 = np.asarray(batch["image"], np.float64)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    w, b = (np.asarray(state.params[k], np.float64) for k in ("w", "b"))
    t_key, noise_key, _ = jax.random.split(jax.random.fold_in(state.rng, 0), 3)
    t = np.asarray(jax.random.randint(t_key, (8,), 0, T))
    noise = np.asarray(jax.random.normal(noise_key, x0.shape), np.float64)
    a = abar[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    mse = np.mean((noise - (w * x_t + b)) ** 2, axis=(1, 2, 3))
    snr = abar[t] / (1 - abar[t])
    assert (snr > 2.0).any() and (snr < 2.0).any()   # both sides of gamma in this batch
    _, metrics = step(state, batch, schedule)
    np.testing.assert_allclose(metrics["mse"], np.mean(mse), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.mean(mse * np.minimum(snr, 2.0) / snr), rtol=1e-4)
    lrs = []
    for _ in range(7):
        state, metrics = step(state, batch, schedule)
        lrs.append(float(metrics["lr"]))
    # updates 0..6 of warmup 3, total 7: 0, 1/3, 2/3 of the rate, then the cosine to ~0.
    n = np.arange(7)
    f = np.clip((n - 3) / 4, 0, 1)
    expected = 0.1 * np.minimum(1, n / 3) * (1 + np.cos(np.pi * f)) / 2
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("grad_clip, mean_type", [
    (0.05, "eps"), (100.0, "eps"),  # clipping active / inactive
    (0.05, "v"), (100.0, "xstart"), (0.05, "xprev")])
def test_three_steps_match_the_official_recipe_in_numpy(grad_clip, mean_type):
    schedule = Schedule.create("linear", T)
    state, step = _setup(grad_clip=grad_clip, mean_type=mean_type)
    batch = _batch()
    x0 = np.asarray(batch["image"], np.float64)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    # xprev's coefficients divide by 1 - abar_t (1e-4 at t = 0): from float64 betas (the
    # paper's linspace), not from the float32 abar above.
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar64 = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar64[:-1])
    w, b = (np.asarray(state.params[k], np.float64) for k in ("w", "b"))
    ema_w, ema_b = w.copy(), b.copy()
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for s in range(3):
        # The keys of step s: fold_in(rng, s), split into (t, noise, dropout).
        t_key, noise_key, _ = jax.random.split(jax.random.fold_in(state.rng, s), 3)
        t = np.asarray(jax.random.randint(t_key, (8,), 0, T))
        noise = np.asarray(jax.random.normal(noise_key, x0.shape), np.float64)
        a = abar[t][:, None, None, None]
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
        # What the output regresses on: eps, x0, v or the posterior mean mu~ (REFERENCE.md).
        a64, a_prev, beta = (c[t][:, None, None, None] for c in (abar64, abar_prev, betas))
        target = {"eps": noise, "xstart": x0, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0,
                  "xprev": (np.sqrt(a_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - a_prev) * x_t)
                  / (1 - a64)}[mean_type]
        # L_simple = mean((target - (w x_t + b))^2); its gradient by hand.
        resid = target - (w * x_t + b)
        n = resid.size
        grads = [-2 * np.sum(resid * x_t, axis=(0, 1, 2)) / n, -2 * np.sum(resid, axis=(0, 1, 2)) / n]
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        grads = [g * min(1.0, grad_clip / norm) for g in grads]
        lr = 0.1 * min(1.0, s / 3)
        updates = []
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g**2
            m_hat, v_hat = m[i] / (1 - 0.9 ** (s + 1)), v[i] / (1 - 0.999 ** (s + 1))
            updates.append(m_hat / (np.sqrt(v_hat) + 1e-8))
        w, b = w - lr * updates[0], b - lr * updates[1]
        ema_w, ema_b = 0.9 * ema_w + 0.1 * w, 0.9 * ema_b + 0.1 * b

        state, metrics = step(state, batch, schedule)
        np.testing.assert_allclose(metrics["loss"], np.mean(resid**2), rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
        np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-6)
    assert int(state.step) == 3
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["b"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], ema_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema_params["b"], ema_b, rtol=1e-5, atol=1e-6)


class VarToy(nn.Module):
    """A learned-variance toy with 2C outputs: Toy's mean part w * x_t + b, then the variance
    part tanh(u * x_t + c) (learned_range's v in [-1, 1]), per channel."""

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        w, b, u, c = (self.param(name, nn.initializers.constant(value), (x.shape[-1],))
                      .reshape(1, 1, 1, -1)
                      for name, value in (("w", 0.3), ("b", -0.1), ("u", 0.5), ("c", 0.2)))
        return jnp.concatenate([x * w + b, jnp.tanh(x * u + c)], axis=-1)


@pytest.mark.slow
def test_hybrid_loss_trains_the_mean_by_mse_alone_and_the_variance_by_the_bound():
    # Hybrid = mse + lambda T vb with the mean stop-gradiented inside vb. With clipping off,
    # Adam moves each parameter by its own gradient alone, so the mean's parameters follow the
    # mse-only run exactly, while the variance's move only under the hybrid loss.
    schedule, mean_type, var_type = Schedule.create("linear", T), "v", "learned_range"
    runs = {}
    for loss_type in ("hybrid", "mse"):
        state, step = _setup(VarToy(), grad_clip=1e6, mean_type=mean_type, var_type=var_type,
                             loss_type=loss_type)
        initial = state.params
        for seed in range(3):
            state, metrics = step(state, _batch(seed), schedule)
        runs[loss_type] = (state.params, metrics)
    hybrid, metrics = runs["hybrid"]
    mse_only, mse_metrics = runs["mse"]
    for name in ("w", "b"):
        np.testing.assert_allclose(hybrid[name], mse_only[name], rtol=1e-6)
        assert not np.allclose(hybrid[name], initial[name])
    for name in ("u", "c"):
        np.testing.assert_array_equal(mse_only[name], initial[name])
        assert np.abs(np.asarray(hybrid[name]) - np.asarray(initial[name])).min() > 1e-3
    assert float(metrics["vb"]) > 0
    np.testing.assert_allclose(metrics["mse"], mse_metrics["mse"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["mse"] + 1e-3 * T * metrics["vb"],
                               rtol=1e-6)


def test_nonfinite_batch_is_skipped_and_counted():
    schedule = Schedule.create("linear", T)
    state, step = _setup()
    state, _ = step(state, _batch(1), schedule)
    state, _ = step(state, _batch(2), schedule)
    before = jax.tree.map(np.asarray, state)
    poisoned = dict(_batch(3), image=_batch(3)["image"].at[0, 0, 0, 0].set(jnp.nan))
    for expected in (1, 2):
        state, metrics = step(state, poisoned, schedule)
        assert not np.isfinite(float(metrics["loss"]))
        assert int(metrics["nonfinite_in_a_row"]) == expected
        assert int(metrics["nonfinite_total"]) == expected
    for name in ("params", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, name), getattr(before, name))
    assert int(state.step) == int(before.step) + 2  # the step (and so the keys) move on
    state, metrics = step(state, _batch(4), schedule)
    assert int(metrics["nonfinite_in_a_row"]) == 0 and int(metrics["nonfinite_total"]) == 2
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [False, True])  # lax.scan (accelerators) / unrolled (CPU)
def test_k_steps_in_one_call_equal_k_steps(unroll):
    schedule = Schedule.create("linear", T)
    state, step = _setup()
    batches = [_batch(seed) for seed in range(3)]
    one_by_one = state
    for batch in batches:
        one_by_one, _ = step(one_by_one, batch, schedule)
    kwargs = step.kwargs
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    fused, metrics = jax.jit(functools.partial(training.train_steps, unroll=unroll,
                                               settings=training.StepConfig(**kwargs)))(
            state, stacked, schedule)
    assert metrics["loss"].shape == (3,)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 fused, one_by_one)


def test_bfloat16_compute_keeps_float32_parameters_and_optimizer():
    schedule = Schedule.create("linear", T)
    state, step = _setup(model=Toy(dtype=jnp.bfloat16))
    state, metrics = step(state, _batch(), schedule)
    state, metrics = step(state, _batch(), schedule)
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32


def test_ema_is_a_copy_in_its_own_buffers():
    state, _ = _setup()
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(p, e)
        assert p.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()


class LabelToy(nn.Module):
    """eps_theta(x_t, t, y) = w * x_t + e[y] (per channel), e: one row per class plus the null
    label num_classes, which y=None selects (as the UNet does)."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        w = self.param("w", nn.initializers.constant(0.3), (x.shape[-1],))
        e = self.param("e", nn.initializers.normal(1.0), (self.num_classes + 1, x.shape[-1]))
        if y is None:
            y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        return x * w[None, None, None, :] + e[y][:, None, None, :]


def test_label_dropout_replaces_the_given_share_of_labels_by_the_null_label():
    labels = jnp.arange(20_000, dtype=jnp.int32) % 3
    key = jax.random.PRNGKey(4)
    assert training.drop_labels(labels, key, 0.0, 3) is labels
    assert (np.asarray(training.drop_labels(labels, key, 1.0, 3)) == 3).all()
    dropped = np.asarray(training.drop_labels(labels, key, 0.3, 3))
    is_null = dropped == 3
    assert abs(is_null.mean() - 0.3) < 0.015  # binomial sd 0.0032
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])


@pytest.mark.slow
def test_full_label_dropout_trains_exactly_the_unconditional_null_label_model():
    schedule = Schedule.create("linear", T)
    batch = dict(_batch(), label=jnp.arange(8, dtype=jnp.int32) % 3)
    runs = {}
    for name, overrides in (("dropped", dict(use_labels=True, label_dropout=1.0)),
                            ("unconditional", dict(use_labels=False)),
                            ("labelled", dict(use_labels=True, label_dropout=0.0))):
        state, step = _setup(LabelToy(), **overrides)
        state, metrics = step(state, batch, schedule)
        runs[name] = (state.params, float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(runs["dropped"][0]), jax.tree.leaves(runs["unconditional"][0])):
        np.testing.assert_array_equal(a, b)
    assert runs["dropped"][1] == runs["unconditional"][1]
    assert runs["labelled"][1] != runs["unconditional"][1]  # the labels do reach the model


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [False, True])  # lax.scan (accelerators) / unrolled (CPU)
@pytest.mark.parametrize("model, overrides", [
    (Toy(), {}),
    (LabelToy(), dict(use_labels=True, label_dropout=0.5)),
])
def test_microbatches_give_the_update_of_the_whole_batch(model, overrides, unroll):
    # Every row's gradient differs (different x0, t, noise, labels), so a slice that dropped or
    # repeated a row, or a wrong average, would move the parameters elsewhere.
    schedule = Schedule.create("linear", T)
    batches = [dict(_batch(seed), label=(jnp.arange(8, dtype=jnp.int32) + seed) % 3)
               for seed in range(3)]
    runs = {}
    for m in (1, 2, 8):
        state, step = _setup(model, microbatches=m, unroll_microbatches=unroll, **overrides)
        for batch in batches:
            state, metrics = step(state, batch, schedule)
        runs[m] = (state, metrics)
    for m in (2, 8):
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                     runs[m][0], runs[1][0])
        for name in ("loss", "mse", "grad_norm"):
            np.testing.assert_allclose(runs[m][1][name], runs[1][1][name], rtol=1e-5)
    assert float(runs[1][1]["grad_norm"]) > 0


def test_microbatches_that_do_not_divide_the_batch_are_refused():
    state, step = _setup(microbatches=3)
    with pytest.raises(ValueError, match="batch of 8 does not split into 3 equal microbatches"):
        step(state, _batch(), Schedule.create("linear", T))


class ConvToy(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        return nn.Conv(x.shape[-1], (3, 3))(nn.Conv(8, (3, 3))(x))


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a premise about XLA's CPU backend")
def test_cpu_unrolls_microbatches_because_its_loop_bodies_get_naive_convolutions():
    # XLA's CPU backend hands convolutions in the canonical layout (b01f_01io->b01f) to its fast
    # kernels; inside a loop body the gradient convolutions keep other layouts and compile to
    # naive loops (jax-ml/jax#12868). If the second assertion fails, a newer jaxlib fixed that:
    # re-measure the scan on the CPU (bench/bench_unet.py --microbatches) and drop the unroll.
    def dim_labels(unroll):
        state, step = _setup(ConvToy(), microbatches=2, unroll_microbatches=unroll)
        hlo = step.lower(state, _batch(), Schedule.create("linear", T)).compile().as_text()
        return set(re.findall(r"dim_labels=([\w>-]+)", hlo))

    assert dim_labels(None) == {"b01f_01io->b01f"}  # the CPU default: unrolled
    assert dim_labels(False) - {"b01f_01io->b01f"}, "XLA now canonicalises loop-body convolutions"
    # The same for K steps per call (train_steps).
    state, step = _setup(ConvToy())
    stacked = jax.tree.map(lambda *x: jnp.stack(x), _batch(1), _batch(2))
    steps = jax.jit(functools.partial(training.train_steps,
                                      settings=training.StepConfig(**step.kwargs)))
    hlo = steps.lower(state, stacked, Schedule.create("linear", T)).compile().as_text()
    assert set(re.findall(r"dim_labels=([\w>-]+)", hlo)) == {"b01f_01io->b01f"}


def test_ema_warmup_ramps_the_decay_then_holds_it():
    decay = functools.partial(training.ema_decay_at, ema_decay=0.999)
    steps = jnp.array([0, 8, 80, 989, 5000])
    expected = np.minimum(0.999, (1 + np.array([0, 8, 80, 989, 5000])) / (10 + np.array([0, 8, 80, 989, 5000])))
    np.testing.assert_allclose(decay(steps, warmup=True), expected, rtol=1e-6)
    np.testing.assert_allclose(decay(steps, warmup=False), 0.999, rtol=1e-7)


def test_ema_warmup_weighs_the_first_update_by_point_nine():
    # Update n = 0 uses decay (1 + 0) / (10 + 0) = 0.1: ema = 0.1 ema_0 + 0.9 params_1.
    state, step = _setup(ema_warmup=True, ema_decay=0.99, warmup_steps=0)  # lr > 0 at step 0
    new, _ = step(state, _batch(), Schedule.create("linear", T))
    for name in ("w", "b"):
        expected = 0.1 * np.asarray(state.params[name]) + 0.9 * np.asarray(new.params[name])
        np.testing.assert_allclose(new.ema_params[name], expected, rtol=1e-6)
        assert not np.allclose(new.ema_params[name], state.params[name])
