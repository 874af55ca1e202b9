"""Control images (ddpm_jax/control.py, models/controlnet.py): a ControlNet equals its frozen
base bit for bit at step 0 and at control scale 0; its train step leaves the base bitwise
unchanged; the chain's per-row control images give the exact conditional law of Gaussian data;
InstructPix2Pix's two-scale formula; the transforms against NumPy; bad inputs one line each."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import config as config_lib
from ddpm_jax import control, sampling, training
from ddpm_jax.editing import control_jobs
from ddpm_jax.models import controlnet
from ddpm_jax.models.unet import UNet
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec

SHAPE = (8, 8, 1)
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4,
            num_classes=3)


def _tiny_model(settings):
    """(model, branch, random base params, branch params at step 0)."""
    model = UNet(**settings)
    branch = controlnet.branch_for(model, 1)

    # Random base leaves (no UNet initialisation to compile): nonzero outputs everywhere.
    shapes = jax.eval_shape(lambda k: training.init_params(model, k, SHAPE), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    return model, branch, base, controlnet.init_branch(branch, base, jax.random.PRNGKey(2), SHAPE)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model(TINY)


def _inputs(batch=2):
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, *SHAPE))
    c = control.make_control("lowres", jnp.tanh(x), 2)
    return x, jnp.array([10, 700][:batch], jnp.int32), jnp.array([0, 2][:batch]), c


def test_zero_initialised_branch_and_control_scale_zero_give_the_base_bit_for_bit(tiny):
    model, branch, base, start = tiny
    x, t, y, c = _inputs()

    @jax.jit
    def outputs(branch_params, scale):  # one program: the base, and the controlled model
        params = controlnet.attach(base, branch_params)
        return (model.apply({"params": base}, x, t, y, train=False),
                controlnet.apply(model, branch, params, x, t, y, control=c, scale=scale))

    plain, at_start = outputs(start, jnp.ones(2))
    np.testing.assert_array_equal(at_start, plain)
    np.testing.assert_array_equal(start["down_0_block_0"]["conv_0"]["kernel"],
                                  base["down_0_block_0"]["conv_0"]["kernel"])  # the copy
    rng = np.random.default_rng(4)  # a trained branch: nonzero zero-convolutions
    trained = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), start)
    _, controlled = outputs(trained, jnp.ones(2))
    assert float(jnp.abs(controlled - plain).max()) > 1e-4  # the branch acts once trained
    _, scale0 = outputs(trained, jnp.zeros(2))
    np.testing.assert_array_equal(scale0, plain)
    _, mixed = outputs(trained, jnp.array([0.0, 1.0]))  # the control scale is per row
    np.testing.assert_array_equal(mixed[0], plain[0])
    np.testing.assert_array_equal(mixed[1], controlled[1])


def test_the_train_step_trains_the_branch_and_leaves_the_frozen_base_bitwise_unchanged():
    # One resolution level: the property is the step's wiring, and this compiles in half the time.
    model, branch, base, start = _tiny_model(dict(TINY, ch_mult=(1,)))
    optimizer = training.make_optimizer(grad_clip=1.0)
    settings = training.StepConfig(model=model, optimizer=optimizer, base_lr=1e-2, warmup_steps=0,
                                   ema_decay=0.9, use_labels=True, label_dropout=0.1,
                                   transform=control.CONTROL_TRANSFORM,
                                   control=control.StepSpec("edges", 2, branch))
    zero = jnp.zeros((), jnp.int32)
    state = training.TrainState(step=zero, params=start, opt_state=optimizer.init(start),
                                ema_params=jax.tree.map(jnp.copy, start),
                                rng=jax.random.PRNGKey(5), nonfinite_in_a_row=zero,
                                nonfinite_total=zero)
    frozen = jax.tree.map(np.array, base)
    schedule = Schedule.create("linear", 100)
    batch = dict(image=jnp.tanh(_inputs(4)[0] * 2), label=jnp.array([0, 1, 2, 0]))
    step = jax.jit(training.train_step, static_argnums=3)
    for _ in range(2):
        state, metrics = step(state, batch, schedule, settings, base)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, base, frozen)
    assert set(state.params) == set(start)  # the state holds the branch only
    assert float(jnp.abs(state.params["zero_mid"]["kernel"]).max()) > 0.0
    assert float(jnp.abs(state.params["hint_out"]["kernel"]).max()) > 0.0


def test_controls_given_with_the_data_train_as_the_same_controls_computed_in_the_step():
    # Kind "data" reads each row's control from the batch: given the edge maps of the batch's
    # images, one step is bitwise the step of kind "edges", which computes them itself.
    model, branch, base, start = _tiny_model(dict(TINY, ch_mult=(1,)))
    optimizer = training.make_optimizer(grad_clip=1.0)
    zero = jnp.zeros((), jnp.int32)
    state = training.TrainState(step=zero, params=start, opt_state=optimizer.init(start),
                                ema_params=jax.tree.map(jnp.copy, start),
                                rng=jax.random.PRNGKey(5), nonfinite_in_a_row=zero,
                                nonfinite_total=zero)
    schedule = Schedule.create("linear", 100)
    image = jnp.tanh(_inputs(4)[0] * 2)
    batch = dict(image=image, label=jnp.array([0, 1, 2, 0]))
    step = jax.jit(training.train_step, static_argnums=3)
    after = {}
    for kind, extra in (("edges", {}), ("data", dict(control=control.make_control("edges", image)))):
        settings = training.StepConfig(model=model, optimizer=optimizer, base_lr=1e-2,
                                       warmup_steps=0, ema_decay=0.9, use_labels=True,
                                       label_dropout=0.1, transform=control.CONTROL_TRANSFORM,
                                       control=control.StepSpec(kind, 2, branch))
        after[kind], _ = step(state, dict(batch, **extra), schedule, settings, base)
    jax.tree.map(np.testing.assert_array_equal, after["data"], after["edges"])
    with pytest.raises(ValueError, match=r"kind='data' needs the batch's 'control' images"):
        control.train_denoise_fn(control.StepSpec("data", 2), model, base, image, None,
                                 jax.random.PRNGKey(0))


def test_given_controls_are_checked_against_the_run_in_one_line(tmp_path):
    config = digits.get_config("sr_tiny")
    config.control.kind = "data"
    config.control.data_file = str(tmp_path / "controls.npz")
    config.control.channels = 2
    config_lib.validate(config)
    assert control.channels_of(config) == 2
    assert config_lib.model_from_config(config).condition_channels == 2
    good = np.zeros((5, 8, 8, 2), np.uint8)
    np.savez(tmp_path / "controls.npz", control=good)
    np.testing.assert_array_equal(control.load_data_controls(config, 5), good)
    for saved, pattern in (
            (dict(control=good[:4]), r"'control' is uint8 \[4, 8, 8, 2\], the run needs uint8 "
                                     r"\[5, 8, 8, 2\]: one control per training example"),
            (dict(control=good.astype(np.float32)), r"is float32 \[5, 8, 8, 2\]"),
            (dict(images=good), r"holds \['images'\], no 'control'")):
        np.savez(tmp_path / "controls.npz", **saved)
        with pytest.raises(ValueError, match=pattern) as error:
            control.load_data_controls(config, 5)
        assert "\n" not in str(error.value)
    (tmp_path / "controls.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"controls.npz cannot be read \(.*\): give an .npz"):
        control.load_data_controls(config, 5)
    config.control.data_file = str(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"missing.npz cannot be read \(FileNotFoundError"):
        control.load_data_controls(config, 5)
    for changes, pattern in ((dict(data_file=None), r"kind 'data' reads the control images from"),
                             (dict(kind="lowres"), r"only kind 'data' reads it \(kind is 'lowres'\)")):
        wrong = digits.get_config("sr_tiny")
        wrong.control.update({**dict(kind="data", data_file="x.npz"), **changes})
        with pytest.raises(ValueError, match=pattern):
            config_lib.validate(wrong)
    with pytest.raises(ValueError, match=r"--control_source: this run's controls were given"):
        control_jobs._to_controls(good, config, SHAPE, True)


@pytest.mark.slow
def test_a_run_of_kind_data_trains_on_the_controls_its_file_gives(tmp_path, digits_data_dir):
    # The loop reads the file and the pipeline hands its rows to the step (which refuses a batch
    # without them); that the step uses them: the bit-for-bit test above. A file for another
    # split size is refused before anything trains.
    from ddpm_jax import data, loop
    size = data.num_examples("digits", "train", digits_data_dir, image_size=8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", control=rng.integers(0, 256, (size, 8, 8, 1), dtype=np.uint8))
    config = digits.get_config("sr_tiny")
    config.control.update(kind="data", data_file=str(tmp_path / "c.npz"))
    config.data.data_dir = digits_data_dir
    config.training.num_steps = 2
    config.training.checkpoint_every = 2
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2 and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(
            state.params))
    np.savez(tmp_path / "short.npz", control=np.zeros((size - 1, 8, 8, 1), np.uint8))
    config.control.data_file = str(tmp_path / "short.npz")
    with pytest.raises(ValueError, match=rf"'control' is uint8 \[{size - 1}, 8, 8, 1\], the run "
                                         rf"needs uint8 \[{size}, 8, 8, 1\]"):
        loop.train_and_evaluate(config, str(tmp_path / "short"))


@dataclasses.dataclass(frozen=True)
class GaussianData:
    """x0 | c, y ~ N(c + shift(y), s^2 I) per pixel, shift(y) = 0.2 (y + 1) (0 for the null
    label): E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a), m the mean, a =
    alphabar_t, exactly. A stand-in for a UNet with condition_channels (condition None: c = 0)."""

    alphas_cumprod: tuple
    s: float
    num_classes: int | None = None
    condition_channels: int = 1

    def apply(self, variables, x, t, y=None, *, train, condition=None):
        a = jnp.asarray(self.alphas_cumprod, jnp.float32)[t][:, None, None, None]
        m = jnp.zeros_like(x) if condition is None else condition
        if y is not None:
            m = m + jnp.where(y == self.num_classes, 0.0, 0.2 * (y + 1.0))[:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / (a * self.s ** 2 + 1 - a)


def _gaussian(num_classes=None, timesteps=200):
    schedule = Schedule.create("linear", timesteps, beta_start=0.1 / timesteps,
                               beta_end=20.0 / timesteps)
    abar = tuple(float(v) for v in np.cumprod(1 - np.asarray(schedule.betas, np.float64)))
    return schedule, GaussianData(abar, 0.3, num_classes)


def _chain_law(schedule, s):
    """(k, V): the ancestral chain (fixedsmall, unclipped) on GaussianData's exact predictor
    maps x_T ~ N(0, 1) to N(k m, V) per pixel, each step being x <- alpha x + beta m + sigma z
    (float64 recursion over the posterior's coefficients)."""
    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1 - betas)
    k, var = 0.0, 1.0
    for t in reversed(range(len(betas))):
        a, a_prev = abar[t], (abar[t - 1] if t else 1.0)
        v = a * s ** 2 + 1 - a
        p, q = np.sqrt(a) * s ** 2 / v, (1 - a) / v            # x0_hat = p x + q m
        c1 = betas[t] * np.sqrt(a_prev) / (1 - a)
        c2 = (1 - a_prev) * np.sqrt(1 - betas[t]) / (1 - a)
        sigma2 = betas[t] * (1 - a_prev) / (1 - a) if t else 0.0
        k, var = (c1 * p + c2) * k + c1 * q, (c1 * p + c2) ** 2 * var + sigma2
    return k, var


def test_the_chain_with_per_row_controls_draws_the_exact_conditional_law():
    schedule, data = _gaussian()
    batch = 256
    controls = np.random.default_rng(0).uniform(-0.7, 0.7, (batch, *SHAPE)).astype(np.float32)
    sampler = sampling.make_sampler(control.ControlApply(data), schedule, (batch, *SHAPE),
                                    SamplerSpec(var_type="fixedsmall", clip_denoised=False))
    out = np.asarray(sampler(None, jax.random.PRNGKey(0), 0, control.rows(controls))["images"])
    k, var = _chain_law(schedule, data.s)
    assert abs(k - 1) < 0.05 and abs(np.sqrt(var) / data.s - 1) < 0.1  # near the data law
    residual = out - k * controls  # each row around its own control: N(0, V)
    assert abs(residual.mean()) < 4 * np.sqrt(var / residual.size), residual.mean()
    assert abs(residual.std() / np.sqrt(var) - 1) < 0.02, (residual.std(), np.sqrt(var))
    assert np.abs(residual.reshape(batch, -1).mean(1)).max() < 4.5 * np.sqrt(var / 64)


def test_two_scale_guidance_is_instructpix2pix_formula():
    _, data = _gaussian(num_classes=3)
    apply_fn = control.ControlApply(data, condition_guidance=True)
    x, _, _, c = _inputs()
    t = jnp.array([5, 150])
    rows = control.rows(np.asarray(c), labels=np.array([0, 2]), condition_guidance=[0.5, 2.0])
    rows = {k: jnp.asarray(v) for k, v in rows.items()}
    w = 1.5
    got = apply_fn.guided_model(None, rows, jnp.float32(w), channels=1, guided=True,
                                mesh=None)(x, t)

    def eps(image, label):
        out = data.apply(None, x, t, jnp.asarray(label), train=False, condition=image)
        return np.asarray(out, np.float64)
    null = np.array([3, 3])
    e00, e_i0, e_it = eps(None, null), eps(c, null), eps(c, rows["label"])
    s_i = 1 + np.array([0.5, 2.0])[:, None, None, None]
    want = e00 + s_i * (e_i0 - e00) + (1 + w) * (e_it - e_i0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_on_a_controlnet_control_moves_away_from_the_frozen_base(tiny):
    # eps(c) + g (eps(c) - eps_base): the null control of a ControlNet is its base model.
    model, branch, base, start = tiny
    rng = np.random.default_rng(6)
    trained = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), start)
    params = controlnet.attach(base, trained)
    x, t, y, c = _inputs()
    apply_fn = control.ControlApply(model, branch, condition_guidance=True)
    g = np.array([0.5, 3.0])
    rows = {k: jnp.asarray(v) for k, v in control.rows(np.asarray(c), labels=np.asarray(y),
                                                       condition_guidance=g).items()}
    got = apply_fn.guided_model(params, rows, jnp.float32(0.0), channels=1, guided=False,
                                mesh=None)(x, t)
    controlled = np.asarray(controlnet.apply(model, branch, params, x, t, y, control=c), np.float64)
    plain = np.asarray(model.apply({"params": base}, x, t, y, train=False), np.float64)
    assert np.abs(controlled - plain).max() > 1e-4
    want = controlled + g[:, None, None, None] * (controlled - plain)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_with_per_row_controls_round_trips():
    # An edit outside the sampler (editing.chain.ddim_encode) reads the same rows.
    from ddpm_jax.editing import chain
    schedule, data = _gaussian(timesteps=1000)
    batch = 8
    rng = np.random.default_rng(2)
    controls = rng.uniform(-0.5, 0.5, (batch, *SHAPE)).astype(np.float32)
    images = controls + data.s * rng.standard_normal(controls.shape).astype(np.float32)
    apply_fn = control.ControlApply(data)
    spec = SamplerSpec(sampler="ddim", steps=100, eta=0.0, clip_denoised=False)
    sampler = sampling.make_sampler(apply_fn, schedule, (batch, *SHAPE), spec)
    per_row = control.rows(controls)
    latents = chain.ddim_encode(apply_fn, None, sampler.plan, images, labels=per_row)
    back = sampler(None, jax.random.PRNGKey(0), 0, per_row, init=latents, start="x_t")["images"]
    error = float(jnp.abs(back - images).mean())  # DDIM inversion: exact as the steps shrink
    swapped = control.rows(controls[::-1].copy())  # decoded under another row's control
    other = sampler(None, jax.random.PRNGKey(0), 0, swapped, init=latents, start="x_t")["images"]
    assert error < 0.03 and float(jnp.abs(other - images).mean()) > 5 * error, error


def test_lowres_and_edges_match_numpy():
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 1))
    blocks = x.reshape(2, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(control.make_control("lowres", jnp.asarray(x), 2),
                               np.repeat(np.repeat(blocks, 2, 1), 2, 2), atol=1e-6)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    k = control.SOBEL_X.astype(np.float64)
    gx = sum(k[i, j] * p[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3))
    gy = sum(k.T[i, j] * p[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3))
    want = 2 * np.clip(np.hypot(gx, gy) / 8, 0, 1) - 1
    np.testing.assert_allclose(control.make_control("edges", jnp.asarray(x)), want, atol=1e-5)


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_inputs_give_one_line_each(tiny, tmp_path):
    schedule, data = _gaussian(timesteps=20)
    sampler = sampling.make_sampler(control.ControlApply(data), schedule, (2, *SHAPE),
                                    SamplerSpec(steps=2))
    key = jax.random.PRNGKey(0)
    for bad in (np.zeros((2, 4, 4, 1)), np.zeros((2, 8, 8, 2))):  # size, channels
        with pytest.raises(ValueError) as excinfo:
            sampler(None, key, 0, control.rows(bad))
        _one_line(excinfo, "control images must be [2, 8, 8, 1]")
    model, branch, base, _ = tiny
    x, t, y, c = _inputs()
    with pytest.raises(ValueError) as excinfo:  # a control for a model without a branch
        controlnet.apply(model, branch, base, x, t, y, control=c)
    _one_line(excinfo, "control branch")
    with pytest.raises(ValueError) as excinfo:  # a condition for a model without its input
        model.apply({"params": base}, x, t, y, train=False, condition=c)
    _one_line(excinfo, "condition_channels=0")
    conditioned = UNet(**{**TINY, "condition_channels": 1})
    with pytest.raises(ValueError) as excinfo:
        jax.eval_shape(lambda k: conditioned.init(k, x, t, y, train=False, condition=c[:, :4]), key)
    _one_line(excinfo, "condition must be [2, 8, 8, 1]")
    with pytest.raises(ValueError) as excinfo:
        control_jobs.check_run("control", digits.get_config("sr_tiny"))
    _one_line(excinfo, "--control needs a ControlNet run", "use --condition")
    with pytest.raises(ValueError) as excinfo:
        control_jobs.check_run("condition", digits.get_config("tiny"))
    _one_line(excinfo, "--condition needs an image-conditioned run")
    flag_values = dict(control=None, condition=None, control_scale=1.0, condition_guidance=None,
                       control_source=False, classifier=None)
    for given, words in ((dict(control="a.png", condition="b.png"), "Pick one of --control"),
                         (dict(control_scale=0.5), "--control_scale only applies to --control"),
                         (dict(condition_guidance=1.0), "only apply to --control / --condition")):
        with pytest.raises(ValueError) as excinfo:
            control_jobs.check_flags(SimpleNamespace(**{**flag_values, **given}), None)
        _one_line(excinfo, words)
    other = UNet(**{**TINY, "ch": 16, "num_groups": 8})  # a base of another architecture
    with pytest.raises(ValueError) as excinfo:
        jax.eval_shape(lambda k: controlnet.init_branch(controlnet.branch_for(other, 1), base, k,
                                                        SHAPE), key)
    _one_line(excinfo, "another architecture")
    config = digits.get_config("controlnet_tiny")
    config.control.kind = "depth"
    with pytest.raises(ValueError) as excinfo:
        config_lib.validate(config)
    _one_line(excinfo, "config.control.kind='depth'")
