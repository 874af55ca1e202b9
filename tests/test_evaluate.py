"""Evaluation: bits/dim against a float64 NumPy bound, the digits feature net, the FID
InceptionV3 (random weights) against a PyTorch functional reference, and the command line."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from PIL import Image

from ddpm_jax import evaluate, features, metrics, plots
from ddpm_jax.data import builders
from ddpm_jax.models import classifier, inception
from ddpm_jax.schedule import Schedule, get_beta_schedule
from multihost import run_on_two_hosts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------- bits/dim

def _linear_apply(params, x_t, t):
    """A deterministic per-t linear "network": out = a[t] x_t + b[t]."""
    a = params["a"][t].reshape(-1, 1, 1, 1)
    b = params["b"][t].reshape(-1, 1, 1, 1)
    return a * x_t + b


def _numpy_bound(betas, a, b, x0, noise, mean_type, var_type, clip):
    """The variational bound in bits/dim, per image, written out in float64 NumPy.

    x0: [N, D] in [-1, 1]; noise: [N, T, D]; returns (total [N], terms [N, T], prior [N]).
    """
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    model_logvar = post_logvar if var_type == "fixedsmall" else np.log(np.append(post_var[1], betas[1:]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef_xt = (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    n, num_t, _ = noise.shape
    terms = np.zeros((n, num_t))
    for i in range(n):
        for t in range(num_t):
            x_t = np.sqrt(abar[t]) * x0[i] + np.sqrt(1 - abar[t]) * noise[i, t]
            out = a[t] * x_t + b[t]
            x0_hat = (x_t - np.sqrt(1 - abar[t]) * out) / np.sqrt(abar[t]) if mean_type == "eps" else out
            if clip:
                x0_hat = np.clip(x0_hat, -1, 1)
            mean = coef_x0[t] * x0_hat + coef_xt[t] * x_t
            if t == 0:
                std = np.exp(0.5 * model_logvar[0])
                upper = np.where(x0[i] > 0.999, np.inf, x0[i] + 1 / 255)
                lower = np.where(x0[i] < -0.999, -np.inf, x0[i] - 1 / 255)
                prob = scipy.special.ndtr((upper - mean) / std) - scipy.special.ndtr((lower - mean) / std)
                terms[i, t] = -np.mean(np.log(np.maximum(prob, 1e-12))) / np.log(2)
            else:
                true_mean = coef_x0[t] * x0[i] + coef_xt[t] * x_t
                lv1, lv2 = post_logvar[t], model_logvar[t]
                kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (true_mean - mean) ** 2 * np.exp(-lv2))
                terms[i, t] = np.mean(kl) / np.log(2)
    m, v = np.sqrt(abar[-1]) * x0, 1 - abar[-1]
    prior = np.mean(0.5 * (-1 - np.log(v) + v + m ** 2), axis=1) / np.log(2)
    return prior + terms.sum(1), terms, prior


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
    total, terms, prior = _numpy_bound(betas, np.asarray(params["a"], np.float64),
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
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
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


def test_per_t_curve_plot_is_written(tmp_path):
    path = tmp_path / "curve.png"
    plots.save_line_plot(path, np.geomspace(3.0, 1e-4, 50), title="L_t", xlabel="t",
                         ylabel="bits/dim")
    with Image.open(path) as img:
        assert img.size == (720, 420)
        assert len(img.convert("RGB").getcolors(1 << 16)) > 2      # axes, text and the curve


# --------------------------------------------------------------------- digits feature net

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits_net(cache_dir):
    return features.digits_feature_net(16, cache_dir=cache_dir)


def test_digits_classifier_reaches_95_percent_test_accuracy(digits_net, cache_dir):
    params, info = classifier.load_or_train(16, cache_dir=cache_dir)   # from the cache now
    assert info["sha256"] == digits_net.weights_sha256
    test_images, test_labels = builders.digits_arrays(16)["test"]
    acc = classifier.accuracy(params, test_images, test_labels)
    assert acc >= 0.95, acc
    assert acc == pytest.approx(info["test_accuracy"])


def test_digits_fid_of_real_test_images_is_far_below_noise(digits_net):
    digits = builders.digits_arrays(16)
    train, _ = digits["train"]
    test, _ = digits["test"]
    noise = np.random.RandomState(0).randint(0, 256, size=test.shape).astype(np.uint8)
    ref = metrics.feature_statistics(features.compute_features(digits_net, train, progress=False)[0])

    def fid(images):
        return metrics.frechet_distance(*metrics.feature_statistics(
                features.compute_features(digits_net, images, progress=False)[0]), *ref)

    real, noisy = fid(test), fid(noise)
    assert real < 0.05 * noisy, (real, noisy)
    scores = features.compute_features(digits_net, test, progress=False)[1]
    assert metrics.inception_score(scores, splits=1)[0] > 8.0     # 10 balanced, confident classes


# ------------------------------------------------------------------------------ Inception

@pytest.fixture(scope="module")
def inception_variables():
    return inception.random_variables(0)


@pytest.fixture(scope="module")
def inception_75(inception_variables):
    return jax.jit(inception.InceptionV3(resize_to=75).apply)


def test_inception_shapes_and_determinism(inception_variables, inception_75):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
    a, b = inception_75(inception_variables, x), inception_75(inception_variables, x)
    assert a["pool3"].shape == (2, 2048) and a["logits"].shape == (2, 1008)
    np.testing.assert_array_equal(a["pool3"], b["pool3"])
    assert np.all(np.isfinite(a["pool3"])) and float(jnp.std(a["pool3"])) > 0
    assert not np.allclose(a["pool3"][0], a["pool3"][1])


def _torch_fid_inception(sd, x):
    """pytorch-fid's FID InceptionV3 (torchvision's blocks with the FID patches), written with
    torch.nn.functional over a state dict: x [B, 3, H, W] in [-1, 1] -> (pool3, logits)."""
    import torch
    import torch.nn.functional as F

    def conv(name, h, stride=1, padding=0):
        h = F.conv2d(h, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
        h = F.batch_norm(h, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                         sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], eps=1e-3)
        return F.relu(h)

    def avg(h):
        return F.avg_pool2d(h, 3, stride=1, padding=1, count_include_pad=False)

    def cat(xs):
        return torch.cat(xs, 1)

    def block_a(p, h):
        return cat([conv(f"{p}.branch1x1", h),
                    conv(f"{p}.branch5x5_2", conv(f"{p}.branch5x5_1", h), padding=2),
                    conv(f"{p}.branch3x3dbl_3", conv(f"{p}.branch3x3dbl_2",
                         conv(f"{p}.branch3x3dbl_1", h), padding=1), padding=1),
                    conv(f"{p}.branch_pool", avg(h))])

    def block_c(p, h):
        b7 = conv(f"{p}.branch7x7_3", conv(f"{p}.branch7x7_2", conv(f"{p}.branch7x7_1", h),
                  padding=(0, 3)), padding=(3, 0))
        bd = conv(f"{p}.branch7x7dbl_1", h)
        for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
            bd = conv(f"{p}.branch7x7dbl_{i}", bd, padding=pad)
        return cat([conv(f"{p}.branch1x1", h), b7, bd, conv(f"{p}.branch_pool", avg(h))])

    def block_e(p, h, pool):
        b3 = conv(f"{p}.branch3x3_1", h)
        bd = conv(f"{p}.branch3x3dbl_2", conv(f"{p}.branch3x3dbl_1", h), padding=1)
        return cat([conv(f"{p}.branch1x1", h),
                    conv(f"{p}.branch3x3_2a", b3, padding=(0, 1)),
                    conv(f"{p}.branch3x3_2b", b3, padding=(1, 0)),
                    conv(f"{p}.branch3x3dbl_3a", bd, padding=(0, 1)),
                    conv(f"{p}.branch3x3dbl_3b", bd, padding=(1, 0)),
                    conv(f"{p}.branch_pool", pool(h))])

    h = conv("Conv2d_1a_3x3", x, stride=2)
    h = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", h), padding=1)
    h = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", F.max_pool2d(h, 3, 2)))
    h = F.max_pool2d(h, 3, 2)
    for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        h = block_a(p, h)
    h = cat([conv("Mixed_6a.branch3x3", h, stride=2),
             conv("Mixed_6a.branch3x3dbl_3", conv("Mixed_6a.branch3x3dbl_2",
                  conv("Mixed_6a.branch3x3dbl_1", h), padding=1), stride=2),
             F.max_pool2d(h, 3, 2)])
    for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        h = block_c(p, h)
    b7 = conv("Mixed_7a.branch7x7x3_1", h)
    b7 = conv("Mixed_7a.branch7x7x3_3", conv("Mixed_7a.branch7x7x3_2", b7, padding=(0, 3)),
              padding=(3, 0))
    h = cat([conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", h), stride=2),
             conv("Mixed_7a.branch7x7x3_4", b7, stride=2), F.max_pool2d(h, 3, 2)])
    h = block_e("Mixed_7b", h, avg)
    h = block_e("Mixed_7c", h, lambda z: F.max_pool2d(z, 3, stride=1, padding=1))
    pool3 = h.mean(dim=(2, 3))
    return pool3, pool3 @ sd["fc.weight"].T


def test_inception_matches_pytorch_fid_structure_on_random_weights(inception_variables,
                                                                  inception_75, tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(1)
    state = inception.variables_to_state_dict(inception_variables)
    for name in state:   # non-trivial batch statistics, so that a mix-up of them shows
        if name.endswith(("running_mean", "bn.bias")):
            state[name] = rng.uniform(-0.2, 0.2, state[name].shape).astype(np.float32)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = rng.uniform(0.5, 1.5, state[name].shape).astype(np.float32)
    path = str(tmp_path / "random_fid_inception.pth")
    torch.save({k: torch.tensor(v) for k, v in state.items()}, path)
    with pytest.raises(ValueError, match="6726825d"):
        inception.load_inception_weights(path)          # not the real weights' hash
    variables, sha256 = inception.load_inception_weights(path, check_hash=False)
    assert sha256 == inception.file_sha256(path)
    x = rng.randint(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)   # the shape compiled above
    ours = inception_75(variables, x)
    tx = torch.nn.functional.interpolate(torch.from_numpy(x / 255.0).permute(0, 3, 1, 2).float(),
                                         size=(75, 75), mode="bilinear", align_corners=False)
    with torch.no_grad():
        pool3, logits = _torch_fid_inception({k: torch.tensor(v) for k, v in state.items()},
                                             2 * tx - 1)
    np.testing.assert_allclose(ours["pool3"], pool3.numpy(), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(ours["logits"], logits.numpy(), rtol=2e-3, atol=2e-3)

    npz = str(tmp_path / "random_fid_inception.npz")
    inception.export_npz(path, npz)
    from_npz, _ = inception.load_inception_weights(npz)
    jax.tree.map(np.testing.assert_array_equal, from_npz, variables)


def test_missing_inception_weights_name_the_file_and_its_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_inception_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="--inception_weights"):
        features.inception_feature_net(None)


# --------------------------------------------------------------------------- command line

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
    assert (options.feature_net, options.sampler, options.steps) == ("digits", "ddim", 10)
    options.steps = 5
    workdir = str(tmp_path / "run")
    report = evaluate.run_evaluation(config, _linear_apply, params, options, workdir=workdir,
                                     step=7, progress=False)
    assert report["path"] == os.path.join(
            workdir, "eval", "report_step7_ema_bpd-test_ddim5-n12-digits.json")
    with open(report["path"]) as f:
        assert json.load(f)["protocol"] == report["protocol"]
    bpd_line, score_line = report["protocol"]
    assert bpd_line.startswith("test bits/dim") and "3 images of digits/test" in bpd_line
    assert "EMA weights of step 7" in bpd_line
    for text in ("digits-FID", "digits-IS", "digits-KID", "12 samples (ddim sampler, 5 steps",
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
        options.steps = 5
        reports[labels] = evaluate.run_evaluation(config, _CLASS_APPLY, params, options,
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
    sampler = sampling.make_sampler(_CLASS_APPLY, schedule, (8, 16, 16, 1), sampler="ddim",
                                    steps=5, eta=0.0, var_type="fixedlarge", guidance=2.0)
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
    with pytest.raises(ValueError, match="it needs labels='balanced'"):
        evaluate.EvalOptions(guidance=1.0)
    with pytest.raises(ValueError, match="labels='perclass': choose one of"):
        evaluate.EvalOptions(labels="perclass")
    with pytest.raises(ValueError, match="guidance=-1.0: use a weight >= 0"):
        evaluate.EvalOptions(labels="balanced", guidance=-1.0)
    with pytest.raises(ValueError, match="needs a class-conditional model.*use labels='none'"):
        sampling.balanced_labels(_linear_apply, 4)


def test_solver_options_come_from_the_config_and_are_checked():
    from configs import digits as digits_config

    config = digits_config.get_config("tiny")
    config.sampling.sampler, config.sampling.spacing, config.sampling.order = "dpm++", "logsnr", 3
    options = evaluate.EvalOptions.from_config(config)
    assert (options.sampler, options.spacing, options.order) == ("dpm++", "logsnr", 3)
    assert evaluate.EvalOptions.from_config(config, order=1).order == 1
    with pytest.raises(ValueError, match="spacing='karras': choose one of"):
        evaluate.EvalOptions(spacing="karras")
    with pytest.raises(ValueError, match="order=4: DPM-Solver\\+\\+ has orders 1..3"):
        evaluate.EvalOptions(order=4)


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
    assert "--labels=balanced needs a class-conditional model" in refused.stderr
    for args, message in ((["--sampler=ddim", "--order=2"], "--order=2 only applies"),
                          (["--sampler=dpm++", "--steps=2", "--order=3"], "needs at least 3")):
        refused = subprocess.run(
                [sys.executable, "evaluate.py", f"--workdir={workdir}", "--metrics=fid",
                 "--noprogress", *args], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                capture_output=True, text=True, timeout=300, check=False)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr, refused.stderr[-2000:]
