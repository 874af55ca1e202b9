"""StyleAligned's shared attention (models/style_aligned.py) on the feature seam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.style_aligned import StyleAlignedApply, attention_sites, shared_attention
from ddpm_jax.models.unet import UNet
from ddpm_jax.sampling import ModelApply

ARCH = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
            num_classes=3)


def _model_and_inputs(rows: int = 3):
    model = UNet(**ARCH)
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, 8, 8, 1))
    t = jnp.arange(rows) * 300 + 1
    y = jnp.arange(rows) % 4
    params = jax.jit(lambda key: model.init(key, x, t, y, train=False)["params"])(
        jax.random.PRNGKey(1))
    # Give the zero-initialised output layers weights, so every block reaches the output.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.05 if any(getattr(k, "key", None) in ("conv_1", "proj_out", "conv_out")
                                         for k in path) else p, params)
    return model, params, (x, t, y)


def _attend64(q, k, v):
    logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bqk,bkc->bqc", w / w.sum(-1, keepdims=True), v)


def _adain64(x, ref):
    mu, sd = x.mean(1, keepdims=True), np.sqrt(x.var(1, keepdims=True) + 1e-5)
    mu_r, sd_r = ref.mean(1, keepdims=True), np.sqrt(ref.var(1, keepdims=True) + 1e-5)
    return sd_r * (x - mu) / sd + mu_r


@pytest.mark.parametrize("use_adain, shift", [(True, 0.0), (False, 0.0), (True, float(np.log(4)))])
def test_shared_attention_matches_a_float64_reference(use_adain, shift):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(4, 16, 8)) * s + m for s, m in ((1, 0), (2, 1), (1, -1)))
    r = 2
    out = shared_attention(lambda a, b, c: jnp.asarray(_attend64(*map(np.asarray, (a, b, c))),
                                                       jnp.float32),
                           *(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                           reference_row=r, use_adain=use_adain, reference_shift=shift)
    qh, kh = (_adain64(q, q[r:r + 1]), _adain64(k, k[r:r + 1])) if use_adain else (q, k)
    keys = np.concatenate([np.repeat(k[r:r + 1], 4, 0), kh], 1)
    values = np.concatenate([np.repeat(v[r:r + 1], 4, 0), v], 1)
    # A shift s of the reference keys' logits weighs each of them e^s: as e^s copies of it.
    copies = round(np.exp(shift)) if shift else 1
    assert abs(np.exp(shift) - copies) < 0.02 or not shift
    keys = np.concatenate([keys[:, :16]] * copies + [keys[:, 16:]], 1)
    values = np.concatenate([values[:, :16]] * copies + [values[:, 16:]], 1)
    expected = _attend64(qh, keys, values)
    expected[r] = _attend64(q[r:r + 1], k[r:r + 1], v[r:r + 1])[0]
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_off_is_bit_identical_on_keeps_the_reference_row_and_copies_of_it():
    model, params, (x, t, y) = _model_and_inputs()
    # Row 2 is a copy of the reference row 1: for it AdaIN is the identity and attention over
    # [K_r; K_r] with [V_r; V_t] = [V_r; V_r] is attention over K_r, its own output.
    x, t, y = x.at[2].set(x[1]), t.at[2].set(t[1]), y.at[2].set(y[1])
    plain_fn = ModelApply(model)
    style = StyleAlignedApply(plain_fn, attention_sites(params, "all"), reference_row=1)

    @jax.jit
    def outputs(params):  # one program: compiles are the cost of this test
        return (plain_fn(params, x, t, y), StyleAlignedApply(plain_fn)(params, x, t, y),
                style(params, x, t, y))

    plain, off, on = map(np.asarray, outputs(params))
    np.testing.assert_array_equal(off, plain)
    np.testing.assert_allclose(on[1:], plain[1:], atol=1e-5)  # the reference and its copy
    assert np.abs(on[0] - plain[0]).max() > 1e-3


def test_bad_style_options_give_one_line_each():
    params = jax.eval_shape(lambda: UNet(**ARCH).init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)),
                                                      jnp.zeros(1, jnp.int32),
                                                      jnp.zeros(1, jnp.int32), train=False))["params"]
    assert attention_sites(params, "up") == tuple(
        f"{b}.attend" for b in sorted(params) if b.startswith("up") and "_attn" in b)
    cases = [(lambda: attention_sites(params, ["up_9_attn_0"]), "style layers"),
             (lambda: attention_sites({"up_0_block_0": {}}, "all"), "has none"),
             (lambda: StyleAlignedApply(None, ("up_1_attn_0.attend",), reference_row=-1),
              "reference_row")]
    for make, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            make()
        assert "\n" not in str(info.value)
