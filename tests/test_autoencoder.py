"""The latent-diffusion first stage (models/autoencoder.py): shapes, the KL term and the loss
against float64 NumPy formulas, and the reparameterised draw."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.autoencoder import Autoencoder, autoencoder_loss, gaussian_kl

MODEL = Autoencoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2, image_channels=1,
                    num_groups=4)


@pytest.fixture(scope="module")
def init():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    params = jax.jit(MODEL.init)({"params": jax.random.key(0)}, x, jax.random.key(1))["params"]
    return x, params


def test_shapes_and_the_downsampling_factor(init):
    x, params = init
    out = jax.jit(MODEL.apply)({"params": params}, x, jax.random.key(2))
    assert MODEL.factor == 2
    assert out["reconstruction"].shape == (4, 8, 8, 1)
    assert out["mean"].shape == out["log_variance"].shape == out["z"].shape == (4, 4, 4, 2)
    decoded = jax.jit(lambda p, z: MODEL.apply(p, z, method="decode"))({"params": params}, out["z"])
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(out["reconstruction"]))
    with pytest.raises(ValueError, match=r"H and W multiples of f = 2; got shape \(1, 7, 8, 1\)"):
        MODEL.apply({"params": params}, jnp.zeros((1, 7, 8, 1)), method="encode")


def test_kl_and_loss_match_float64_formulas():
    rng = np.random.default_rng(1)
    mean, log_var = rng.normal(size=(2, 3, 3, 2)), rng.normal(size=(2, 3, 3, 2)) * 0.5
    expected_kl = 0.5 * np.sum(mean**2 + np.exp(log_var) - 1 - log_var, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(gaussian_kl(jnp.asarray(mean, jnp.float32),
                                                      jnp.asarray(log_var, jnp.float32))),
                               expected_kl, rtol=1e-5)
    x, rec = rng.uniform(-1, 1, (2, 6, 6, 1)), rng.uniform(-1, 1, (2, 6, 6, 1))
    out = {k: jnp.asarray(v, jnp.float32) for k, v in
           dict(reconstruction=rec, mean=mean, log_variance=log_var).items()}
    for kind, error in (("l1", np.abs(rec - x).mean()), ("l2", np.square(rec - x).mean())):
        loss, metrics = autoencoder_loss(jnp.asarray(x, jnp.float32), out, kl_weight=0.3,
                                         reconstruction=kind)
        np.testing.assert_allclose(float(loss), error + 0.3 * expected_kl.mean() / 36, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["kl"]), expected_kl.mean() / 36, rtol=1e-5)
    with pytest.raises(ValueError, match=r"reconstruction='l3': choose one of \('l1', 'l2'\)"):
        autoencoder_loss(jnp.asarray(x), out, kl_weight=0.0, reconstruction="l3")


def test_the_latent_draw_has_the_encoders_mean_and_variance(init):
    x, params = init
    mean, log_var = jax.jit(lambda p, x: MODEL.apply(p, x, method="encode"))({"params": params}, x[:1])
    draws = jax.jit(jax.vmap(lambda k: MODEL.apply({"params": params}, x[:1], k)["z"][0]))(
        jax.random.split(jax.random.key(3), 2000))
    draws = np.asarray(draws, np.float64)
    std = np.exp(0.5 * np.asarray(log_var[0], np.float64))
    # 2000 draws: the sample mean is within 5 standard errors of the encoder's mean everywhere.
    assert np.all(np.abs(draws.mean(0) - np.asarray(mean[0])) < 5 * std / np.sqrt(2000))
    np.testing.assert_allclose(draws.std(0), std, rtol=0.12)
