"""RePaint on held-out digits: the bottom half of every test digit masked and completed, then
recognised by the project's digits classifier (the evaluation one, trained on the train split).

    python bench/inpaint_digits.py --workdir runs/digits --steps 250 --resamplings 1,10

Rows: the clean test digits (the classifier's own ceiling), the masked input alone (bottom half
black), and RePaint at each r (jump length j, ancestral steps on the run's variance, respaced to
--steps). Prints JSON lines, a Markdown table and the protocol; writes a grid of (masked input,
completion) pairs per r beside --out. Never run by CI.
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

from ddpm_jax import config as config_lib, editing, features, runs  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.editing.inputs import bottom_half_mask  # noqa: E402
from ddpm_jax.images import save_image_grid, to_model_range, to_uint8  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402
from ddpm_jax.sampling import ModelApply  # noqa: E402


def accuracy(net: features.FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
    _, logits = features.compute_features(net, images, progress=False)
    return float((logits.argmax(axis=1) == labels).mean())


def top_half_bound(images: np.ndarray, labels: np.ndarray, shape: tuple[int, int, int]) -> dict:
    """What the known half says about the class: an RBF SVM fitted on the train split's top
    halves, on the test top halves. argmax accuracy, and E[p(true class | top half)]: the rate at
    which exact samples of p(bottom | top) would show the true class (times the evaluation
    classifier's own accuracy), so a bound on a faithful conditional sampler's score."""
    from sklearn.svm import SVC
    train_images, train_labels = digits_arrays(shape[0])["train"]
    top = shape[0] // 2

    def features_of(x: np.ndarray) -> np.ndarray:
        return x[:, :top].reshape(len(x), -1) / 255.0
    svm = SVC(probability=True, random_state=0).fit(features_of(train_images), train_labels)
    probs = svm.predict_proba(features_of(images))
    return dict(row="top half only (RBF SVM on train top halves)",
                accuracy=float((probs.argmax(1) == labels).mean()),
                mean_true_class_probability=float(probs[np.arange(len(labels)), labels].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--jump_length", type=int, default=10)
    parser.add_argument("--resamplings", default="1,10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=360)
    parser.add_argument("--out", default="runs/inpaint_digits.png")
    args = parser.parse_args()
    config, model, params = runs.load_for_sampling(args.workdir, "ema")
    shape = config_lib.image_shape(config)
    images, labels = digits_arrays(shape[0])["test"]
    net = features.make_feature_net("digits", image_size=shape[0])
    mask = np.broadcast_to(bottom_half_mask(shape), images.shape[:3] + (1,))
    masked = np.where(mask, images, 0).astype(np.uint8)
    print(f"protocol: {len(images)} digits/test images, bottom {shape[0] - shape[0] // 2} of "
          f"{shape[0]} rows unknown; classifier {net.name} (sha256 {net.weights_sha256[:16]}...); "
          f"EMA weights of {args.workdir}; {args.steps} ancestral steps "
          f"({config.diffusion.var_type}), j={args.jump_length}, seed {args.seed}", flush=True)
    rows = [dict(row="clean test digits", accuracy=accuracy(net, images, labels)),
            dict(row="masked input (bottom half black)", accuracy=accuracy(net, masked, labels)),
            top_half_bound(images, labels, shape)]
    for row in rows:
        print(json.dumps(row), flush=True)
    spec = SamplerSpec.from_config(config, sampler="ddpm", steps=args.steps)
    plan = spec.plan(config_lib.schedule_from_config(config))
    for r in (int(v) for v in args.resamplings.split(",")):
        moves = editing.repaint_moves(plan.num_steps, args.jump_length, r)
        start = time.perf_counter()
        out = []
        for b in range(0, len(images), args.batch_size):
            x = to_model_range(images[b:b + args.batch_size])
            m = mask[b:b + args.batch_size]
            out.append(to_uint8(editing.repaint(
                    ModelApply(model), params, plan, moves, jax.random.key(args.seed), x, m,
                    example_offset=b, mean_type=spec.mean_type, var_type=spec.var_type,
                    clip_denoised=spec.clip_denoised)))
        completed = np.concatenate(out)
        seconds = time.perf_counter() - start
        assert np.array_equal(completed[mask], images[mask])  # the known half, untouched
        row = dict(row=f"RePaint r={r}", accuracy=accuracy(net, completed, labels),
                   network_calls=int(moves["reverse"].sum()), seconds=round(seconds, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        pairs = np.stack([masked[:50], completed[:50]], axis=1).reshape((-1,) + shape)
        path = args.out.replace(".png", f"_r{r}.png")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_image_grid(pairs, path, nrow=10)
    print("\n| completion of the bottom half | digits-classifier accuracy | calls / image | s |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['row']} | {100 * row['accuracy']:.1f}% | {row.get('network_calls', '')} | "
              f"{row.get('seconds', '')} |")


if __name__ == "__main__":
    main()
