"""The UNet's feature seam (models/seams.py): reading and replacing block outputs and the
attention core at apply time."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import seams
from ddpm_jax.models.unet import UNet

ARCH = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, num_classes=3)


@functools.cache   # one init per model: eager Flax init of a UNet is slow
def _model_and_inputs(remat: bool = False):
    model = UNet(**ARCH, remat=remat)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    t = jnp.array([1, 50, 900])
    y = jnp.array([0, 2, 3])
    params = jax.jit(lambda k: model.init(k, x, t, y, train=False)["params"])(jax.random.PRNGKey(1))
    # Give the zero-initialised output layers weights, so every block reaches the output.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.05 if any(getattr(k, "key", None) in ("conv_1", "proj_out", "conv_out")
                                         for k in path) else p, params)
    return model, params, (x, t, y)


@pytest.mark.parametrize("remat", [False, True])
def test_pass_through_hooks_leave_the_model_bit_identical(remat):
    model, params, (x, t, y) = _model_and_inputs(remat)
    apply = jax.jit(lambda p: model.apply({"params": p}, x, t, y, train=False))
    plain = apply(params)

    def passthrough(call, args, kwargs):
        return call(*args, **kwargs)

    sites = ["up_0_block_0", "mid_attn", "mid_attn.attend", "up_1_attn_0.attend", "down_1_block_0"]
    hooked = jax.jit(lambda p: _apply_with(model, p, (x, t, y), {s: passthrough for s in sites}))(params)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))


def _apply_with(model, params, inputs, per_site):
    with seams.hooks(per_site):
        return model.apply({"params": params}, *inputs, train=False)


def test_the_captured_attention_core_is_softmax_attention_in_float64():
    model, params, inputs = _model_and_inputs()

    @jax.jit
    def run(params):
        seen = {}

        def record(call, args, kwargs):
            seen["qkv"] = args
            seen["out"] = call(*args, **kwargs)
            return seen["out"]

        _apply_with(model, params, inputs, {"mid_attn.attend": record})
        return seen["qkv"], seen["out"]

    qkv, out = run(params)
    q, k, v = (np.asarray(a, np.float64) for a in qkv)
    logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bqk,bkc->bqc", weights, v), atol=1e-5)
    assert q.shape == (3, 4 * 4, 16)  # the middle works at 4x4 with 2 * ch channels


def test_replacing_a_block_output_changes_only_what_it_feeds_and_capture_reads_it():
    model, params, inputs = _model_and_inputs()

    # Row 0 takes row 1's features at the last decoder block (up_0_block_1): only row 0's
    # output moves, and it becomes exactly what row 1's features give through the output head.
    def swap_row0(call, args, kwargs):
        h = call(*args, **kwargs)
        return h.at[0].set(h[1])

    @jax.jit
    def run(params):
        with seams.capture(["up_0_block_0", "up_1_block_1"]) as found:
            plain = model.apply({"params": params}, *inputs, train=False)
        swapped = _apply_with(model, params, inputs, {"up_0_block_1": swap_row0})
        return plain, swapped, dict(found)

    plain, swapped, found = run(params)
    assert found["up_0_block_0"].shape == (3, 8, 8, 8) and found["up_1_block_1"].shape == (3, 4, 4, 16)
    np.testing.assert_array_equal(np.asarray(swapped[1:]), np.asarray(plain[1:]))
    np.testing.assert_allclose(np.asarray(swapped[0]), np.asarray(plain[1]), atol=1e-6)
    assert not np.allclose(np.asarray(swapped[0]), np.asarray(plain[0]), atol=1e-3)


def test_bad_sites_are_refused_in_one_line():
    model, params, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="unknown feature site 'up_0_conv'"):
        with seams.hooks({"up_0_conv": lambda c, a, k: c(*a, **k)}):
            pass
    with pytest.raises(ValueError, match="only attention blocks have '.attend'"):
        seams.check_sites(["up_0_block_0.attend"])
    with pytest.raises(ValueError, match="'up_3_block_0' is not a block of this model"):
        seams.check_sites(["up_3_block_0"], params)
