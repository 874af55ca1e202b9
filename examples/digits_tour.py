# %% [markdown]
# # Sampling, guiding and editing digits
#
# This page takes a trained digits run through the library's sampling-side API. It loads the
# run, draws samples with two samplers, completes digits whose bottom half is hidden
# (RePaint), turns noisy digits into clean ones (SDEdit), and guides samples towards chosen
# classes when the run allows it. Each of these is a few calls on the compiled `lax.scan`
# chain. `sample.py` runs the same operations from the command line.
#
# The run comes from the main job (about 9 minutes on 2 CPU cores):
#
#     python train.py --config configs/digits.py --workdir runs/digits
#     python examples/digits_tour.py
#
# Environment variables: `DDPM_EXAMPLE_WORKDIR` names the run (default `runs/digits`),
# `DDPM_EXAMPLE_CLASSIFIER` a classifier run for classifier guidance (optional, see below),
# `DDPM_EXAMPLE_OUT` the folder for the image grids (default `out/examples`), and
# `DDPM_EXAMPLE_TINY=1` fewer images and shorter chains (the tests run it on a tiny run).

# %%
import os
import time

import jax
import numpy as np

from ddpm_jax import editing, runs
from ddpm_jax import config as config_lib
from ddpm_jax.data.builders import digits_arrays
from ddpm_jax.editing.inputs import bottom_half_mask
from ddpm_jax.images import save_image_grid, to_model_range, to_uint8
from ddpm_jax.sampling import ModelApply, make_sampler
from ddpm_jax.spec import SamplerSpec

TINY = os.environ.get("DDPM_EXAMPLE_TINY") == "1"
WORKDIR = os.environ.get("DDPM_EXAMPLE_WORKDIR", "runs/digits")
CLASSIFIER = os.environ.get("DDPM_EXAMPLE_CLASSIFIER")
OUT = os.environ.get("DDPM_EXAMPLE_OUT", "out/examples")
NUM_IMAGES = 10 if TINY else 40
TRAIN_COMMAND = f"python train.py --config configs/digits.py --workdir {WORKDIR}"

# %% [markdown]
# ## Loading the run
#
# `runs.load_for_sampling` reads the EMA parameters of the newest checkpoint. It rebuilds the
# model from the config saved with them, so the config file on disk plays no part. The
# schedule and image shape come from the same config.

# %%
if not os.path.isdir(WORKDIR):
    raise SystemExit(f"No run in {WORKDIR}: train one with `{TRAIN_COMMAND}` (or set "
                     "DDPM_EXAMPLE_WORKDIR to a trained digits run).")
try:
    config, model, params = runs.load_for_sampling(WORKDIR, "ema")
except FileNotFoundError:
    raise SystemExit(f"No checkpoint in {WORKDIR}: train one with `{TRAIN_COMMAND}`.") from None
schedule = config_lib.schedule_from_config(config)
image_shape = config_lib.image_shape(config)
batch_shape = (NUM_IMAGES, *image_shape)
apply_fn = ModelApply(model)
key = jax.random.key(0)
print(f"{WORKDIR}: {image_shape} images, T={schedule.num_timesteps}, "
      f"{'class-conditional' if model.num_classes else 'unconditional'}")


def save(name: str, rows: list[np.ndarray]) -> None:
    """A grid of the first 10 images of each of `rows` (uint8 [N, H, W, C]), one row each."""
    path = os.path.join(OUT, f"digits_{name}.png")
    save_image_grid(np.concatenate([row[:10] for row in rows]), path, nrow=10)
    print(f"  wrote {path}")


# %% [markdown]
# ## A yardstick: the nearest training digit
#
# To put a number on "looks like a digit", each image is matched to its nearest neighbour
# among the 1,437 training digits by mean squared pixel difference in `[-1, 1]`. Held-out
# digits (the test split, which the run never trained on) set the level real digits reach.
# Uniform noise sets the level of no digit at all. A low value can also mean a copy of a
# training image, so it measures realism and not novelty.

# %%
train_images, _ = digits_arrays(image_shape[0])["train"]
test_images, _ = digits_arrays(image_shape[0])["test"]
train_flat = to_model_range(train_images).reshape(len(train_images), -1)


def nearest_digit_distance(images: np.ndarray) -> float:
    """Mean over uint8 images [N, H, W, C] of the per-pixel squared distance (in [-1, 1]) to
    the nearest training digit."""
    flat = to_model_range(images).reshape(len(images), -1)
    return float(np.mean([np.min(np.mean((train_flat - x) ** 2, axis=1)) for x in flat]))


originals = test_images[:NUM_IMAGES]
real_level = nearest_digit_distance(originals)
noise_level = nearest_digit_distance(to_uint8(np.random.default_rng(0).uniform(-1, 1, batch_shape)))
print(f"distance to the nearest training digit: held-out digits {real_level:.3f}, "
      f"uniform noise {noise_level:.3f}")

# %% [markdown]
# ## Two samplers
#
# `SamplerSpec.from_config` gives the run's own chain. For the digits config that is
# SDE-DPM-Solver++(2M) on 20 steps spaced uniformly in log-SNR. An override gives another
# chain, here DDIM on 50 steps uniform in `t`; the config's spacing and order belong to its
# own sampler and do not carry over. `make_sampler` builds the plan and compiles the chain for
# the batch shape on its first call. Image `n` depends only on the key and `n`, so the two
# grids start from the same noise.

# %%
specs = {"default": SamplerSpec.from_config(config),
         "ddim50": SamplerSpec.from_config(config, sampler="ddim", steps=50)}
samples, sample_levels = {}, {}
for name, spec in specs.items():
    start = time.perf_counter()
    sampler = make_sampler(apply_fn, schedule, batch_shape, spec)
    samples[name] = to_uint8(sampler(params, key)["images"])
    sample_levels[name] = nearest_digit_distance(samples[name])
    print(f"{spec.describe(sampler.plan.num_steps)}: {NUM_IMAGES} images in "
          f"{time.perf_counter() - start:.1f} s (compile included); distance to the nearest "
          f"training digit {sample_levels[name]:.3f}")
    save(f"samples_{name}", np.split(samples[name], NUM_IMAGES // 10))

# %% [markdown]
# ## Inpainting with RePaint
#
# The inputs are held-out digits, and the mask marks their top half as known
# (`editing.inputs.bottom_half_mask`). `editing.repaint` runs ancestral steps on a respaced
# chain. After every step it puts back the known pixels, noised to the current step. Every
# `j` steps it goes `j` steps back up and down again, `r - 1` times (`repaint_moves` writes
# that route as data for one scan). Its last step copies the known pixels exactly, and the
# check at the end relies on this. The grid shows the masked inputs (unknown half in gray),
# the completions and the originals.

# %%
mask = np.broadcast_to(bottom_half_mask(image_shape), (*batch_shape[:3], 1))
repaint_spec = SamplerSpec(sampler="ddpm", steps=20 if TINY else 100,
                           mean_type=specs["default"].mean_type,
                           var_type=specs["default"].var_type)
plan = repaint_spec.plan(schedule)
moves = editing.repaint_moves(plan.num_steps, jump_length=5 if TINY else 10,
                              resamplings=2 if TINY else 3)
start = time.perf_counter()
inpainted = to_uint8(editing.repaint(apply_fn, params, plan, moves, key, to_model_range(originals),
                                     mask, mean_type=repaint_spec.mean_type,
                                     var_type=repaint_spec.var_type))
print(f"RePaint, {plan.num_steps} steps, {int(moves['reverse'].sum())} network calls per image: "
      f"{time.perf_counter() - start:.1f} s")
known = np.broadcast_to(mask, batch_shape)
known_kept = bool(np.array_equal(inpainted[known], originals[known]))
save("inpaint", [np.where(known, originals, 128).astype(np.uint8), inpainted, originals])

# %% [markdown]
# ## SDEdit: from a rough input to a digit
#
# SDEdit noises an input to an intermediate step `t0` with `q(x_t0 | x0)` and runs the rest of
# the chain from there. `editing.sdedit_start_t` maps a strength in `(0, 1]` to `t0`. The
# sampler is made with `start_t=t0` and called with `start="q_x0"` and the input as `init`.
# The inputs here are held-out digits with heavy Gaussian noise. SDEdit trades faithfulness
# for realism. With a trained model, the outputs come out about as close to a training digit
# as real digits are, but they can drift from the digit they started as: some come out as
# another digit.

# %%
STRENGTH = 0.3
clean = to_model_range(originals)
noise = np.random.default_rng(1).standard_normal(clean.shape)
rough = to_uint8(np.clip(clean + 0.6 * noise, -1.0, 1.0))
start_t = editing.sdedit_start_t(schedule.num_timesteps, STRENGTH)
sdedit = make_sampler(apply_fn, schedule, batch_shape, specs["ddim50"], start_t=start_t)
edited = to_uint8(sdedit(params, key, init=to_model_range(rough), start="q_x0")["images"])
rough_level, edited_level = nearest_digit_distance(rough), nearest_digit_distance(edited)
print(f"SDEdit from t0={start_t} ({sdedit.plan.num_steps} DDIM steps): distance to the nearest "
      f"training digit {rough_level:.3f} before, {edited_level:.3f} after")
save("sdedit", [rough, edited, originals])

# %% [markdown]
# ## Guidance
#
# Guidance depends on the run:
#
# - A **class-conditional** run (`model.num_classes` set, trained with label dropout) supports
#   classifier-free guidance: `make_sampler(..., guidance=w)` mixes the conditional and the
#   null-label predictions at every step.
# - The default digits run is **unconditional**. It can be guided by a separate
#   noise-conditional classifier (`python train.py --config configs/digits.py:classifier
#   --workdir runs/digits-clf`, about 4 minutes) through `make_sampler(..., classifier=...,
#   classifier_scale=s)`. Set `DDPM_EXAMPLE_CLASSIFIER=runs/digits-clf` to run that part.
#
# Both kinds differ only in the options of `make_sampler`. The sampler then takes `labels`,
# the class each row is guided towards (and, with a classifier, its parameters). With a
# classifier, the samples are also scored by the classifier at `t = 0`: the share it labels as
# requested should be well above the unguided samples' share (about 1 in 10). The guiding
# classifier is a lenient judge, since the samples were pushed along its own gradient.

# %%
labels = np.arange(NUM_IMAGES, dtype=np.int32) % 10
guided_share = unguided_share = None
options, call_options = {}, {}
if model.num_classes is not None:
    options, how = dict(guidance=2.0), "classifier-free guidance, w = 2"
elif CLASSIFIER:
    classifier, classifier_params = runs.load_classifier(
            CLASSIFIER, image_shape=image_shape, timesteps=schedule.num_timesteps,
            flag="DDPM_EXAMPLE_CLASSIFIER")
    options, how = dict(classifier=classifier, classifier_scale=2.0), "classifier guidance, scale 2"
    call_options = dict(classifier_params=classifier_params)
if options:
    sampler = make_sampler(apply_fn, schedule, batch_shape, specs["ddim50"], **options)
    guided = to_uint8(sampler(params, key, labels=labels, **call_options)["images"])
    print(f"{how}, towards classes {labels[:10].tolist()}, ...")
    save("guided", np.split(guided, NUM_IMAGES // 10))
    if "classifier" in options:
        classify = jax.jit(classifier)
        t_zero = np.zeros(NUM_IMAGES, np.int32)

        def share_as_requested(images: np.ndarray) -> float:
            logits = classify(classifier_params, to_model_range(images), t_zero)
            return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))

        guided_share = share_as_requested(guided)
        unguided_share = share_as_requested(samples["ddim50"])
        print(f"the classifier labels {guided_share:.0%} of the guided samples as requested, "
              f"{unguided_share:.0%} of the unguided DDIM samples")
else:
    print("an unconditional run and no DDPM_EXAMPLE_CLASSIFIER: no guidance (see above)")

# %% [markdown]
# ## Checks
#
# Every run must pass the structural check: RePaint keeps the known pixels exactly. A full
# run (not `DDPM_EXAMPLE_TINY`) must also show what training buys. Both samplers must come
# within twice the held-out digits' distance to the nearest training digit, SDEdit must at
# least halve that distance for its rough inputs, and classifier guidance (when run) must
# beat the unguided share by 30 points. An untrained model fails these.

# %%
failures = []
if not known_kept:
    failures.append("RePaint changed known pixels")
if not TINY:
    for name, level in sample_levels.items():
        if level > 2 * real_level:
            failures.append(f"{name} samples are {level:.3f} from the nearest training digit, "
                            f"over twice the held-out digits' {real_level:.3f}")
    if edited_level > rough_level / 2:
        failures.append(f"SDEdit moved its inputs from {rough_level:.3f} to {edited_level:.3f}, "
                        "not halfway to a training digit")
    if guided_share is not None and guided_share < unguided_share + 0.3:
        failures.append(f"classifier guidance gave {guided_share:.0%} as requested, unguided "
                        f"{unguided_share:.0%}")
if failures:
    raise SystemExit("check failed: " + "; ".join(failures))
print("check passed: every step of the tour ran" + ("" if TINY else " and trained behaviour seen"))
