"""Visual Anagrams (editing/views.py): views as invertible transforms, their model call in the
one compiled chain, and the distribution it samples for Gaussian class-conditional data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.editing import views as views_lib
from ddpm_jax.sampling import make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec
from reference import scaled_linear

SHAPE = (8, 8, 1)
SIGMA = 0.3  # x0 | y ~ N(mu_y, SIGMA^2 I)


def _means(num_classes: int) -> np.ndarray:
    """[K + 1, H, W, C]: distinct, asymmetric class means; the null label's mean is 0."""
    rng = np.random.default_rng(3)
    return np.concatenate([rng.uniform(-0.6, 0.6, (num_classes,) + SHAPE),
                           np.zeros((1,) + SHAPE)]).astype(np.float32)


class GaussianClasses:
    """Exact eps of x0 | y ~ N(mu_y, s^2 I): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu_y) / v,
    v = a s^2 + 1 - a. Hashable by identity (keys the compile cache); null_label = K."""

    def __init__(self, betas, num_classes: int = 3):
        self.abar = jnp.asarray(np.cumprod(1.0 - np.asarray(betas, np.float64)), jnp.float32)
        self.means = jnp.asarray(_means(num_classes))
        self.null_label = num_classes

    def __call__(self, params, x_t, t, y=None):
        del params
        a = self.abar[t][:, None, None, None]
        mu = self.means[jnp.full(t.shape, self.null_label) if y is None else y]
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * SIGMA**2 + 1 - a)


class Averaged:
    """The plain model call averaged over two classes packed as y = y0 + (K+1) y1."""

    def __init__(self, model):
        self.model, self.null_label = model, views_lib.packed_null(model.null_label, 2)

    def __call__(self, params, x_t, t, y):
        base = self.model.null_label + 1
        return (self.model(params, x_t, t, y % base) + self.model(params, x_t, t, y // base)) / 2


def test_views_and_their_inverses_compose_to_the_identity_and_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    expected = {"identity": x, "rot90": np.rot90(x, 1, axes=(1, 2)),
                "rot180": x[:, ::-1, ::-1], "rot270": np.rot90(x, -1, axes=(1, 2)),
                "flip_h": x[:, :, ::-1], "flip_v": x[:, ::-1], "transpose": x.transpose(0, 2, 1, 3)}
    views = views_lib.make_views(list(expected) + ["permutation7"], (8, 8, 3))
    for view in views:
        out = np.asarray(view(jnp.asarray(x)))
        np.testing.assert_array_equal(np.asarray(view.inverse(jnp.asarray(out))), x)
        np.testing.assert_array_equal(np.asarray(view.forward(view.inverse(jnp.asarray(x)))), x)
        if view.name in expected:
            np.testing.assert_array_equal(out, expected[view.name])
    perm = views[-1].permutation
    flat = x.reshape(2, 64, 3)
    np.testing.assert_array_equal(np.asarray(views[-1](jnp.asarray(x))),
                                  flat[:, list(perm)].reshape(x.shape))
    assert sorted(perm) == list(range(64)) and list(perm) != list(range(64))


def test_identity_twice_equals_plain_sampling_with_the_averaged_prediction():
    spec = SamplerSpec(sampler="ddim", steps=6)
    betas = scaled_linear(100)
    model = GaussianClasses(betas)
    schedule = Schedule.from_betas(betas)
    pairs = np.array([[0, 1], [2, 0], [1, 1], [3, 2]])      # 3: the null label of one view
    views = views_lib.make_views(["identity", "identity"], SHAPE)
    anagram = make_sampler(views_lib.ViewsApply(model, views), schedule, (4,) + SHAPE, spec,
                           guidance=1.5)
    plain = make_sampler(Averaged(model), schedule, (4,) + SHAPE, spec, guidance=1.5)
    codes = views_lib.pack_labels(pairs, model.null_label)
    np.testing.assert_array_equal(codes, pairs[:, 0] + 4 * pairs[:, 1])
    key = jax.random.key(5)
    np.testing.assert_allclose(np.asarray(anagram(None, key, labels=codes)["images"]),
                               np.asarray(plain(None, key, labels=codes)["images"]),
                               rtol=0, atol=1e-6)


def test_anagram_samples_of_gaussian_classes_follow_the_view_averaged_gaussian():
    # Each view's term v^{-1} eps(v x, y) is the exact eps of N(v^{-1} mu_y, s^2 I); their
    # mean is that of N(mean_i v_i^{-1} mu_{y_i}, s^2 I), and guidance w (null mean 0) scales
    # the mean by 1 + w. (The spread is not checked: the discrete chain's own variance
    # deficit at T = 100 is a few percent, with or without views.)
    betas = scaled_linear(100)
    model = GaussianClasses(betas)
    views = views_lib.make_views(["identity", "rot180", "permutation1"], SHAPE)
    num, guidance = 512, 0.5
    sampler = make_sampler(views_lib.ViewsApply(model, views), Schedule.from_betas(betas),
                           (num,) + SHAPE, SamplerSpec(sampler="ddpm", var_type="fixedsmall",
                                                       clip_denoised=False), guidance=guidance)
    labels = np.array([2, 0, 1])
    x = np.asarray(sampler(None, jax.random.key(0),
                           labels=views_lib.pack_labels(np.tile(labels, (num, 1)), 3))["images"],
                   np.float64)
    means = _means(3).astype(np.float64)
    inverse = [means[2], means[0][::-1, ::-1],
               np.empty(64)]
    inverse[2][list(views[2].permutation)] = means[1].ravel()
    expected = (1 + guidance) * (inverse[0] + inverse[1] + inverse[2].reshape(SHAPE)) / 3
    stderr = SIGMA / np.sqrt(num)
    assert np.max(np.abs(x.mean(0) - expected)) < 4.5 * stderr, np.max(np.abs(x.mean(0) - expected))


def test_bad_views_and_labels_give_one_line_each():
    cases = [
        (lambda: views_lib.permutation_view([0, 1, 1, 3]), "is not invertible"),
        (lambda: views_lib.make_views([views_lib.View("half", lambda x: x, lambda x: x / 2)],
                                      SHAPE), "is not invertible"),
        (lambda: views_lib.make_views([views_lib.View("double", lambda x: 2 * x,
                                                      lambda x: x / 2)], SHAPE),
         "not a pixel permutation"),
        (lambda: views_lib.make_views(["rot90"], (8, 6, 1)), "keep the shape"),
        (lambda: views_lib.make_views(["rot45"], SHAPE), "unknown view 'rot45'"),
        (lambda: views_lib.ViewsApply(lambda p, x, t: x, views_lib.make_views(["identity"], SHAPE)),
         "class-conditional model"),
        (lambda: views_lib.pack_labels([6, 9], 10), "one class per view"),
        (lambda: views_lib.pack_labels([[6, 11]], 10), "0..9"),
    ]
    for make, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            make()
        assert "\n" not in str(info.value)


def test_sample_py_view_and_style_flags_are_checked_before_any_weights_load():
    from types import SimpleNamespace

    from ddpm_jax.editing import generation_jobs

    def flags(**given):
        return SimpleNamespace(**(dict(views=None, style_ref=None, style_layers=None,
                                       style_adain=True, style_shift=0.0, labels=None, classifier=None) | given))
    assert generation_jobs.check_flags(flags(views=["identity", "rot180"], labels="6,9,1,7"), None) \
        == "views"
    cases = [(flags(views=["identity", "rot180"], labels="6,9,1"), None, "3 classes for 2 views"),
             (flags(views=["identity", "rot180"], labels="balanced"), None, "one class per view"),
             (flags(views=["identity"], labels="6", style_ref="a.png"), None, "separate jobs"),
             (flags(views=["identity"], labels="6"), "sdedit", "separate jobs"),
             (flags(style_layers=["up"]), None, "only apply to --style_ref"),
             (flags(style_ref="a.png", classifier="clf"), None, "not --classifier")]
    for values, edit_mode, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            generation_jobs.check_flags(values, edit_mode)
        assert "\n" not in str(info.value)
