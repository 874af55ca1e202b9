"""Editing by class (ddpm_jax/editing/by_class.py, pnp.py): DiffEdit, Blended diffusion,
Plug-and-Play. For Gaussian classes, x0 | y ~ N(mu_y, s^2 I), the class-conditional noise
predictor is exact and per pixel, so the DiffEdit mask, Blended's known region and its edited
region have closed forms; Plug-and-Play is checked for bit-identity on a tiny UNet."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import reverse
from ddpm_jax.editing import by_class, jobs as edit_jobs, pnp
from ddpm_jax.models.unet import UNet
from ddpm_jax.sampling import ModelApply, make_sampler
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec
from reference import assert_follows_gaussian, gaussian_chain_law, scaled_linear

T = 100
BETAS = scaled_linear(T)
S = 0.4  # every class's per-pixel standard deviation
# 2x2 images, one channel; classes 0 and 1 and the null label 2; 0 and 1 differ at pixels 1, 3.
MU = np.array([[0.2, -0.1, 0.3, 0.0], [0.2, 0.6, 0.3, -0.5], [0.0, 0.1, 0.0, 0.1]])
CHANGED = np.array([False, True, False, True])


class GaussianClasses:
    """eps(x_t, t, y) = sqrt(1 - a) / (a s^2 + 1 - a) (x_t - sqrt(a) mu_y), per pixel, and the
    Bayes classifier log N(x_t; sqrt(a) mu_y, (a s^2 + 1 - a) I) over the classes 0, 1."""

    null_label = 2
    num_classes = 2

    def __init__(self):
        self.abar = jnp.asarray(np.cumprod(1.0 - BETAS), jnp.float32)

    def _centre(self, t, y):
        a = self.abar[t][:, None, None, None]
        return a, jnp.sqrt(a) * jnp.asarray(MU, jnp.float32)[y].reshape(-1, 2, 2, 1)

    def __call__(self, params, x_t, t, y=None):
        y = jnp.full(t.shape, self.null_label) if y is None else y
        a, centre = self._centre(t, y)
        return jnp.sqrt(1 - a) / (a * S**2 + 1 - a) * (x_t - centre)

    def classify(self, params, x_t, t):
        a = self.abar[t][:, None]
        centres = jnp.sqrt(a)[:, :, None] * jnp.asarray(MU[:2], jnp.float32)[None]   # [B, 2, 4]
        flat = x_t.reshape(x_t.shape[0], 1, 4)
        return -jnp.sum((flat - centres) ** 2, axis=-1) / (2 * (a * S**2 + 1 - a))


class Classifier:
    """The Bayes classifier as a `ClassifierApply`-like callable (hashable by identity)."""

    num_classes = 2

    def __init__(self, model):
        self.model = model

    def __call__(self, params, x_t, t):
        return self.model.classify(params, x_t, t)


MODEL = GaussianClasses()
SCHEDULE = Schedule.from_betas(BETAS)
IMAGE = MU[0].reshape(1, 2, 2, 1) + 0.3 * np.array([1.0, -1.0, 0.5, 0.2]).reshape(1, 2, 2, 1)


def test_the_diffedit_mask_is_where_the_class_means_differ_for_the_model_and_the_classifier():
    images = np.repeat(IMAGE, 3, axis=0) + np.array([0.0, 0.2, -0.3])[:, None, None, None]
    expected = np.abs(MU[1] - MU[0]) / np.abs(MU[1] - MU[0]).max()   # min-max: the minimum is 0
    for classifier in (None, Classifier(MODEL)):
        soft = by_class.diffedit_mask(MODEL, None, SCHEDULE, images, 0, 1, jax.random.key(0),
                                      num_noises=3, classifier=classifier)
        np.testing.assert_allclose(np.asarray(soft).reshape(3, 4), np.tile(expected, (3, 1)),
                                   atol=2e-5)
        np.testing.assert_array_equal(by_class.edit_region(soft).reshape(3, 4),
                                      np.tile(CHANGED, (3, 1)))


def test_diffedit_keeps_the_outside_exact_and_the_inside_is_the_unblended_decoding():
    # Per-pixel predictions: the pixels inside the mask never see the outside, so they must be
    # exactly what the plain decoding of the same latent gives there.
    spec = SamplerSpec(sampler="ddim", steps=10, clip_denoised=False)
    images = np.repeat(IMAGE, 2, axis=0).astype(np.float32)
    edit = np.tile(CHANGED.reshape(1, 2, 2, 1), (2, 1, 1, 1))
    out = by_class.diffedit(MODEL, None, SCHEDULE, spec, images, edit, 0, 1, jax.random.key(1),
                            strength=0.6)
    result = np.asarray(out["images"])
    np.testing.assert_array_equal(result[~edit], images[~edit])
    plain = make_sampler(MODEL, SCHEDULE, images.shape, spec, start_t=59)(
            None, jax.random.key(1), 0, np.ones(2, np.int32), init=out["latents"], start="x_t")
    np.testing.assert_allclose(result[edit], np.asarray(plain["images"])[edit], atol=1e-6)
    assert np.all(np.abs(result[edit] - images[edit]) > 0.05)


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_blended_known_region_follows_q_and_the_edited_region_the_guided_chains_law(guidance):
    batch, k, eta = 4000, 49, 1.0
    spec = SamplerSpec(sampler="ddim", steps=8, eta=eta, clip_denoised=False)
    known = np.tile(~CHANGED.reshape(1, 2, 2, 1), (batch, 1, 1, 1))
    images = np.repeat(IMAGE, batch, axis=0).astype(np.float32)
    sampler = make_sampler(MODEL, SCHEDULE, images.shape, spec, start_t=k, blend="q_x0",
                           guidance=guidance, return_every=1, progressive=("x_t",))
    out = sampler(None, jax.random.key(2), 0, np.ones(batch, np.int32), init=images,
                  start="q_x0", known=images, known_mask=known)
    result, states = np.asarray(out["images"], np.float64), np.asarray(out["x_t"], np.float64)
    np.testing.assert_array_equal(result[known], images[known])
    kept = np.asarray(sampler.plan.timesteps)
    abar = np.cumprod(1.0 - BETAS)[kept]
    x0 = IMAGE.reshape(4)
    for slot, t_abar in enumerate(abar[::-1]):   # records in chain order: X_{S-1} .. X_0
        for p in np.flatnonzero(~CHANGED):
            assert_follows_gaussian(states[slot].reshape(batch, 4)[:, p],
                                    np.sqrt(t_abar) * x0[p], 1.0 - t_abar)
    w = guidance or 0.0
    mu_eff = (1 + w) * MU[1] - w * MU[2]
    start_abar = np.cumprod(1.0 - BETAS)[k]
    for p in np.flatnonzero(CHANGED):
        mean, var = gaussian_chain_law(BETAS, kept, mu_eff[p], S, "ddim", eta=eta,
                                       start=(np.sqrt(start_abar) * x0[p], 1.0 - start_abar))
        assert_follows_gaussian(result.reshape(batch, 4)[:, p], mean, var)


def test_blended_with_a_classifier_keeps_the_known_pixels_and_moves_the_rest():
    spec = SamplerSpec(sampler="dpm++", steps=6, clip_denoised=False)
    images = np.repeat(IMAGE, 2, axis=0).astype(np.float32)
    known = np.tile(~CHANGED.reshape(1, 2, 2, 1), (2, 1, 1, 1))

    class Unconditional:
        def __call__(self, params, x_t, t):
            return MODEL(params, x_t, t)
    out = np.asarray(by_class.blended(Unconditional(), None, SCHEDULE, spec, images, known, 1,
                                      jax.random.key(3), classifier=Classifier(MODEL),
                                      classifier_params={}, classifier_scale=1.0))
    np.testing.assert_array_equal(out[known], images[known])
    assert np.isfinite(out).all() and not np.allclose(out[~known], images[~known], atol=1e-3)


# ---------------------------------------------------------------------- Plug-and-Play

# One resolution level (no downsampling), attention at 8x8: the decoder is level 0 alone.
ARCH = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_groups=4,
            num_classes=3)


@pytest.fixture(scope="module")
def unet():
    """A tiny UNet with fixed random weights (no zero layers), built from the parameter shapes
    alone (nothing compiled), and two images in [-1, 1]."""
    model = UNet(**ARCH)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), x, jnp.array([1, 5]),
                                               jnp.array([0, 3]), train=False))["params"]
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 10
        return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
    return model, jax.tree_util.tree_map_with_path(fill, shapes), np.tanh(np.asarray(x))


def test_pnp_without_injection_is_plain_sampling_bit_for_bit(unet):
    model, params, images = unet
    schedule = Schedule.from_betas(scaled_linear(50))
    spec = SamplerSpec(sampler="ddim", steps=5, clip_denoised=False)
    out = pnp.pnp(model, params, schedule, spec, images, 1, jax.random.key(0), feature_level=0,
                  feature_share=0.0, attn_share=0.0, guidance=1.0)
    plain = make_sampler(ModelApply(model), schedule, (4, 8, 8, 1), spec, guidance=1.0)(
            params, jax.random.key(0), 0, np.array([3, 3, 1, 1]),
            init=jnp.concatenate([out["latents"]] * 2), start="x_t", rows=np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(np.asarray(out["images"]), np.asarray(plain["images"][2:]))
    np.testing.assert_array_equal(np.asarray(out["guides"]), np.asarray(plain["images"][:2]))
    # Every share runs the same program: the thresholds are data.
    cached = reverse.chain_jit(True)._cache_size()
    full = pnp.pnp(model, params, schedule, spec, images, 1, jax.random.key(0), feature_level=0,
                   feature_share=1.0, attn_share=0.0, guidance=1.0)
    # Injecting the last decoder level's block outputs at every step makes the targets' every
    # prediction the guides': they retrace the guides exactly.
    np.testing.assert_array_equal(np.asarray(full["images"]), np.asarray(full["guides"]))
    attn = pnp.pnp(model, params, schedule, spec, images, 1, jax.random.key(0), feature_level=0,
                   feature_share=0.0, attn_share=1.0, guidance=1.0)
    assert reverse.chain_jit(True)._cache_size() == cached
    assert not np.allclose(np.asarray(attn["images"]), np.asarray(out["images"]), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(attn["guides"]), np.asarray(out["guides"]))


def test_injection_threshold_injects_the_first_share_of_the_steps():
    t = np.arange(T)
    timesteps = np.asarray(SamplerSpec(sampler="ddim", steps=10).plan(SCHEDULE).timesteps)
    for share, count in ((0.0, 0), (0.5, 5), (0.8, 8), (1.0, 10)):
        threshold = pnp.injection_threshold(T, share)
        np.testing.assert_array_equal(t > threshold, t >= round((1 - share) * T))
        assert (timesteps > threshold).sum() == count   # a time-spaced chain: the first steps


def test_bad_class_edits_are_refused_in_one_line(unet):
    model, params, images = unet
    spec = SamplerSpec(sampler="ddim", steps=4)
    imgs = np.repeat(IMAGE, 2, axis=0)
    known = np.tile(~CHANGED.reshape(1, 2, 2, 1), (2, 1, 1, 1))
    cases = [
        (lambda: by_class.blended(MODEL, None, SCHEDULE, spec, imgs, known, 2, jax.random.key(0)),
         r"target=2: use classes in 0..1"),
        (lambda: by_class.diffedit_mask(MODEL, None, SCHEDULE, imgs, -1, 1, jax.random.key(0)),
         r"source=-1: use classes in 0..1"),
        (lambda: by_class.blended(lambda p, x, t: x, None, SCHEDULE, spec, imgs, known, 1,
                                  jax.random.key(0)), "needs a class-conditional model"),
        (lambda: by_class.blended(MODEL, None, SCHEDULE, spec, imgs, known[:, :1], 1,
                                  jax.random.key(0)), r"known_mask must be \[2, 2, 2, 1\]"),
        (lambda: by_class.blended(MODEL, None, SCHEDULE, spec, imgs, np.ones_like(known), 1,
                                  jax.random.key(0)), "keeps every pixel: nothing to edit"),
        (lambda: by_class.blended(MODEL, None, SCHEDULE, spec, imgs, np.zeros_like(known), 1,
                                  jax.random.key(0)), "keeps no pixel: nothing to blend"),
        (lambda: by_class.diffedit(MODEL, None, SCHEDULE, spec, imgs, np.zeros_like(known), 0, 1,
                                   jax.random.key(0)), "keeps every pixel: nothing to edit"),
        (lambda: pnp.pnp(model, params, Schedule.from_betas(scaled_linear(50)),
                         SamplerSpec(sampler="dpm++", steps=4), images, 1, jax.random.key(0)),
         "use sampler 'ddim' with eta 0"),
        (lambda: pnp.pnp(model, params, Schedule.from_betas(scaled_linear(50)), spec, images, 1,
                         jax.random.key(0), feature_level=4), r"the decoder has levels \[0\]"),
        (lambda: pnp.pnp(model, params, Schedule.from_betas(scaled_linear(50)), spec, images, 1,
                         jax.random.key(0), feature_level=0, attn_share=1.5),
         "use a share of the steps in"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------ sample.py's class edits

def _flags(**changes):
    base = dict(inpaint=None, mask=None, sdedit=None, strength=None, encode=None,
                interpolate=None, at_step=None, ddim_latent=False, grid_cells=None,
                progressive=None, labels=None, guidance=None, classifier=None, diffedit=None,
                blend=None, pnp=None, from_label=None, to_label=None, feature_t=None,
                mask_threshold=None,
                attn_t=None, feature_level=None)
    return types.SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(diffedit="x.png", to_label=1), "--diffedit needs --from_label"),
    (dict(diffedit="x.png", from_label=1, to_label=1), "both 1: nothing to edit"),
    (dict(blend="x.png", to_label=1), "--blend needs --mask"),
    (dict(pnp="x.png"), "--pnp needs --to_label"),
    (dict(pnp="x.png", to_label=1, attn_t=1.5), r"--attn_t=1.5: use a share"),
    (dict(blend="x.png", mask="m.png", to_label=1, mask_threshold=0.3),
     "--mask_threshold only applies to --diffedit"),
    (dict(sdedit="x.png", to_label=1), "--to_label only applies to --diffedit"),
    (dict(pnp="x.png", to_label=1, strength=0.5), "--strength only applies to"),
    (dict(blend="x.png", mask="m.png", to_label=1, labels="3"), "drop --labels"),
    (dict(pnp="x.png", to_label=1, classifier="clf"), "drop --classifier"),
])
def test_class_edit_flags_are_checked_in_one_line(changes, message):
    with pytest.raises(ValueError, match=message):
        edit_jobs.check_flags(_flags(**changes))
    assert edit_jobs.check_flags(_flags(blend="x", mask="m", to_label=2, guidance=1.0)) == "blend"


def _context(model_apply, params, image_shape, spec, schedule):
    return edit_jobs.Context(model_apply=model_apply, params=params, schedule=schedule,
                             image_shape=image_shape, batch_size=2, key=jax.random.key(0),
                             run_spec=spec, spec=spec, guidance=1.0)


def test_the_class_edit_jobs_write_inputs_masks_and_results(unet, tmp_path):
    # DiffEdit and Blended on the Gaussian classes (2x2 images), Plug-and-Play on the tiny UNet.
    images = np.random.default_rng(0).integers(0, 256, (3, 2, 2, 1)).astype(np.uint8)
    path = str(tmp_path / "x.npz")
    np.savez(path, images=images)
    keep = ~CHANGED.reshape(2, 2)
    np.savez(tmp_path / "m.npz", mask=keep)
    spec = SamplerSpec(sampler="ddim", steps=5, clip_denoised=False)
    gaussian = _context(MODEL, None, (2, 2, 1), spec, SCHEDULE)
    blend = edit_jobs.run("blend", _flags(blend=path, mask=str(tmp_path / "m.npz"), to_label=1),
                          gaussian)
    np.testing.assert_array_equal(blend.images[:, keep], images[:, keep])
    np.testing.assert_array_equal(blend.extra["masks"][..., 0], np.broadcast_to(~keep, (3, 2, 2)))
    assert blend.nrow == 3
    np.testing.assert_array_equal(blend.grid[0::3], images)
    diff = edit_jobs.run("diffedit", _flags(diffedit=path, from_label=0, to_label=1,
                                            mask_threshold=0.6), gaussian)
    changed = diff.extra["masks"]
    np.testing.assert_array_equal(changed, diff.extra["soft_masks"] >= 0.6)
    np.testing.assert_array_equal(changed[..., 0], np.broadcast_to(CHANGED.reshape(2, 2), (3, 2, 2)))
    np.testing.assert_array_equal(diff.images[~changed], images[~changed])
    np.testing.assert_array_equal(diff.extra["from_labels"], 0)
    model, params, _ = unet
    pictures = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    np.savez(path, images=pictures)
    plug = edit_jobs.run("pnp", _flags(pnp=path, to_label=1, feature_level=0),
                         _context(ModelApply(model), params, (8, 8, 1), spec,
                                  Schedule.from_betas(scaled_linear(50))))
    assert plug.images.shape == pictures.shape and plug.extra["guides"].shape == pictures.shape
    np.testing.assert_array_equal(plug.extra["labels"], 1)
