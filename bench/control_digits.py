"""Control images on held-out digits: a ControlNet under the low-pass control, SDEdit from the
low-pass image at equal network calls, and super-resolution by concatenation.

    python bench/control_digits.py --controlnet runs/digits_controlnet --base runs/digits \
        --sr runs/digits_sr --seeds 0,1
    python bench/control_digits.py --cascade runs/digits4 --sr runs/digits_sr \
        --default runs/digits --seeds 0,1,2
    python bench/control_digits.py --size 16 --sr runs/digits_sr16 --seeds 0,1

The cascade (--cascade, a `configs/digits.py:4px` run): 1,000 samples of the 4x4 run (its
sampler), upsampled, condition the SR run (its sampler, at each --sr_guidance); digits-FID of the
8x8 outputs against the train (1,437) and held-out (360) references, next to 1,000 samples of the
single-stage --default run, per seed.

Every test digit (digits/test, 360 images, never trained on) gives one control: its k x k
low-pass (the run's control.factor; 2: the 4x4 image shown at 8x8). Rows:
  * ControlNet: the run's sampler (calls = its steps) at control scale 1 (and 0: the base),
    and with --cn_guidance g: eps(c) + g (eps(c) - eps(base)) (two calls per step),
  * SDEdit: the base run from q(x_t0 | low-pass image), t0 = strength T, at --strengths, the
    same sampler on as many network calls below t0 as the ControlNet makes in all (--calls),
  * SR: the image-conditioned run on the same low-pass images (the run's sampler), and the
    low-pass image itself (nearest upsampling) as the trivial baseline.
Scores: the share labelled as the source digit by the digits classifier (the evaluation one),
the control error (RMSE in [0, 1] pixel units between the output's low-pass and the control),
PSNR against the true digit (SR), and digits-FID against the 360 held-out digits. With
--edges_controlnet, a ControlNet of kind edges under each digit's edge map (its error: the RMSE
between the output's edge map and the control); with --mask_controlnet, a ControlNet of kind
mask completing each digit from its top half (its error: the RMSE of the output's top half
against the digit's; compare bench/inpaint_digits.py's RePaint). Each score is
the mean over --seeds with its spread (max - min). --size 16: the 16px test digits (the 8x8
ones bicubic-upsampled), their 8x8 low-pass as control, for an 8x8 -> 16x16 SR run; the
classifier and digits-FID read the outputs 2x2-averaged to 8x8, as for every 16px model.
Prints JSON lines and a Markdown table.
Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, to_native  # noqa: E402
from ddpm_jax import config as config_lib, control, features, runs  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.images import save_image_grid, to_model_range, to_uint8  # noqa: E402
from ddpm_jax.parallel import map_batches  # noqa: E402
from ddpm_jax.sampling import ModelApply, draw_images, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def transform(images_uint8: np.ndarray, factor: int, kind: str = "lowres") -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1]: the control images of uint8 images (`make_control`)."""
    return np.asarray(control.make_control(kind, jnp.asarray(to_model_range(
            images_uint8.astype(np.float32))), factor))


def scores(net, yardstick, images, labels, controls, factor, truth=None, kind="lowres") -> dict:
    """images: uint8 [N, 8k, 8k, 1]; the classifier and digits-FID read them at 8x8 (k x k block
    means), the control error and PSNR at their own size."""
    _, logits = features.compute_features(net, to_native(images), progress=False)
    error = transform(images, factor, kind) - controls
    if kind == "mask":  # the known top half's pixels (the mask channel agrees by construction)
        error = error[:, : images.shape[1] // 2, :, : images.shape[-1]]
    out = dict(source_digit_share=float((logits.argmax(1) == labels).mean()),
               control_rmse=float(np.sqrt(np.mean(error ** 2)) / 2),
               fid=yardstick.score(images)["fid"])
    if truth is not None:
        mse = np.mean((images.astype(np.float64) / 255 - truth.astype(np.float64) / 255) ** 2,
                      axis=(1, 2, 3))
        out["psnr_db"] = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
    return out


def lowpass_bound(factor: int) -> list[dict]:
    """What the low-pass image says about the class, from classifiers fitted on the train
    split's block means and scored on the test block means (RBF SVMs at C = 1 and 10 with
    Platt probabilities, 5 nearest neighbours): argmax accuracy (a best guess from the low-pass
    alone), E[p(true class | low-pass)] (the share exact samples of p(digit | low-pass) would
    show, were the probabilities calibrated) and the test negative log-likelihood (lower: the
    better calibrated estimate)."""
    import warnings

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC
    (train, train_labels), (test, test_labels) = (digits_arrays(8)[s] for s in ("train", "test"))

    def blocks(x: np.ndarray) -> np.ndarray:
        n, k = len(x), 8 // factor
        return x.reshape(n, k, factor, k, factor).mean(axis=(2, 4)).reshape(n, -1) / 255.0
    rows = []
    for name, estimator in (("RBF SVM, C = 1", SVC(probability=True, random_state=0)),
                            ("RBF SVM, C = 10", SVC(C=10, probability=True, random_state=0)),
                            ("5 nearest neighbours", KNeighborsClassifier(5))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            probs = estimator.fit(blocks(train), train_labels).predict_proba(blocks(test))
        true = probs[np.arange(len(test_labels)), test_labels]
        rows.append(dict(row=f"low-pass only ({name} on train block means): E[p(true class)]",
                         n_calls=0, argmax_accuracy=float((probs.argmax(1) == test_labels).mean()),
                         source_digit_share=float(true.mean()),
                         nll=float(-np.mean(np.log(np.maximum(true, 1e-12))))))
    return rows


def controlled(workdir: str, controls: np.ndarray, seed: int, batch: int, *, scale: float = 1.0,
               condition: bool = False, guidance: float = 0.0, sampler: str | None = None,
               steps: int | None = None):
    """(uint8 outputs, calls per image, seconds) of a ControlNet or image-conditioned run, with
    guidance g on the control image (0: none, one call per step; else two); sampler / steps:
    the run's own unless given."""
    config, model, params = runs.load_for_sampling(workdir, "ema")
    branch = None if condition else control.branch_from_config(config, model)
    spec = SamplerSpec.from_config(config, sampler=sampler, steps=steps)  # None: the run's
    sampler = make_sampler(control.ControlApply(model, branch, condition_guidance=guidance > 0),
                           config_lib.schedule_from_config(config),
                           (batch, *config_lib.image_shape(config)), spec)
    rows = control.rows(controls, scale=None if condition else scale,
                        condition_guidance=guidance if guidance > 0 else None)
    start = time.perf_counter()
    out = control.draw(sampler, params, jax.random.key(seed), rows, progress=False)
    return out, sampler.plan.num_steps * (2 if guidance > 0 else 1), time.perf_counter() - start


def sdedit(workdir: str, controls: np.ndarray, seed: int, batch: int, strength: float, calls: int):
    """(uint8 outputs, calls, seconds): SDEdit of the base run from the low-pass images."""
    config, model, params = runs.load_for_sampling(workdir, "ema")
    schedule = config_lib.schedule_from_config(config)
    start_t = int(round(strength * schedule.num_timesteps)) - 1
    # The run's sampler on the fewest steps whose part below start_t is `calls` steps.
    steps = next(s for s in range(calls, schedule.num_timesteps + 1)
                 if SamplerSpec.from_config(config, steps=s).plan(
                         schedule, start_t=start_t).num_steps >= calls)
    spec = SamplerSpec.from_config(config, steps=steps)
    sampler = make_sampler(ModelApply(model), schedule, (batch, *config_lib.image_shape(config)),
                           spec, start_t=start_t)
    begin = time.perf_counter()
    out = map_batches(lambda n, x: to_uint8(sampler(params, jax.random.key(seed), n, init=x,
                                                    start="q_x0")["images"]),
                      [controls], batch, progress=False, to_host=np.asarray)
    return out, sampler.plan.num_steps, time.perf_counter() - begin


def run_samples(workdir: str, seed: int, num: int, batch: int) -> np.ndarray:
    """uint8 [num, H, W, C]: a run's samples with its own sampler, key `seed`."""
    config, model, params = runs.load_for_sampling(workdir, "ema")
    sampler = make_sampler(ModelApply(model), config_lib.schedule_from_config(config),
                           (min(batch, num), *config_lib.image_shape(config)),
                           SamplerSpec.from_config(config))
    return draw_images(sampler, params, jax.random.key(seed), num, progress=False), \
        sampler.plan.num_steps


def cascade_rows(first: str, sr: str, default: str, seeds: list[int], num: int, batch: int,
                 sr_guidance: list[float]) -> list[dict]:
    """The 4x4 -> 8x8 cascade (the 4x4 run's samples, upsampled, as the SR run's conditions)
    next to the single-stage default run: digits-FID of `num` samples against the train and
    held-out references, per seed (first stage key seed + 1000, second stage key seed)."""
    train_ref, test_ref = Yardstick(), Yardstick(reference_split="test")
    jobs = [("single-stage default", lambda s: run_samples(default, s, num, batch))]
    for g in sr_guidance:
        def two_stages(s, g=g):
            low, first_calls = run_samples(first, s + 1000, num, batch)
            conditions = np.asarray(control.upsample(jnp.asarray(to_model_range(
                    low.astype(np.float32))), 8 // low.shape[1]))
            out, calls, _ = controlled(sr, conditions, s, batch, condition=True, guidance=g)
            return out, first_calls + calls
        jobs.append((f"cascade 4x4 -> 8x8, condition guidance {g:g}", two_stages))
    rows = []
    for name, job in jobs:
        per_seed = []
        for seed in seeds:
            start = time.perf_counter()
            out, calls = job(seed)
            per_seed.append(dict(fid_train=train_ref.score(out)["fid"],
                                 fid_test=test_ref.score(out)["fid"],
                                 seconds=time.perf_counter() - start))
        row = dict(row=name, n_calls=calls, num_samples=num)
        for key in per_seed[0]:
            values = [p[key] for p in per_seed]
            row[key] = float(np.mean(values))
            row[key + "_spread"] = float(np.max(values) - np.min(values))
            row[key + "_per_seed"] = values
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | calls | digits-FID vs train | digits-FID vs held-out |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['row']} | {row['n_calls']} | {row['fid_train']:.2f} +- "
              f"{row['fid_train_spread'] / 2:.2f} | {row['fid_test']:.2f} +- "
              f"{row['fid_test_spread'] / 2:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet", default=None)
    parser.add_argument("--base", default=None)
    parser.add_argument("--sr", default=None)
    parser.add_argument("--size", type=int, default=8, choices=(8, 16), help="the test digits' "
                        "size: 16 for an 8x8 -> 16x16 SR run (configs/digits.py:sr16; --sr only)")
    parser.add_argument("--edges_controlnet", default=None, help="a ControlNet run of kind edges")
    parser.add_argument("--mask_controlnet", default=None, help="a ControlNet run of kind mask "
                        "(the top half known): scored on completing the held-out digits")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="SDEdit's network calls (the "
                        "ControlNet run's sampler steps: 20 for the digits default)")
    parser.add_argument("--strengths", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--sr_guidance", default="0,1,3", help="SR: guidance g on the condition")
    parser.add_argument("--sr_sampler", default=None, help="SR: a sampler other than the run's")
    parser.add_argument("--sr_steps", type=int, default=None, help="SR: steps other than the run's")
    parser.add_argument("--scales", default="1,2,0", help="ControlNet control scales")
    parser.add_argument("--cn_guidance", default="", help="ControlNet: guidance g on the "
                        "control (the base, i.e. the null control, as the unconditional model; "
                        "two calls per step), a comma-separated list")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch_size", type=int, default=360)
    parser.add_argument("--out", default="runs/control_digits.png")
    parser.add_argument("--cascade", default=None, help="a 4x4 run (configs/digits.py:4px): "
                        "score the cascade into --sr next to --default, then stop")
    parser.add_argument("--default", default=None, help="the single-stage 8x8 run (--cascade)")
    parser.add_argument("--num_samples", type=int, default=1000, help="--cascade's samples")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.cascade:
        if not (args.sr and args.default):
            parser.error("--cascade needs --sr (the 4x4 -> 8x8 run) and --default (8x8).")
        cascade_rows(args.cascade, args.sr, args.default, seeds, args.num_samples, 500,
                     [float(v) for v in args.sr_guidance.split(",")])
        return
    if args.size != 8 and (args.controlnet or args.base or args.edges_controlnet):
        parser.error("--size 16 scores an SR run (--sr) only.")
    images, labels = digits_arrays(args.size)["test"]
    low = args.size // args.factor
    controls = transform(images, args.factor)
    edge_maps = transform(images, args.factor, "edges")
    masked = transform(images, args.factor, "mask")  # [x * top-half mask, mask] channels
    yardstick = Yardstick(reference_split="test")
    net = yardstick.net
    print(f"protocol: {len(images)} digits/test images, control = their {args.factor}x"
          f"{args.factor} block means ({low}x{low} low-pass); seeds "
          f"{seeds}; EMA weights; scored by {yardstick.protocol()}", flush=True)
    jobs = []
    calls = args.calls
    if args.controlnet:
        for scale in (float(v) for v in args.scales.split(",")):
            jobs.append((f"ControlNet, control scale {scale:g}", "lowres", lambda s, scale=scale:
                         controlled(args.controlnet, controls, s, args.batch_size, scale=scale)))
        for g in (float(v) for v in args.cn_guidance.split(",") if v):
            jobs.append((f"ControlNet, guidance {g:g} on the control", "lowres",
                         lambda s, g=g: controlled(args.controlnet, controls, s,
                                                   args.batch_size, guidance=g)))
    if args.base:
        for strength in (float(v) for v in args.strengths.split(",")):
            jobs.append((f"SDEdit from the low-pass, strength {strength:g}", "lowres",
                         lambda s, strength=strength: sdedit(args.base, controls, s,
                                                             args.batch_size, strength, calls)))
    if args.edges_controlnet:
        jobs.append(("ControlNet on edge maps, control scale 1", "edges", lambda s: controlled(
                args.edges_controlnet, edge_maps, s, args.batch_size)))
    if args.mask_controlnet:
        jobs.append(("ControlNet on the top half (mask), control scale 1", "mask",
                     lambda s: controlled(args.mask_controlnet, masked, s, args.batch_size)))
    if args.sr:
        for g in (float(v) for v in args.sr_guidance.split(",")):
            jobs.append((f"SR (concatenation), condition guidance {g:g}", "lowres",
                         lambda s, g=g: controlled(args.sr, controls, s, args.batch_size,
                                                   condition=True, guidance=g,
                                                   sampler=args.sr_sampler, steps=args.sr_steps)))
    table = [dict(row="held-out digits themselves", n_calls=0,
                  **scores(net, yardstick, images, labels, controls, args.factor, images)),
             dict(row="the low-pass image (nearest upsampling)", n_calls=0,
                  **scores(net, yardstick, ((controls + 1) * 127.5).round().astype(np.uint8),
                           labels, controls, args.factor, images)),
             *(lowpass_bound(args.factor) if args.size == 8 else [])]
    for row in table:
        print(json.dumps(row), flush=True)
    for name, kind, job in jobs:  # kind: which control image the row is scored against
        per_seed = []
        for seed in seeds:
            out, n_calls, seconds = job(seed)
            given = dict(edges=edge_maps, mask=masked, lowres=controls)[kind]
            per_seed.append(dict(scores(net, yardstick, out, labels, given, args.factor,
                                        images if name.startswith("SR") else None,
                                        kind=kind), seconds=seconds))
            if seed == seeds[0]:
                path = args.out.replace(".png", f"_{len(table)}.png")
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                shown = ((given[:50, ..., : out.shape[-1]] + 1) * 127.5).round().astype(np.uint8)
                save_image_grid(np.stack([shown, out[:50]], 1).reshape(-1, *out.shape[1:]), path,
                                nrow=10)
        row = dict(row=name, n_calls=n_calls)
        for key in per_seed[0]:
            values = [p[key] for p in per_seed]
            row[key] = float(np.mean(values))
            row[key + "_spread"] = float(np.max(values) - np.min(values))
        table.append(row)
        print(json.dumps(row), flush=True)
    print("\n| method | calls | labelled as the source digit | control RMSE | PSNR (dB) | "
          "digits-FID vs held-out |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        def cell(key, fmt, scale=1.0):
            if key not in row:
                return ""
            spread = row.get(key + "_spread")
            text = format(row[key] * scale, fmt)
            return text + (f" +- {format(spread * scale / 2, fmt)}" if spread is not None else "")
        print(f"| {row['row']} | {row['n_calls']} | {cell('source_digit_share', '.1f', 100)}% | "
              f"{cell('control_rmse', '.3f')} | {cell('psnr_db', '.2f')} | {cell('fid', '.2f')} |")


if __name__ == "__main__":
    main()
