"""The UNet's own GroupNorm and Conv layers against float64 NumPy derivations, and their
gradients against autodiff of the plain XLA formulation."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.unet import Conv, GroupNorm, dense_conv_matrix
from reference import np_conv, np_group_norm


@pytest.mark.parametrize("group_matmul", [None, True, False])
@pytest.mark.parametrize("groups,channels", [(32, 64), (8, 16), (1, 6)])
def test_group_norm_matches_float64_reference(groups, channels, group_matmul):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((3, 5, 4, channels)) + 2).astype(np.float32)
    scale = rng.standard_normal(channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    out = GroupNorm(groups, epsilon=1e-6, group_matmul=group_matmul).apply(params, jnp.asarray(x))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_group_norm(x, scale, bias, groups, 1e-6), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("group_matmul", [True, False])
def test_group_norm_parameters_and_gradients_match_flax(group_matmul):
    """Same parameter tree as nn.GroupNorm (checkpoints interchange) and the same gradients,
    with either way of moving between channels and groups."""
    x = 2 * jax.random.normal(jax.random.key(0), (2, 4, 4, 32)) + 1
    ours = GroupNorm(8, group_matmul=group_matmul)
    ref = nn.GroupNorm(num_groups=8, epsilon=1e-6, use_fast_variance=False)
    ref_params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, ref_params)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), ref_params)
    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(3 * module.apply(p, x)))  # noqa: E731
    ours_grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_group_norm_default_on_the_cpu_is_the_matmul_form():
    x = jnp.ones((2, 4, 4, 16))
    params = GroupNorm(4).init(jax.random.key(0), x)

    def lowered(**kwargs):
        return jax.jit(lambda p, x: GroupNorm(4, **kwargs).apply(p, x)).lower(params, x).as_text()

    assert jax.default_backend() == "cpu"
    assert "dot_general" in lowered() and "dot_general" in lowered(group_matmul=True)
    assert "dot_general" not in lowered(group_matmul=False)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="num_groups"):
        GroupNorm(4).init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))


_CONV_CASES = [  # (kernel, stride, padding, image size) with at least one output pixel
    (kernel, stride, padding, size)
    for kernel, stride, padding in [(3, 1, "SAME"), (1, 1, "SAME"), (3, 2, ((0, 1), (0, 1))),
                                    (3, 1, "VALID")]
    for size in (6, 2, 1)
    if padding == "SAME" or size + (padding != "VALID") >= kernel]


@pytest.mark.parametrize("dense", [None, True, False])
@pytest.mark.parametrize("kernel,stride,padding,size", _CONV_CASES)
def test_conv_matches_float64_reference(kernel, stride, padding, size, dense):
    """Both formulations (XLA's convolution, the dense matrix) at image sizes on both sides of
    the CPU default's 4-pixel threshold."""
    pad = {"SAME": ((kernel // 2, kernel // 2),) * 2, "VALID": ((0, 0),) * 2}.get(padding, padding)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, size, size, 5)).astype(np.float32)
    k = rng.standard_normal((kernel, kernel, 5, 7)).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    params = {"params": {"kernel": jnp.asarray(k), "bias": jnp.asarray(bias)}}
    out = Conv(7, kernel, stride, padding, dense=dense).apply(params, jnp.asarray(x))
    np.testing.assert_allclose(out, np_conv(x, k, stride, pad) + bias, atol=1e-4, rtol=1e-5)


def test_dense_conv_matrix_entries_are_the_kernel_taps():
    """On a 2x2 image with SAME padding every output pixel sees every input pixel; entry
    (input (h, w), output (i, j)) is the kernel tap (h - i + 1, w - j + 1)."""
    k = jnp.arange(9.0).reshape(3, 3, 1, 1)
    matrix, out_hw = dense_conv_matrix(k, (2, 2), 1, "SAME")
    assert out_hw == (2, 2) and matrix.shape == (4, 4)
    expected = np.array([[k[h - i + 1, w - j + 1, 0, 0] for i in range(2) for j in range(2)]
                         for h in range(2) for w in range(2)])
    np.testing.assert_array_equal(matrix, expected)
    matrix, out_hw = dense_conv_matrix(k, (3, 1), 2, ((0, 1), (1, 1)))   # taps off the image: 0
    assert out_hw == (1, 1)
    np.testing.assert_array_equal(matrix[:, 0], [k[0, 1, 0, 0], k[1, 1, 0, 0], k[2, 1, 0, 0]])


def test_conv_default_on_the_cpu_is_dense_up_to_four_pixels():
    def lowered(size: int, **kwargs) -> str:
        x = jnp.ones((2, size, size, 3))
        module = Conv(4, **kwargs)
        return jax.jit(module.apply).lower(module.init(jax.random.key(0), x), x).as_text()

    assert jax.default_backend() == "cpu"
    assert "convolution" not in lowered(2) and "convolution" not in lowered(1)
    assert "convolution" in lowered(4) and "convolution" in lowered(2, dense=False)
    assert "convolution" not in lowered(4, dense=True)


def test_conv_parameters_match_flax():
    x = jnp.ones((1, 4, 4, 3))
    for kernel in (1, 3):
        ours = Conv(8, kernel).init(jax.random.key(0), x)
        ref = nn.Conv(8, (kernel, kernel)).init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,stride,padding,dense", [
    (1, 1, "SAME", None), (3, 2, ((0, 1), (0, 1)), None), (3, 1, "SAME", True),
    (3, 2, ((0, 1), (0, 1)), True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_gradients_match_flax(kernel, stride, padding, dense, dtype):
    """The 1x1 matmul path, the strided path and the dense matrix differentiate like nn.Conv, in
    both dtypes."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    ref = nn.Conv(7, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape),
                          ref.init(jax.random.key(1), x))
    ours = Conv(7, kernel, stride, padding, dtype=dtype, dense=dense)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))  # noqa: E731
    assert ours.apply(params, x).dtype == ref.apply(params, x).dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))):
        np.testing.assert_allclose(a, b, atol=tol * 10, rtol=tol)
