"""Generation and analysis by class on digits: Visual Anagrams, StyleAligned and the diffusion
classifier with a class-conditional run (configs/digits.py:cond).

    python bench/class_conditional_digits.py --workdir runs/digits_cond [--parts anagrams,style,zero_shot]

* anagrams: for every ordered pair (y1, y2) of distinct classes and each view v (rot180,
  transpose), --per_pair images from views (identity, v) with classes (y1, y2); the share whose
  x reads as y1 and v(x) as y2 to the project's digits classifier (the digits-FID network),
  averaged over the 90 pairs, beside the same share for plain samples of y1 (--per_class each).
* style: for references picked from the test split for extreme slant and ink, --style_samples
  images (class n mod 10) with and without StyleAligned sharing from the same noise: the mean
  distance of their slant and ink to the reference's, and the share labelled as their class.
* zero_shot: the diffusion classifier's accuracy on the whole test split against the number of
  (t, eps) pairs, with its seconds per image, beside the digits classifier and an SVM (RBF,
  scikit-learn) on the train split's pixels.

Prints the protocol, JSON lines and Markdown tables. Never run by CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ddpm_jax import config as config_lib, features, runs, zero_shot  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.editing import views as views_lib  # noqa: E402
from ddpm_jax.editing.style import style_aligned_samples  # noqa: E402
from ddpm_jax.models.style_aligned import attention_sites  # noqa: E402
from ddpm_jax.sampling import ModelApply, draw_images, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def style_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (uint8 [N, H, W, 1]): ink, the mean intensity in [0, 1] (stroke width at a
    fixed digit size), and slant, the ink's second-moment shear cov(col, row) / var(row) (the
    deskewing moment: > 0 leans right going up)."""
    w = images[..., 0].astype(np.float64) / 255.0
    rows, cols = np.meshgrid(np.arange(w.shape[1]), np.arange(w.shape[2]), indexing="ij")
    mass = np.maximum(w.sum((1, 2)), 1e-6)
    mr, mc = (w * rows).sum((1, 2)) / mass, (w * cols).sum((1, 2)) / mass
    var_r = (w * (rows - mr[:, None, None]) ** 2).sum((1, 2)) / mass
    cov = (w * (rows - mr[:, None, None]) * (cols - mc[:, None, None])).sum((1, 2)) / mass
    return dict(ink=w.mean((1, 2)), slant=-cov / np.maximum(var_r, 1e-6))


def classify_clean(net, images: np.ndarray) -> np.ndarray:
    return features.compute_features(net, images, progress=False)[1].argmax(1)


def anagrams(args, model_apply, params, schedule, spec, image_shape, net) -> list[dict]:
    pairs = [(a, b) for a, b in itertools.permutations(range(10), 2)]
    key = jax.random.key(args.seed)
    # Plain samples of each class: how often does y1 read as y2 under the view by chance?
    plain_labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)
    sampler = make_sampler(model_apply, schedule, (args.batch_size,) + image_shape, spec,
                           guidance=args.guidance)
    plain = draw_images(sampler, params, key, len(plain_labels), labels=plain_labels,
                        progress=False)
    rows = []
    for view_name in ("rot180", "transpose"):
        views = views_lib.make_views(["identity", view_name], image_shape)
        plain_read = classify_clean(net, plain)
        plain_view = classify_clean(net, views_lib.view_tiles(plain, views[1:]))
        wrapped = views_lib.ViewsApply(model_apply, views)
        sampler = make_sampler(wrapped, schedule, (args.batch_size,) + image_shape, spec,
                               guidance=args.guidance)
        per_pair = np.repeat(np.asarray(pairs, np.int32), args.per_pair, axis=0)
        start = time.perf_counter()
        images = draw_images(sampler, params, key, len(per_pair), progress=False,
                             labels=views_lib.pack_labels(per_pair, 10))
        seconds = time.perf_counter() - start
        read = classify_clean(net, images)
        read_view = classify_clean(net, views_lib.view_tiles(images, views[1:]))
        both = (read == per_pair[:, 0]) & (read_view == per_pair[:, 1])
        anagram_share = [both[i * args.per_pair:(i + 1) * args.per_pair].mean()
                         for i in range(len(pairs))]
        plain_share = [np.mean((plain_read == a)[plain_labels == a] &
                               (plain_view == b)[plain_labels == a]) for a, b in pairs]
        best = sorted(zip(anagram_share, pairs), reverse=True)[:5]
        row = dict(part="anagrams", view=view_name, pairs=len(pairs), per_pair=args.per_pair,
                   mean_both_views_correct=float(np.mean(anagram_share)),
                   first_view_correct=float(np.mean(read == per_pair[:, 0])),
                   second_view_correct=float(np.mean(read_view == per_pair[:, 1])),
                   pairs_above_half=int(np.sum(np.asarray(anagram_share) >= 0.5)),
                   plain_mean_both=float(np.mean(plain_share)),
                   plain_max_pair=max(zip(plain_share, pairs))[1],
                   plain_max_share=float(max(plain_share)),
                   best_pairs=[(p, round(float(s), 2)) for s, p in best],
                   seconds=round(seconds, 1))
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
        if args.out_dir:
            from ddpm_jax.images import save_samples
            pick = np.concatenate([np.flatnonzero(both)[:12], np.flatnonzero(~both)[:4]])
            save_samples(images[pick], os.path.join(args.out_dir, f"anagrams_{view_name}.png"),
                         grid_images=views_lib.view_tiles(images[pick], views), nrow=8)
    return rows


def style(args, model_apply, params, schedule, config, net) -> list[dict]:
    test_images, test_labels = digits_arrays(config.data.image_size)["test"]
    stats = style_statistics(test_images)
    picks = dict(slant_right=int(np.argmax(stats["slant"])), slant_left=int(np.argmin(stats["slant"])),
                 heavy=int(np.argmax(stats["ink"])), light=int(np.argmin(stats["ink"])))
    spec = SamplerSpec.from_config(config, sampler="ddim", steps=args.style_steps,
                                   clip_denoised=False)
    labels = (np.arange(args.style_samples) % 10).astype(np.int32)
    key = jax.random.key(args.seed + 1)
    rows = []
    for layers, shift in itertools.product(args.style_layers.split(";"),
                                           [float(v) for v in args.style_shifts.split(",")]):
        sites = attention_sites(params, layers.split(",") if "," in layers else layers)
        for name, index in picks.items():
            ref = test_images[index]
            if args.style_same_class:  # every image of the reference's own class
                labels = np.full(args.style_samples, int(test_labels[index]), np.int32)
            ref_stats = {k: float(v[index]) for k, v in stats.items()}
            out = {}
            for shared in (False, True):
                result = style_aligned_samples(
                        model_apply, params, schedule, spec, ref, labels, key,
                        num_samples=args.style_samples, batch_size=args.style_samples + 1,
                        sites=sites if shared else (), reference_shift=shift,
                        guidance=args.guidance)
                s = style_statistics(result["images"])
                out[shared] = dict(
                        slant_dist=float(np.mean(np.abs(s["slant"] - ref_stats["slant"]))),
                        ink_dist=float(np.mean(np.abs(s["ink"] - ref_stats["ink"]))),
                        accuracy=float(np.mean(classify_clean(net, result["images"]) == labels)))
                if shared and args.out_dir:
                    from ddpm_jax.images import save_samples
                    save_samples(result["images"], os.path.join(
                            args.out_dir,
                            f"style_{name}_{layers.replace(',', '+')}_shift{shift:g}.png"),
                            grid_images=np.concatenate([ref[None], result["reconstruction"][None],
                                                        result["images"][:18]]), nrow=10)
            row = dict(part="style", reference=name, layers=layers, shift=shift,
                       ref_class=int(test_labels[index]), same_class=args.style_same_class,
                       ref_slant=ref_stats["slant"],
                       ref_ink=ref_stats["ink"],
                       **{f"{k}_plain": v for k, v in out[False].items()},
                       **{f"{k}_shared": v for k, v in out[True].items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def zero_shot_part(args, model_apply, params, schedule, config, net) -> list[dict]:
    train_x, train_y = digits_arrays(config.data.image_size)["train"]
    test_x, test_y = digits_arrays(config.data.image_size)["test"]
    rows = []
    from sklearn.svm import SVC
    start = time.perf_counter()
    svm = SVC(kernel="rbf", gamma="scale").fit(train_x.reshape(len(train_x), -1) / 255.0, train_y)
    svm_acc = float(np.mean(svm.predict(test_x.reshape(len(test_x), -1) / 255.0) == test_y))
    rows.append(dict(part="zero_shot", method="SVM (RBF, sklearn, train pixels)", accuracy=svm_acc,
                     seconds_per_image=round((time.perf_counter() - start) / len(test_x), 5)))
    start = time.perf_counter()
    clean_acc = float(np.mean(classify_clean(net, test_x) == test_y))
    rows.append(dict(part="zero_shot", method=f"digits classifier ({net.name})",
                     accuracy=clean_acc,
                     seconds_per_image=round((time.perf_counter() - start) / len(test_x), 5)))
    for row in rows:
        print(json.dumps(row), flush=True)
    key = jax.random.key(args.seed + 2)
    for num in (int(s) for s in args.zero_shot_samples.split(",")):
        x = test_x.astype(np.float32) / 127.5 - 1.0
        zero_shot.classify(model_apply, params, schedule, x[:args.zero_shot_batch], key,
                           num_samples=num, batch_size=args.zero_shot_batch)  # compile
        start = time.perf_counter()
        out = zero_shot.classify(model_apply, params, schedule, x, key, num_samples=num,
                                 batch_size=args.zero_shot_batch)
        seconds = time.perf_counter() - start
        acc = float(np.mean(out["labels"] == test_y))
        row = dict(part="zero_shot", method=f"diffusion classifier, {num} (t, eps) pairs",
                   num_samples=num, accuracy=acc,
                   accuracy_stderr=float(np.sqrt(acc * (1 - acc) / len(test_y))),
                   seconds_per_image=round(seconds / len(test_y), 5),
                   model_rows_per_image=10 * num,
                   confusion=zero_shot.confusion_matrix(test_y, out["labels"], 10).tolist())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--parts", default="anagrams,style,zero_shot")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--per_pair", type=int, default=8)
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=240)
    parser.add_argument("--style_samples", type=int, default=50)
    parser.add_argument("--style_steps", type=int, default=50)
    parser.add_argument("--style_layers", default="all", help="';'-separated layer choices")
    parser.add_argument("--style_same_class", action="store_true",
                        help="draw every image in the reference's class (default: class n mod 10)")
    parser.add_argument("--style_shifts", default="0,2", help="reference logit shifts")
    parser.add_argument("--zero_shot_samples", default="4,8,16,32")
    parser.add_argument("--zero_shot_batch", type=int, default=60)
    parser.add_argument("--out_dir", default=None, help="grids of examples (PNG)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    step, config, model, params = runs.load_step_for_sampling(args.workdir, "ema")
    schedule = config_lib.schedule_from_config(config)
    image_shape = config_lib.image_shape(config)
    spec = SamplerSpec.from_config(config)
    net = features.make_feature_net("digits", image_size=config.data.image_size)
    print(f"protocol: EMA weights of step {step} of {args.workdir}; samples {spec.describe()}, "
          f"guidance w={args.guidance:g}; scored by {net.name} (sha256 {net.weights_sha256[:16]}); "
          f"seed {args.seed}; jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
    model_apply = ModelApply(model)
    rows = []
    parts = args.parts.split(",")
    if "anagrams" in parts:
        rows += anagrams(args, model_apply, params, schedule, spec, image_shape, net)
    if "style" in parts:
        rows += style(args, model_apply, params, schedule, config, net)
    if "zero_shot" in parts:
        rows += zero_shot_part(args, model_apply, params, schedule, config, net)
    _tables(rows)


def _tables(rows: list[dict]) -> None:
    ana = [r for r in rows if r["part"] == "anagrams"]
    if ana:
        print("\n| view | both views correct (mean of 90 pairs) | plain samples of y1 | x as y1 "
              "| v(x) as y2 | pairs >= 50% | s |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in ana:
            print(f"| {r['view']} | {100 * r['mean_both_views_correct']:.1f}% | "
                  f"{100 * r['plain_mean_both']:.1f}% (max {100 * r['plain_max_share']:.0f}% "
                  f"{r['plain_max_pair']}) | {100 * r['first_view_correct']:.1f}% | "
                  f"{100 * r['second_view_correct']:.1f}% | {r['pairs_above_half']}/90 | "
                  f"{r['seconds']} |")
    sty = [r for r in rows if r["part"] == "style"]
    if sty:
        print("\n| reference | layers, shift | slant dist. plain -> shared | ink dist. plain -> shared "
              "| class acc. plain -> shared |\n| --- | --- | --- | --- | --- |")
        for r in sty:
            print(f"| {r['reference']} | {r['layers']}, {r['shift']:g} | {r['slant_dist_plain']:.3f} -> "
                  f"{r['slant_dist_shared']:.3f} | {r['ink_dist_plain']:.3f} -> "
                  f"{r['ink_dist_shared']:.3f} | {100 * r['accuracy_plain']:.0f}% -> "
                  f"{100 * r['accuracy_shared']:.0f}% |")
    zs = [r for r in rows if r["part"] == "zero_shot"]
    if zs:
        print("\n| method | test accuracy | ms per image |\n| --- | --- | --- |")
        for r in zs:
            print(f"| {r['method']} | {100 * r['accuracy']:.1f}% | "
                  f"{1000 * r['seconds_per_image']:.2f} |")


if __name__ == "__main__":
    main()
