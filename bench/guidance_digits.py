"""Classifier guidance on digits: for each scale, class-balanced samples (image n asks for class
n mod 10) from an unconditional run guided by a noise-conditional classifier run, scored by the
project's evaluation classifier (a clean-image classifier, not the guiding one): the share
labelled as the requested class, and digits-FID against the train split.

    python bench/guidance_digits.py --workdir runs/digits --classifier runs/digits-clf \
        --scales 0,1,2,5,10 --sampler ddim --steps 50

Prints the protocol, JSON lines and a Markdown table. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick  # noqa: E402
from ddpm_jax import config as config_lib, features, runs  # noqa: E402
from ddpm_jax.labels import balanced  # noqa: E402
from ddpm_jax.guidance import ClassifierApply  # noqa: E402
from ddpm_jax.sampling import ModelApply, draw_images, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--scales", default="0,1,2,5,10")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", default="50")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config, model, params = runs.load_for_sampling(args.workdir, "ema")
    _, clf_model, clf_params = runs.load_for_sampling(args.classifier, "ema")
    yardstick = Yardstick()
    net = features.make_feature_net("digits", image_size=config.data.image_size)
    labels = balanced(clf_model.classes, args.num_samples)
    steps = int(args.steps) if args.steps.isdigit() else args.steps
    print(f"protocol: {args.num_samples} samples, image n asks for class n mod "
          f"{clf_model.classes}; {args.sampler}, {args.steps} steps, seed {args.seed}; EMA weights "
          f"of {args.workdir} guided by the EMA weights of {args.classifier}; scored by "
          f"{yardstick.protocol()}", flush=True)
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        spec = SamplerSpec.from_config(config, sampler=args.sampler, steps=steps)
        sampler = make_sampler(ModelApply(model), config_lib.schedule_from_config(config),
                               (min(args.batch_size, args.num_samples),
                                *config_lib.image_shape(config)), spec,
                               classifier=ClassifierApply(clf_model), classifier_scale=scale)
        if not rows:  # compile outside the timing (every scale reuses the program: scale is data)
            draw_images(sampler, params, jax.random.key(args.seed), sampler.batch_size,
                        labels=labels[:sampler.batch_size], progress=False,
                        classifier_params=clf_params)
        start = time.perf_counter()
        images = draw_images(sampler, params, jax.random.key(args.seed), args.num_samples,
                             labels=labels, progress=False, classifier_params=clf_params)
        seconds = time.perf_counter() - start
        _, logits = features.compute_features(net, images, progress=False)
        row = dict(scale=scale, requested_class_share=float((logits.argmax(1) == labels).mean()),
                   seconds=round(seconds, 1), **yardstick.score(images))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| classifier scale | labelled as requested | digits-FID | s per 1,000 |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['scale']:g} | {100 * row['requested_class_share']:.1f}% | {row['fid']:.2f} | "
              f"{row['seconds'] * 1000 / args.num_samples:.0f} |")


if __name__ == "__main__":
    main()
