"""ddpm_jax.models.inception: the FID InceptionV3 (random weights) against a PyTorch functional
reference of pytorch-fid's network, and the weights' loading and naming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import features
from ddpm_jax.models import inception

# End-to-end through the loop, the command line or a reference framework: see pyproject's
# `slow` marker.
pytestmark = pytest.mark.slow


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
