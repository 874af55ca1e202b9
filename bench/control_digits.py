"""Control images on held-out digits: a ControlNet under the low-pass control, SDEdit from the
low-pass image at equal network calls, and super-resolution by concatenation.

    python bench/control_digits.py --controlnet runs/digits_controlnet --base runs/digits \
        --sr runs/digits_sr --seeds 0,1

Every test digit (digits/test, 360 images, never trained on) gives one control: its k x k
low-pass (the run's control.factor; 2: the 4x4 image shown at 8x8). Rows:
  * ControlNet: the run's sampler (calls = its steps) at control scale 1 (and 0: the base),
  * SDEdit: the base run from q(x_t0 | low-pass image) at --strengths, the same sampler and the
    same number of network calls,
  * SR: the image-conditioned run on the same low-pass images (the run's sampler), and the
    low-pass image itself (nearest upsampling) as the trivial baseline.
Scores: the share labelled as the source digit by the digits classifier (the evaluation one),
the control error (RMSE in [0, 1] pixel units between the output's low-pass and the control),
PSNR against the true digit (SR), and digits-FID against the 360 held-out digits. Each score is
the mean over --seeds with its spread (max - min). Prints JSON lines and a Markdown table.
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

from bench.digits_yardstick import Yardstick  # noqa: E402
from ddpm_jax import config as config_lib, control, features, runs  # noqa: E402
from ddpm_jax.data.builders import digits_arrays  # noqa: E402
from ddpm_jax.images import save_image_grid, to_model_range, to_uint8  # noqa: E402
from ddpm_jax.parallel import map_batches  # noqa: E402
from ddpm_jax.sampling import ModelApply, draw_images, make_sampler  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def lowpass(images_uint8: np.ndarray, factor: int) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1]: the k x k block means at full size."""
    return np.asarray(control.make_control("lowres", jnp.asarray(to_model_range(
            images_uint8.astype(np.float32))), factor))


def scores(net, yardstick, images, labels, controls, factor, truth=None) -> dict:
    _, logits = features.compute_features(net, images, progress=False)
    out = dict(source_digit_share=float((logits.argmax(1) == labels).mean()),
               control_rmse=float(np.sqrt(np.mean((lowpass(images, factor) - controls) ** 2)) / 2),
               fid=yardstick.score(images)["fid"])
    if truth is not None:
        mse = np.mean((images.astype(np.float64) / 255 - truth.astype(np.float64) / 255) ** 2,
                      axis=(1, 2, 3))
        out["psnr_db"] = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
    return out


def controlled(workdir: str, controls: np.ndarray, seed: int, batch: int, *, scale: float = 1.0,
               condition: bool = False):
    """(uint8 outputs, calls per image, seconds) of a ControlNet or image-conditioned run."""
    config, model, params = runs.load_for_sampling(workdir, "ema")
    branch = None if condition else control.branch_from_config(config, model)
    spec = SamplerSpec.from_config(config)
    sampler = make_sampler(control.ControlApply(model, branch), config_lib.schedule_from_config(config),
                           (batch, *config_lib.image_shape(config)), spec)
    rows = control.rows(controls, scale=None if condition else scale)
    start = time.perf_counter()
    out = control.draw(sampler, params, jax.random.key(seed), rows, progress=False)
    return out, sampler.plan.num_steps, time.perf_counter() - start


def sdedit(workdir: str, controls: np.ndarray, seed: int, batch: int, strength: float, calls: int):
    """(uint8 outputs, calls, seconds): SDEdit of the base run from the low-pass images."""
    config, model, params = runs.load_for_sampling(workdir, "ema")
    schedule = config_lib.schedule_from_config(config)
    start_t = int(round(strength * schedule.num_timesteps)) - 1
    spec = SamplerSpec.from_config(config, steps=calls)
    sampler = make_sampler(ModelApply(model), schedule, (batch, *config_lib.image_shape(config)),
                           spec, start_t=start_t)
    begin = time.perf_counter()
    out = map_batches(lambda n, x: to_uint8(sampler(params, jax.random.key(seed), n, init=x,
                                                    start="q_x0")["images"]),
                      [controls], batch, progress=False, to_host=np.asarray)
    return out, sampler.plan.num_steps, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet", default=None)
    parser.add_argument("--base", default=None)
    parser.add_argument("--sr", default=None)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="SDEdit's network calls (the "
                        "ControlNet run's sampler steps: 20 for the digits default)")
    parser.add_argument("--strengths", default="0.5,0.7")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch_size", type=int, default=360)
    parser.add_argument("--out", default="runs/control_digits.png")
    args = parser.parse_args()
    images, labels = digits_arrays(8)["test"]
    controls = lowpass(images, args.factor)
    yardstick = Yardstick(reference_split="test")
    net = yardstick.net
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"protocol: {len(images)} digits/test images, control = their {args.factor}x"
          f"{args.factor} block means ({8 // args.factor}x{8 // args.factor} low-pass); seeds "
          f"{seeds}; EMA weights; scored by {yardstick.protocol()}", flush=True)
    jobs = []
    calls = args.calls
    if args.controlnet:
        for scale in (1.0, 0.0):
            jobs.append((f"ControlNet, control scale {scale:g}", lambda s, scale=scale:
                         controlled(args.controlnet, controls, s, args.batch_size, scale=scale)))
    if args.base:
        for strength in (float(v) for v in args.strengths.split(",")):
            jobs.append((f"SDEdit from the low-pass, strength {strength:g}",
                         lambda s, strength=strength: sdedit(args.base, controls, s,
                                                             args.batch_size, strength, calls)))
    if args.sr:
        jobs.append(("SR (concatenation)", lambda s: controlled(args.sr, controls, s,
                                                               args.batch_size, condition=True)))
    table = [dict(row="held-out digits themselves", n_calls=0,
                  **scores(net, yardstick, images, labels, controls, args.factor, images)),
             dict(row="the low-pass image (nearest upsampling)", n_calls=0,
                  **scores(net, yardstick, ((controls + 1) * 127.5).round().astype(np.uint8),
                           labels, controls, args.factor, images))]
    for row in table:
        print(json.dumps(row), flush=True)
    for name, job in jobs:
        per_seed = []
        for seed in seeds:
            out, n_calls, seconds = job(seed)
            per_seed.append(dict(scores(net, yardstick, out, labels, controls, args.factor,
                                        images if name.startswith("SR") else None),
                                 seconds=seconds))
            if seed == seeds[0]:
                path = args.out.replace(".png", f"_{len(table)}.png")
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                shown = ((controls[:50] + 1) * 127.5).round().astype(np.uint8)
                save_image_grid(np.stack([shown, out[:50]], 1).reshape(-1, 8, 8, 1), path, nrow=10)
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
