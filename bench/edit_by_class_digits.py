"""Editing held-out digits by class: DiffEdit, Blended diffusion and Plug-and-Play side by side
with SDEdit (the baseline: q(x_t0 | x) decoded towards the target class) at the same strength
and sampler, on a class-conditional digits run (configs/digits.py:cond).

    python bench/edit_by_class_digits.py --workdir runs/digits_cond --strengths 0.5,0.7

Every test digit of class a is edited to b = (a + 1 + n mod 9) mod 10 (image n), so all 90
ordered pairs occur (about 4 images each). Scores per method and strength:

* labelled b: the share the project's digits classifier (the evaluation one, trained on the
  train split) labels b;
* changed: pixels per image that moved by more than 32 of 255 levels; changed outside: those
  outside the "true changed region" of the pair, the pixels where the train split's mean images
  of a and b differ by more than 48 levels (no per-image ground truth exists: the mean
  difference is the stand-in);
* low-pass similarity: Pearson correlation of the input and the result after 2x2 average
  pooling (8x8 -> 4x4), averaged over images;
* known exact: Blended's and DiffEdit's kept pixels equal the input's, bit for bit.

Blended diffusion's user mask is the true changed region dilated --blend_dilate times (3x3). All
methods run DDIM (eta 0) on --steps time-spaced steps with classifier-free guidance
--guidance; PnP inverts the whole chain. Prints JSON lines and a Markdown table. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ddpm_jax import config as config_lib, features, runs  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.editing import by_class, pnp  # noqa: E402
from ddpm_jax.editing.chain import sdedit_start_t  # noqa: E402
from ddpm_jax.images import save_image_grid, to_model_range, to_uint8  # noqa: E402
from ddpm_jax.sampling import ModelApply, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

CHANGE_LEVELS = 32     # a pixel "changed" when it moved by more than this (of 255)
REGION_LEVELS = 48     # the true changed region: class means differ by more than this


def pooled_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the Pearson correlation of 2x2-average-pooled a and b."""
    def pool(x):
        x = x.astype(np.float64)[..., 0]
        n, h, w = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(n, -1)
    pa, pb = pool(a), pool(b)
    pa, pb = pa - pa.mean(1, keepdims=True), pb - pb.mean(1, keepdims=True)
    denom = np.sqrt((pa**2).sum(1) * (pb**2).sum(1))
    return float(np.mean((pa * pb).sum(1) / np.maximum(denom, 1e-12)))


def scores(net, inputs, outputs, targets, region, known=None) -> dict:
    _, logits = features.compute_features(net, outputs, progress=False)
    moved = np.abs(outputs.astype(np.int32) - inputs.astype(np.int32)) > CHANGE_LEVELS
    row = dict(labelled_b=float((logits.argmax(1) == targets).mean()),
               changed=float(moved.sum(axis=(1, 2, 3)).mean()),
               changed_outside=float((moved & ~region).sum(axis=(1, 2, 3)).mean()),
               lowpass_similarity=pooled_correlation(inputs, outputs))
    if known is not None:
        row["known_exact"] = bool(np.array_equal(outputs[known], inputs[known]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--strengths", default="0.5,0.7")
    parser.add_argument("--sdedit_strengths", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--mask_thresholds", default="0.5", help="DiffEdit's binarisation "
                        "levels of the soft mask (the paper's: 0.5)")
    parser.add_argument("--pnp", default="0.8:0.5,1.0:1.0", help="feature_t:attn_t pairs")
    parser.add_argument("--feature_level", type=int, default=1)
    parser.add_argument("--blend_dilate", type=int, default=1, help="dilations (3x3) of the "
                        "true changed region that make Blended's mask")
    parser.add_argument("--limit", type=int, default=None, help="first N test digits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/edit_by_class_digits.png")
    args = parser.parse_args()
    config, model, params = runs.load_for_sampling(args.workdir, "ema")
    shape = config_lib.image_shape(config)
    schedule = config_lib.schedule_from_config(config)
    apply_fn, key = ModelApply(model), jax.random.key(args.seed)
    images, labels = digits_arrays(shape[0])["test"]
    train_images, train_labels = digits_arrays(shape[0])["train"]
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    n = len(images)
    targets = ((labels + 1 + np.arange(n) % 9) % 10).astype(np.int32)
    means = np.stack([train_images[train_labels == c].mean(0) for c in range(10)])
    region = np.abs(means[targets] - means[labels]) > REGION_LEVELS            # [N, H, W, 1]
    dilated = region[..., 0]
    for _ in range(args.blend_dilate):
        padded = np.pad(dilated, ((0, 0), (1, 1), (1, 1)))
        dilated = np.zeros_like(dilated)
        for dy in range(3):
            for dx in range(3):
                dilated = dilated | padded[:, dy:dy + shape[0], dx:dx + shape[1]]
    blend_known = ~dilated[..., None]
    net = features.make_feature_net("digits", image_size=shape[0])
    spec = SamplerSpec(sampler="ddim", steps=args.steps, clip_denoised=False,
                       mean_type=config.diffusion.mean_type)
    x = to_model_range(images)
    print(f"protocol: {n} digits/test images, a -> (a + 1 + n mod 9) mod 10; classifier "
          f"{net.name}; EMA weights of {args.workdir}; DDIM eta 0, {args.steps} time-spaced "
          f"steps, guidance w={args.guidance}; seed {args.seed}; true changed region "
          f"{region.sum((1, 2, 3)).mean():.1f} px/image on average, Blended's mask (dilated) "
          f"{dilated.sum((1, 2)).mean():.1f} px", flush=True)
    rows = [dict(method="input", strength="", **scores(net, images, images, targets, region))]
    print(json.dumps(rows[0]), flush=True)
    grids = {}

    def record(method, strength, out, calls, seconds, known=None):
        row = dict(method=method, strength=strength, calls=calls, seconds=round(seconds, 1),
                   **scores(net, images, out, targets, region, known))
        rows.append(row)
        grids[f"{method} {strength}"] = out
        print(json.dumps(row), flush=True)

    for strength in [float(s) for s in args.sdedit_strengths.split(",")]:
        start = time.perf_counter()
        sampler = make_sampler(apply_fn, schedule, images.shape, spec, guidance=args.guidance,
                               start_t=sdedit_start_t(schedule.num_timesteps, strength))
        out = to_uint8(sampler(params, key, 0, targets, init=x, start="q_x0")["images"])
        record("SDEdit", strength, out, 2 * sampler.plan.num_steps, time.perf_counter() - start)
    for strength in [float(s) for s in args.strengths.split(",")]:
        start = time.perf_counter()
        soft = by_class.diffedit_mask(apply_fn, params, schedule, x, labels, targets, key,
                                      strength=strength, mean_type=spec.mean_type)
        steps = spec.plan(schedule, start_t=sdedit_start_t(schedule.num_timesteps,
                                                           strength)).num_steps
        for threshold in [float(v) for v in args.mask_thresholds.split(",")]:
            edit = by_class.edit_region(soft, threshold)
            result = by_class.diffedit(apply_fn, params, schedule, spec, x, edit, labels,
                                       targets, key, strength=strength, guidance=args.guidance)
            record(f"DiffEdit (mask >= {threshold:g})", strength, to_uint8(result["images"]),
                   2 * by_class.MASK_NOISES + 3 * steps, time.perf_counter() - start, known=~edit)
            start = time.perf_counter()
        start = time.perf_counter()
        out = to_uint8(by_class.blended(apply_fn, params, schedule, spec, x, blend_known, targets,
                                        key, strength=strength, guidance=args.guidance))
        record("Blended", strength, out, 2 * steps, time.perf_counter() - start, known=blend_known)
    for pair in args.pnp.split(","):
        feature_t, attn_t = (float(v) for v in pair.split(":"))
        start = time.perf_counter()
        out = pnp.pnp(model, params, schedule, spec, x, targets, key,
                      feature_level=args.feature_level, feature_share=feature_t,
                      attn_share=attn_t, guidance=args.guidance)
        record("PnP", f"f{feature_t}/a{attn_t}", to_uint8(out["images"]),
               args.steps + 4 * args.steps, time.perf_counter() - start)
    print("\n| method | strength | labelled b | px changed | px changed outside region | "
          "low-pass similarity | known exact | calls / image | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['method']} | {row['strength']} | {100 * row['labelled_b']:.1f}% | "
              f"{row['changed']:.1f} | {row['changed_outside']:.1f} | "
              f"{row['lowpass_similarity']:.3f} | {row.get('known_exact', '')} | "
              f"{row.get('calls', '')} | {row.get('seconds', '')} |")
    shown = max(1, 100 // (1 + len(grids)))   # save_image_grid shows at most 100 tiles
    tiles = np.stack([images[:shown]] + [g[:shown] for g in grids.values()], axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image_grid(tiles.reshape((-1,) + shape), args.out, nrow=tiles.shape[1])


if __name__ == "__main__":
    main()
