"""Teaching a class-conditional digits model a digit it never saw, from 5 images, with each
fine-tuning method (docs/finetuning.md): full fine-tune and LoRA with prior preservation, and
class-embedding inversion.

The base is `configs/digits.py:cond_without9` (the 9s left out of the training split, 9
classes), trained once:

    python train.py --config configs/digits.py:cond_without9 --workdir runs/digits_without9
    python bench/finetune_digits.py --base runs/digits_without9 --out runs/finetune_bench

The 5 images are 9s of the training split (seeded choice); the new class is id 9, the null
label moves to 10. For each method and seed: train `configs/digits.py:finetune` with the
method's overrides, then draw --per_class samples of each class 0..9 (the run's sampler) and
score them with the project's digits classifier (`features.digits_feature_net`, trained on all
ten digits): the share of class-9 samples labelled 9, digits-FID of the class-9 samples against
every 9 of the data set except the 5 (the base never saw any), and the accuracy and digits-FID
of classes 0-8 against the test split's 0-8, before (the base) and after. Prints JSON lines and
a Markdown table. Never run by CI.
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

from configs import digits  # noqa: E402
from ddpm_jax import adapters, features, loop, metrics, runs, sampling  # noqa: E402
from ddpm_jax import config as config_lib  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

NEW = 9
METHODS = {  # overrides of configs/digits.py:finetune per method
    "full": {"finetune.method": "full"},
    "lora": {"finetune.method": "lora", "training.lr": 1e-2, "finetune.row_lr_scale": 1.0,
             "training.ema_decay": 0.997, "lora.rank": 1, "lora.alpha": 1.0},
    "embedding": {"finetune.method": "embedding", "training.lr": 1e-2,
                  "finetune.row_lr_scale": 1.0, "finetune.prior_weight": 0.0,
                  "training.ema_decay": 0.997, "finetune.row_ema_warmup": False},
}


def _set(config, overrides):
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _draw(workdir: str, per_class: int, classes: range, seed: int) -> tuple[np.ndarray, np.ndarray]:
    config, model, params = runs.load_for_sampling(workdir, "ema")
    labels = np.repeat(np.arange(classes.start, classes.stop), per_class)
    sampler = sampling.make_sampler(sampling.ModelApply(model),
                                    config_lib.schedule_from_config(config),
                                    (500, *config_lib.image_shape(config)),
                                    SamplerSpec.from_config(config))
    pixels = sampling.draw_images(sampler, params, jax.random.PRNGKey(1000 + seed), len(labels),
                                  labels=labels, progress=False)
    return pixels, labels


def _fid(net, a: np.ndarray, reference_features: np.ndarray) -> float:
    feats, _ = features.compute_features(net, a, progress=False)
    return float(metrics.frechet_distance(*metrics.feature_statistics(feats),
                                          *metrics.feature_statistics(reference_features)))


def _score(net, pixels, labels, refs) -> dict:
    _, logits = features.compute_features(net, pixels, progress=False)
    predicted = np.argmax(logits, axis=1)
    old = labels != NEW
    out = dict(acc_0_8=float(np.mean(predicted[old] == labels[old])),
               fid_0_8=_fid(net, pixels[old], refs["old"]))
    if np.any(~old):
        out.update(share_9=float(np.mean(predicted[~old] == NEW)),
                   fid_9=_fid(net, pixels[~old], refs["nines"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="runs/digits_without9")
    parser.add_argument("--out", default="runs/finetune_bench")
    parser.add_argument("--methods", default="full,lora,embedding")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--per_class", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of each method (default: the config's)")
    parser.add_argument("--set", action="append", default=[],
                        help="METHOD:section.field=value, e.g. lora:training.lr=3e-4")
    parser.add_argument("--skip_base", action="store_true", help="do not score the base")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, test = digits_arrays(8)["train"], digits_arrays(8)["test"]
    nines = np.flatnonzero(train[1] == NEW)
    pick = np.random.default_rng(0).choice(nines, 5, replace=False)
    images_path = os.path.join(args.out, "nines5.npz")
    np.savez(images_path, images=train[0][pick])
    held_out_nines = np.concatenate([np.delete(train[0], pick, axis=0)[
            np.delete(train[1], pick) == NEW], test[0][test[1] == NEW]])
    net = features.digits_feature_net(8)
    refs = {"nines": features.compute_features(net, held_out_nines, progress=False)[0],
            "old": features.compute_features(net, test[0][test[1] != NEW], progress=False)[0]}
    print(f"protocol: base {args.base}; 5 training 9s (indices {sorted(pick.tolist())}); "
          f"{args.per_class} samples per class (the run's sampler); digits classifier "
          f"{net.name}; 9s reference: {len(held_out_nines)} 9s, 0-8 reference: the test split's "
          f"{int(np.sum(test[1] != NEW))}", flush=True)
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.skip_base:  # the base drawn with each seed's key: per-seed ratios
        for seed in seeds:
            pixels, labels = _draw(args.base, args.per_class, range(0, NEW), seed)
            rows.append(dict(method="base", seed=seed, **_score(net, pixels, labels, refs)))
            print(json.dumps(rows[-1]), flush=True)
    for item in args.set:
        method, assignment = item.split(":", 1)
        key, value = assignment.split("=", 1)
        METHODS[method][key] = json.loads(value) if value[:1].isdigit() or value in (
                "true", "false") else value
    for method in args.methods.split(","):
        for seed in seeds:
            tag = "".join(f"_{i.split(':', 1)[1]}" for i in args.set if i.startswith(method + ":"))
            workdir = os.path.join(args.out, f"{method}{tag}_seed{seed}")
            config = _set(digits.get_config("finetune"), {
                    "finetune.base": args.base, "finetune.images": images_path,
                    "training.seed": seed, "training.num_sample_images": 0,
                    **({} if args.steps is None else {"training.num_steps": args.steps}),
                    **METHODS[method]})
            start = time.perf_counter()
            state = loop.train_and_evaluate(config, workdir)
            wall = time.perf_counter() - start
            values, size = adapters.count(state.params)
            _, _, plain = runs.load_for_sampling(workdir, "ema")
            total, _ = adapters.count(plain)
            ckpt = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                       if s.isdigit())
            state_dir = os.path.join(workdir, "checkpoints", str(ckpt), "state")
            on_disk = sum(os.path.getsize(os.path.join(d, f))
                          for d, _, fs in os.walk(state_dir) for f in fs)
            pixels, labels = _draw(workdir, args.per_class, range(0, NEW + 1), seed)
            row = dict(method=method + tag, seed=seed, trained_share=values / total,
                       trainable_bytes=size, checkpoint_state_bytes=on_disk, train_s=wall,
                       **_score(net, pixels, labels, refs))
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = {r["seed"]: r for r in rows if r["method"] == "base"}
    print("\n| method | seed | 9s labelled 9 | digits-FID 9 | acc 0-8 (vs base) | digits-FID 0-8 "
          "(/ base) | params trained | state on disk | train s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get(r["seed"])  # the base drawn with the same key; absent with --skip_base
        vs = ("", "") if b is None or b is r else (
                f" ({100 * (r['acc_0_8'] - b['acc_0_8']):+.1f})",
                f" ({r['fid_0_8'] / b['fid_0_8']:.2f}x)")
        print(f"| {r['method']} | {r['seed']} | {r.get('share_9', float('nan')):.3f} | "
              f"{r.get('fid_9', float('nan')):.2f} | {r['acc_0_8']:.3f}{vs[0]} | "
              f"{r['fid_0_8']:.2f}{vs[1]} | "
              f"{100 * r.get('trained_share', 1.0):.2f}% | "
              f"{r.get('checkpoint_state_bytes', 0) / 1024:.0f} KiB | {r.get('train_s', 0):.0f} |")


if __name__ == "__main__":
    main()
