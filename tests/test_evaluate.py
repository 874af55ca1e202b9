"""Evaluation: bits/dim against a float64 NumPy bound, reports (with the digits feature net of
conftest.py), the class and solver options, and the command line. The feature nets' own tests:
test_features.py and test_inception.py; the plots': test_plots.py."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import evaluate
from ddpm_jax.schedule import Schedule, get_beta_schedule
from ddpm_jax.spec import SamplerSpec
from multihost import run_on_two_hosts
from reference import numpy_bound
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------- bits/dim

def _linear_apply(params, x_t, t):
    """A deterministic per-t linear "network": out = a[t] x_t + b[t]."""
    a = params["a"][t].reshape(-1, 1, 1, 1)
    b = params["b"][t].reshape(-1, 1, 1, 1)
    return a * x_t + b


@pytest.mark.parametrize("mean_type,var_type,clip", [("eps", "fixedlarge", True),
                                                     ("xstart", "fixedsmall", False)])
def test_bpd_matches_float64_numpy_bound(mean_type, var_type, clip):
    num_t, shape = 6, (4, 4, 1)
    betas = get_beta_schedule("linear", num_t, beta_start=0.01, beta_end=0.5)
    schedule = Schedule.from_betas(betas)
    rng = np.random.RandomState(0)
    a, b = rng.uniform(0.2, 0.9, num_t), rng.uniform(-0.1, 0.1, num_t)
    # At t = 0 the model predicts x0 ~ x_t, keeping the decoder's mean within a few sigma of
    # the data: many sigma out, float32 CDF differences cancel (as in the official code).
    a[0], b[0] = (1.0 if mean_type == "xstart" else 0.0), 0.0
    params = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    data = rng.randint(0, 256, size=(5, *shape)).astype(np.uint8)
    data[0, 0, 0, 0], data[0, 0, 1, 0] = 0, 255              # both open-ended edge bins
    key = jax.random.key(3)
    # batch 2 over 5 images: three calls, the last one padded.
    result = evaluate.evaluate_bpd(_linear_apply, params, schedule, data, key, mean_type=mean_type,
                                   var_type=var_type, clip_denoised=clip, batch_size=2,
                                   progress=False)
    # The documented noise contract: image n, step t draws normal(fold_in(fold_in(key, n), t)).
    noise = np.stack([np.stack([np.asarray(jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(key, n), t), (1, *shape)))[0].reshape(-1)
            for t in range(num_t)]) for n in range(len(data))]).astype(np.float64)
    x0 = (data.reshape(len(data), -1).astype(np.float64) - 127.5) / 127.5
    total, terms, prior = numpy_bound(betas, np.asarray(params["a"], np.float64),
                                      np.asarray(params["b"], np.float64), x0, noise,
                                      mean_type, var_type, clip)
    np.testing.assert_allclose(result["total_bpd"], total, rtol=2e-4)
    np.testing.assert_allclose(result["prior_bpd"], prior, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(result["decoder_bpd"], terms[:, 0], rtol=2e-4)
    np.testing.assert_allclose(result["terms_bpd"], terms.mean(0), rtol=2e-4, atol=1e-6)
    summary = evaluate.bpd_summary(result)
    np.testing.assert_allclose(summary["total"], total.mean(), rtol=2e-4)
    np.testing.assert_allclose(summary["prior"] + summary["decoder"] + summary["kl_terms"],
                               summary["total"], rtol=1e-6)


def test_bpd_rejects_float_images():
    schedule = Schedule.create("linear", 4)
    with pytest.raises(ValueError, match="uint8"):
        evaluate.evaluate_bpd(_linear_apply, {}, schedule, np.zeros((2, 4, 4, 1), np.float32),
                              jax.random.key(0), progress=False)


@pytest.mark.slow
def test_bpd_sharded_over_8_devices_equals_single_device():
    # Image n's noise comes from fold_in(key, n): neither the batch size nor the device count
    # may change the numbers.
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from ddpm_jax import evaluate, parallel
        from ddpm_jax.schedule import Schedule
        def apply(params, x_t, t):
            return params[t].reshape(-1, 1, 1, 1) * x_t
        schedule = Schedule.create("linear", 5, beta_start=0.01, beta_end=0.3)
        params = jnp.linspace(0.1, 0.5, 5)
        data = np.random.RandomState(0).randint(0, 256, (10, 4, 4, 1)).astype(np.uint8)
        mesh = parallel.make_mesh()
        assert mesh.size == 8
        run = lambda **kw: evaluate.evaluate_bpd(apply, params, schedule, data, jax.random.key(0),
                                                 progress=False, **kw)["total_bpd"]
        np.testing.assert_allclose(run(batch_size=8, mesh=mesh), run(batch_size=3), rtol=1e-6)
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


_BPD_HOST = """
import jax.numpy as jnp, numpy as np
from ddpm_jax import evaluate
from ddpm_jax.schedule import Schedule
assert mesh.size == 4  # 2 hosts x 2 CPU devices
def apply(params, x_t, t):
    return params[t].reshape(-1, 1, 1, 1) * x_t
schedule = Schedule.create("linear", 5, beta_start=0.01, beta_end=0.3)
data = np.random.RandomState(0).randint(0, 256, (10, 4, 4, 1)).astype(np.uint8)
result = evaluate.evaluate_bpd(apply, jnp.linspace(0.1, 0.5, 5), schedule, data, jax.random.key(0),
                               batch_size=4, mesh=mesh, progress=False)
np.save(out, result["total_bpd"])
"""


@pytest.mark.slow
def test_bpd_on_two_hosts_equals_single_process(tmp_path):
    """Two jax.distributed processes on 127.0.0.1, 2 CPU devices each: every host gets the
    bound of all 10 images, equal to one process's."""
    outs = run_on_two_hosts(_BPD_HOST, tmp_path)

    def apply(params, x_t, t):
        return params[t].reshape(-1, 1, 1, 1) * x_t

    schedule = Schedule.create("linear", 5, beta_start=0.01, beta_end=0.3)
    data = np.random.RandomState(0).randint(0, 256, (10, 4, 4, 1)).astype(np.uint8)
    expected = evaluate.evaluate_bpd(apply, jnp.linspace(0.1, 0.5, 5), schedule, data, jax.random.key(0),
                                     batch_size=3, progress=False)["total_bpd"]
    hosts = [np.load(out) for out in outs]
    assert hosts[0].shape == (10,)
    np.testing.assert_array_equal(hosts[0], hosts[1])
    np.testing.assert_allclose(hosts[0], expected, rtol=1e-6)


# --------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_run_evaluation_writes_a_report_that_states_its_protocol(tmp_path, cache_dir, digits_net):
    from configs import digits as digits_config

    config = digits_config.get_config("tiny")
    config.diffusion.timesteps = 5
    config.data.image_size = 16   # the size of the digits_net fixture and the samples below
    config.data.data_dir = str(tmp_path / "tfds")
    params = {"a": jnp.linspace(0.1, 0.5, 5), "b": jnp.zeros(5)}
    options = evaluate.EvalOptions.from_config(config, metrics=("bpd", "fid", "is", "kid"),
                                               num_samples=12, bpd_num_images=3,
                                               cache_dir=cache_dir)
    assert (options.feature_net, options.sampler.sampler, options.sampler.steps) == (
            "digits", "ddim", 10)
    options.sampler = options.sampler.with_overrides(steps=5)
    workdir = str(tmp_path / "run")
    report = evaluate.run_evaluation(evaluate.RunData.from_config(config), _linear_apply, params, options, workdir=workdir,
                                     step=7, progress=False)
    assert report["path"] == os.path.join(
            workdir, "eval", "report_step7_ema_bpd-test_ddim5-n12-digits.json")
    with open(report["path"]) as f:
        assert json.load(f)["protocol"] == report["protocol"]
    bpd_line, score_line = report["protocol"]
    assert bpd_line.startswith("test bits/dim") and "3 images of digits/test" in bpd_line
    assert "EMA weights of step 7" in bpd_line
    for text in ("digits-FID", "digits-IS", "digits-KID", "12 samples (ddim, 5 steps, eta 0.0, time spacing",
                 "1437 images of digits/train", digits_net.name, digits_net.weights_sha256[:16]):
        assert text in score_line, text
    for entry in report["scores"].values():
        assert entry["feature_net_sha256"] == digits_net.weights_sha256
        assert entry["num_samples"] == 12 and entry["reference"]["split"] == "train"
    assert report["scores"]["fid"]["value"] > 0
    stem = report["path"][:-len(".json")]
    assert np.load(stem + "_bpd_terms.npz")["terms_bpd"].shape == (5,)
    assert np.load(stem + "_samples.npz")["images"].shape == (12, 16, 16, 1)
    assert evaluate.scalars(report).keys() == {"eval/bpd", "eval/digits-FID", "eval/digits-IS",
                                               "eval/digits-KID"}
    cached = os.listdir(os.path.join(cache_dir, "reference_stats"))
    assert len(cached) == 1 and "digits-16px-train-all" in cached[0]


class _ClassApply:
    """A class-conditional double: out = a[t] x_t + b[t] + c[y]; y=None is the null label 3."""

    null_label = 3

    def __call__(self, params, x_t, t, y=None):
        if y is None:
            y = jnp.full(x_t.shape[:1], self.null_label)
        return _linear_apply(params, x_t, t) + params["c"][y].reshape(-1, 1, 1, 1)


_CLASS_APPLY = _ClassApply()  # one instance: it keys the sampler's compilation cache


@pytest.mark.slow
def test_balanced_labels_and_guidance_reach_the_samples(tmp_path, cache_dir, digits_net):
    from configs import digits as digits_config
    from ddpm_jax import sampling

    config = digits_config.get_config("tiny")
    config.diffusion.timesteps = 5
    config.data.image_size = 16   # the size of the digits_net fixture and the samples below
    config.data.data_dir = str(tmp_path / "tfds")
    params = {"a": jnp.linspace(0.1, 0.5, 5), "b": jnp.zeros(5),
              "c": jnp.array([0.4, -0.3, 0.1, 0.0])}
    schedule = Schedule.create("linear", 5)
    reports = {}
    for labels, guidance in (("balanced", 2.0), ("none", None)):
        options = evaluate.EvalOptions.from_config(
                config, metrics=("fid",), num_samples=7, sample_batch_size=4,
                cache_dir=cache_dir, labels=labels, guidance=guidance)
        options.sampler = options.sampler.with_overrides(steps=5)
        reports[labels] = evaluate.run_evaluation(evaluate.RunData.from_config(config), _CLASS_APPLY, params, options,
                                                  workdir=str(tmp_path / "run"), step=7,
                                                  progress=False)
    guided = reports["balanced"]
    assert guided["path"].endswith("report_step7_ema_ddim5-n7-digits_balanced-w2.json")
    assert "classes n mod 3, guidance w=2" in guided["protocol"][0]
    assert "unconditional (null label)" in reports["none"]["protocol"][0]
    assert guided["samples"]["labels"] == "balanced" and guided["samples"]["guidance"] == 2.0
    saved = np.load(guided["path"][:-len(".json")] + "_samples.npz")
    np.testing.assert_array_equal(saved["labels"], np.arange(7) % 3)
    # The same images as the sampler gives for those classes (in one batch of 8: the batch
    # size does not matter), with the key the protocol documents for samples.
    sampler = sampling.make_sampler(_CLASS_APPLY, schedule, (8, 16, 16, 1),
                                    SamplerSpec(sampler="ddim", steps=5, eta=0.0, var_type="fixedlarge"),
                                    guidance=2.0)
    expected = sampling.draw_images(sampler, params, jax.random.fold_in(jax.random.key(0), 2), 7,
                                    labels=np.arange(7) % 3, progress=False)
    np.testing.assert_array_equal(saved["images"], expected)
    unconditional = np.load(reports["none"]["path"][:-len(".json")] + "_samples.npz")
    assert "labels" not in unconditional and (unconditional["images"] != expected).any()


def test_class_options_are_checked():
    from configs import digits as digits_config
    from ddpm_jax import sampling

    config = digits_config.get_config("tiny")
    config.eval.labels, config.eval.guidance = "balanced", 1.5  # what periodic evaluation reads
    options = evaluate.EvalOptions.from_config(config)
    assert (options.labels, options.guidance) == ("balanced", 1.5)
    assert evaluate.EvalOptions.from_config(config, guidance=3.0).guidance == 3.0
    with pytest.raises(ValueError, match="needs labels: .* set labels='balanced'"):
        evaluate.EvalOptions(guidance=1.0)
    with pytest.raises(ValueError, match="labels='perclass': choose one of"):
        evaluate.EvalOptions(labels="perclass")
    with pytest.raises(ValueError, match="guidance=-1.0: use a finite number >= 0 and <= 1000"):
        evaluate.EvalOptions(labels="balanced", guidance=-1.0)
    with pytest.raises(ValueError, match="needs a class-conditional model.*use labels='none'"):
        sampling.balanced_labels(_linear_apply, 4)


def test_solver_options_come_from_the_config_and_are_checked():
    from configs import digits as digits_config

    config = digits_config.get_config("tiny")
    config.sampling.sampler, config.sampling.spacing, config.sampling.order = "dpm++", "logsnr", 3
    spec = evaluate.EvalOptions.from_config(config).sampler
    assert (spec.sampler, spec.spacing, spec.order) == ("dpm++", "logsnr", 3)
    assert evaluate.EvalOptions.from_config(config, sampler=dict(order=1)).sampler.order == 1
    with pytest.raises(ValueError, match="spacing='karras': choose one of"):
        evaluate.EvalOptions.from_config(config, sampler=dict(spacing="karras"))
    with pytest.raises(ValueError, match="order=4: dpm\\+\\+ has orders 1..3"):
        evaluate.EvalOptions.from_config(config, sampler=dict(order=4))
    with pytest.raises(TypeError, match="sampler must be a SamplerSpec"):
        evaluate.EvalOptions(sampler="ddim")


def _tiny_checkpoint(workdir, data_dir, step=3):
    """A checkpoint of the tiny digits UNet (T = 10), saved like the loop. Its arrays are
    zeros (shapes from eval_shape: no compile); the network then predicts eps = 0."""
    from configs import digits as digits_config
    from ddpm_jax import checkpoint, training
    from ddpm_jax import config as config_lib

    config = digits_config.get_config("tiny")
    config.diffusion.timesteps = 10
    config.data.data_dir = data_dir
    model = config_lib.model_from_config(config)
    optimizer = training.make_optimizer(grad_clip=1.0)
    size = config.data.image_size
    shapes = jax.eval_shape(lambda rng: training.create_train_state(model, optimizer, rng,
                                                                    (size, size, 1)),
                            jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    manager = checkpoint.make_manager(workdir, max_to_keep=1)
    checkpoint.save(manager, step, state, config)
    manager.wait_until_finished()
    manager.close()


@pytest.mark.slow
def test_evaluate_command_line_on_a_tiny_checkpoint(tmp_path):
    # Flags -> options -> checkpoint -> report; FID / IS are covered in-process above.
    workdir = str(tmp_path / "run")
    _tiny_checkpoint(workdir, str(tmp_path / "tfds"))
    result = subprocess.run(
            [sys.executable, "evaluate.py", f"--workdir={workdir}", "--metrics=bpd",
             "--bpd_num_images=2", "--bpd_batch_size=2", "--noprogress"],
            cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()     # TFDS's preparation also prints here
    bpd_line, = [line for line in lines if line.startswith("test bits/dim")]
    assert "2 images of digits/test, EMA weights of step 3" in bpd_line
    assert "all T=10 steps" in bpd_line
    with open(lines[-1].split("Report: ")[1]) as f:
        report = json.load(f)
    assert report["checkpoint"] == {"step": 3, "weights": "ema"}
    assert report["bpd"]["num_images"] == 2 and np.isfinite(report["bpd"]["total"])
    assert report["path"].endswith("report_step3_ema_bpd-test.json")

    refused = subprocess.run(
            [sys.executable, "evaluate.py", f"--workdir={workdir}", "--metrics=fid",
             "--labels=balanced", "--noprogress"],
            cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
            timeout=300, check=False)
    assert refused.returncode != 0
    assert "--labels='balanced' needs a class-conditional model" in refused.stderr
    for args, message in ((["--sampler=ddim", "--order=2"], "order=2 only applies to sampler 'dpm++'"),
                          (["--sampler=dpm++", "--steps=2", "--order=3"], "needs at least 3")):
        refused = subprocess.run(
                [sys.executable, "evaluate.py", f"--workdir={workdir}", "--metrics=fid",
                 "--noprogress", *args], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                capture_output=True, text=True, timeout=300, check=False)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr, refused.stderr[-2000:]
