"""Progressive distillation (ddpm_jax/distill.py, the "distill" objective of training.train_step,
the teacher in loop.py): the target against two DDIM steps written out in float64 NumPy, a
perfect student's zero loss, convergence to the exact two-step map of Gaussian data, a
bit-exact resume, and one-line refusals."""

import functools
import os
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` lives at the repo root

from configs import digits  # noqa: E402
from ddpm_jax import config as config_lib  # noqa: E402
from ddpm_jax import diffusion, distill, plans, training  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

T = 40
BETA_START, BETA_END = 0.01, 0.3


def _schedule():
    return Schedule.create("linear", T, beta_start=BETA_START, beta_end=BETA_END)


def _abar64():
    return np.cumprod(1.0 - np.linspace(BETA_START, BETA_END, T, dtype=np.float64))


def _points(num_timesteps, steps):
    """p_0 = -1 and p_k = round-half-up(k T / N) - 1, by exact fractions."""
    return [-1] + [int(Fraction(k * num_timesteps, steps) + Fraction(1, 2)) - 1
                   for k in range(1, steps + 1)]


def _alpha_sigma64(abar, t):
    return (1.0, 0.0) if t < 0 else (np.sqrt(abar[t]), np.sqrt(1.0 - abar[t]))


def _teacher_x0_64(z, t):
    """A nonlinear stand-in teacher, in float64."""
    return np.tanh(0.8 * z + 0.02 * t) - 0.1


def _teacher_x0(z, t):
    return jnp.tanh(0.8 * z + 0.02 * t.astype(jnp.float32).reshape(-1, 1, 1, 1)) - 0.1


def _ddim64(abar, z, x0, t, s):
    a_t, s_t = _alpha_sigma64(abar, t)
    a_s, s_s = _alpha_sigma64(abar, s)
    return a_s * x0 + s_s * (z - a_t * x0) / s_t


def test_the_trailing_grids_nest_and_are_the_students_sampling_plan():
    for steps in (64, 32, 8, 2):
        kept = plans.trailing_timesteps(1000, steps)
        assert list(kept) == _points(1000, steps)[1:]
        assert list(plans.trailing_timesteps(1000, steps // 2)) == list(kept[1::2])
    t, t_mid, t_next = distill.step_times(T, 8)
    p = _points(T, 8)
    assert list(t) == p[2::2] and list(t_mid) == p[1::2] and list(t_next) == p[0:-1:2]
    plan = SamplerSpec(sampler="ddim", steps=4, spacing="trailing").plan(_schedule())
    assert list(np.asarray(plan.timesteps)) == p[2::2]


def test_target_matches_two_ddim_steps_derived_in_float64():
    schedule, abar = _schedule(), _abar64()
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2)), np.float64)
    for steps in (8, 2):
        t, t_mid, t_next = distill.step_times(T, steps)
        for j in range(steps // 2):
            rows = jnp.full((4,), j)
            tj, tm, tn = (jnp.asarray(a)[rows] for a in (t, t_mid, t_next))
            z_next = distill.two_teacher_steps(schedule, _teacher_x0, z_t=jnp.asarray(z, jnp.float32),
                                               t=tj, t_mid=tm, t_next=tn)
            got = distill.target_x0(schedule, z_t=jnp.asarray(z, jnp.float32), z_next=z_next,
                                    t=tj, t_next=tn)
            # float64: two DDIM steps, then the x0 of the one step t -> t'' that lands there
            p = _points(T, steps)
            t0, t1, t2 = p[2 * j + 2], p[2 * j + 1], p[2 * j]
            z1 = _ddim64(abar, z, _teacher_x0_64(z, t0), t0, t1)
            z2 = _ddim64(abar, z1, _teacher_x0_64(z1, t1), t1, t2)
            (a0, s0), (a2, s2) = _alpha_sigma64(abar, t0), _alpha_sigma64(abar, t2)
            want = (z2 - s2 / s0 * z) / (a2 - s2 / s0 * a0)
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
            # ... and one DDIM step with it lands on z_t'' (the target's definition)
            np.testing.assert_allclose(_ddim64(abar, z, want, t0, t2), z2, atol=1e-9)
    w = distill.truncated_snr_weight(schedule, jnp.arange(T))
    np.testing.assert_allclose(w, np.maximum(abar / (1.0 - abar), 1.0), rtol=1e-5)


def _perfect_student(schedule, steps):
    """The teacher's own two-step map as a v-predicting network: its x0 is the target."""
    t_all, t_mid_all, t_next_all = (np.zeros(T, np.int32) for _ in range(3))
    t, t_mid, t_next = distill.step_times(T, steps)
    t_mid_all[t], t_next_all[t] = t_mid, t_next

    def student_fn(z, t):
        tm, tn = jnp.asarray(t_mid_all)[t], jnp.asarray(t_next_all)[t]
        z_next = distill.two_teacher_steps(schedule, _teacher_x0, z_t=z, t=t, t_mid=tm, t_next=tn)
        x0 = distill.target_x0(schedule, z_t=z, z_next=z_next, t=t, t_next=tn)
        eps = diffusion.predict_eps_from_x0(schedule, x_t=z, t=t, x0=x0)
        return diffusion.v_from_x0_eps(schedule, x0=x0, t=t, eps=eps)
    return student_fn


def test_a_perfect_student_has_zero_loss_and_another_does_not():
    schedule, steps = _schedule(), 8
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (16, 3, 3, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    index = jnp.arange(16) % (steps // 2)
    losses = functools.partial(distill.distillation_losses, schedule, teacher_x0_fn=_teacher_x0,
                               x0=x0, step_index=index, noise=noise, teacher_steps=steps,
                               mean_type="v")
    perfect = losses(_perfect_student(schedule, steps))
    assert float(jnp.max(perfect["loss"])) < 1e-9
    off = losses(lambda z, t: _perfect_student(schedule, steps)(z, t) + 0.01)
    assert float(jnp.min(off["loss"])) > 1e-6


class PerStepAffine(nn.Module):
    """output = a[t] * x + b[t]: per-timestep affine, enough to be the exact eps of Gaussian
    data and the exact two-step DDIM map of it."""

    num_timesteps: int
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        a = self.param("a", nn.initializers.zeros, (self.num_timesteps,))
        b = self.param("b", nn.initializers.zeros, (self.num_timesteps,))
        return a[t].reshape(-1, 1, 1, 1) * x + b[t].reshape(-1, 1, 1, 1)


def test_one_round_on_gaussian_data_converges_to_the_exact_two_step_map():
    # Data N(mu, s^2) per pixel; the exact teacher eps*(x, t) = (x - alpha mu) sigma /
    # (alpha^2 s^2 + sigma^2) is per-step affine. The student (x0-predicting, same network,
    # starting from the teacher's eps weights) is trained with the library's train_step.
    mu, s, steps, num_steps = 0.3, 0.5, 8, 600
    schedule, abar = _schedule(), _abar64()
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    denominator = alpha**2 * s**2 + sigma**2
    teacher = {"a": jnp.asarray(sigma / denominator, jnp.float32),
               "b": jnp.asarray(-alpha * mu * sigma / denominator, jnp.float32)}
    model = PerStepAffine(T)
    optimizer = training.make_optimizer(grad_clip=0.0)
    settings = training.StepConfig(
            model=model, optimizer=optimizer, base_lr=0.05, warmup_steps=0, ema_decay=0.9,
            lr_decay="linear", total_steps=num_steps, mean_type="xstart", objective="distill",
            teacher_steps=steps, teacher_mean_type="eps", teacher_clip=False)
    state = training.create_train_state(model, optimizer, jax.random.PRNGKey(0), (2, 2, 1))
    state = state.replace(params=jax.tree.map(jnp.copy, teacher))
    images = mu + s * jax.random.normal(jax.random.PRNGKey(3), (num_steps, 64, 2, 2, 1))
    run = jax.jit(functools.partial(training.train_steps, settings=settings, unroll=False))
    state, metrics = run(state, {"image": images}, schedule, teacher_params=teacher)

    def exact_x0(z, t):
        eps = (z - alpha[t] * mu) * sigma[t] / denominator[t]
        return (z - sigma[t] * eps) / alpha[t]

    p = _points(T, steps)
    for j in range(steps // 2):
        t0, t1, t2 = p[2 * j + 2], p[2 * j + 1], p[2 * j]

        def two_steps(z):  # affine in z: read its slope and offset
            z1 = _ddim64(abar, z, exact_x0(z, t0), t0, t1)
            z2 = _ddim64(abar, z1, exact_x0(z1, t1), t1, t2)
            (a0, s0), (a2, s2) = _alpha_sigma64(abar, t0), _alpha_sigma64(abar, t2)
            return (z2 - s2 / s0 * z) / (a2 - s2 / s0 * a0)
        offset = two_steps(0.0)
        slope = two_steps(1.0) - offset
        np.testing.assert_allclose([state.params["a"][t0], state.params["b"][t0]],
                                   [slope, offset], atol=3e-3)
    assert float(metrics["loss"][-50:].mean()) < 1e-4 * float(metrics["loss"][:10].mean())


# ------------------------------------------------------------------------- the loop and config

def _student_config(data_dir, teacher, **changes):
    config = digits.get_config("distill_tiny")
    changes = {"data.data_dir": data_dir, "distill.teacher": teacher, "training.batch_size": 16,
               "training.num_sample_images": 0, "training.checkpoint_every": 3, **changes}
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import write_untrained_run

    path = str(tmp_path_factory.mktemp("teacher"))
    write_untrained_run(digits.get_config("tiny"), path, perturb=0.05)
    return path


def test_rounds_chain_their_teachers_and_sample_with_their_own_steps():
    from ddpm_jax import loop

    config = digits.get_config("distill")
    config.distill.teacher = "runs/digits"
    rounds = loop.distillation_rounds(config, "out")
    assert [w for w, _ in rounds] == [f"out/round_{k}" for k in range(1, 5)]
    teachers = ["runs/digits"] + [f"out/round_{k}" for k in range(1, 4)]
    assert [c.distill.teacher for _, c in rounds] == teachers
    assert [c.distill.teacher_steps for _, c in rounds] == [64, 32, 16, 8]
    for _, c in rounds:
        config_lib.validate(c)
        spec = SamplerSpec.from_config(c)
        assert (spec.sampler, spec.eta, spec.steps, spec.spacing, spec.mean_type) == (
                "ddim", 0.0, c.distill.teacher_steps // 2, "trailing", "v")
    assert config.distill.teacher_steps == 64 and config.distill.rounds == 4  # not changed
    assert [c.training.num_steps for _, c in rounds] == [500] * 4
    config.distill.first_round_steps = 1500  # round 1 longer, the others as before
    longer = loop.distillation_rounds(config, "out")
    assert [c.training.num_steps for _, c in longer] == [1500, 500, 500, 500]
    assert all(c.distill.first_round_steps is None for _, c in longer)  # each round: one run


@pytest.mark.parametrize("field, value, says", [
    ("teacher_steps", 7, "teacher_steps=7 does not halve"),
    ("rounds", 4, "halves only 3 times"),
    ("teacher_sampler", "dpm++sde", "stochastic teacher chain"),
    ("teacher_sampler", "ddpm", "stochastic teacher chain"),
    ("teacher_eta", 0.5, "stochastic teacher chain"),
    ("teacher_sampler", "dpm++", "multistep"),
    ("first_round_steps", 0, "integer >= 1"),
])
def test_bad_distill_settings_are_refused_in_one_line(field, value, says):
    config = digits.get_config("distill")
    config.distill.teacher_steps = 24 if field == "rounds" else 64
    config.distill[field] = value
    with pytest.raises(ValueError, match=r"^config\.distill\.") as error:
        config_lib.validate(config)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_classifier_teacher_is_refused_in_one_line(tmp_path):
    from conftest import write_untrained_run
    from ddpm_jax import runs

    write_untrained_run(digits.get_config("classifier_tiny"), str(tmp_path))
    with pytest.raises(ValueError, match="is a classifier run") as error:
        runs.load_teacher(str(tmp_path), _student_config(None, str(tmp_path)))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="does not exist") as error:
        runs.load_teacher(str(tmp_path / "nothing"), _student_config(None, "x"))


def test_another_network_as_teacher_is_refused_in_one_line(teacher_dir):
    from ddpm_jax import runs

    config = _student_config(None, teacher_dir, **{"model.ch": 32})
    with pytest.raises(ValueError, match=r"model\.ch: teacher 16, student 32") as error:
        runs.load_teacher(teacher_dir, config)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_distillation_run_starts_from_its_teacher_and_resumes_bit_for_bit(
        tmp_path, digits_data_dir, teacher_dir):
    from ddpm_jax import checkpoint, loop, runs

    data_dir = digits_data_dir
    straight = loop.train_and_evaluate(
            _student_config(data_dir, teacher_dir, **{"training.num_steps": 6}), str(tmp_path / "a"))
    # Resumed from its step-3 checkpoint (as if it had died before saving step 6).
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(str(tmp_path / "b")), "6"))
    resumed = loop.train_and_evaluate(
            _student_config(data_dir, teacher_dir, **{"training.num_steps": 6}), str(tmp_path / "b"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    # it trained from the teacher (not from a fresh init), pinned the teacher's step, and
    # samples with its own 4 DDIM steps
    _, _, teacher = runs.load_for_sampling(teacher_dir, "ema")
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), straight.params, teacher)
    assert 0 < max(jax.tree.leaves(moved)) < 0.05
    manager = checkpoint.make_manager(str(tmp_path / "b"), max_to_keep=1, read_only=True)
    assert checkpoint.restore_config(manager, 6)["distill"]["teacher_step"] == 0
    manager.close()
