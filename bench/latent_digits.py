"""Latent diffusion on the 16px digits: the first stage's reconstructions, and the latent model
against the pixel model at equal total wall clock (docs/latent.md).

    nice -n 10 python bench/latent_digits.py --out /tmp/latent_bench [--ae_steps 800]
        [--latent_steps 2000] [--seeds 3]

1. Trains the autoencoder (configs/digits.py:autoencoder16: 16x16 -> 8x8x2) and the latent DDPM
   (configs/digits.py:latent16) with train.py, timing each command's wall clock (start-up and
   compilation included).
2. Calibrates the pixel model's (configs/digits.py:16px) seconds per step and start-up on a
   short throwaway run, then trains it for the steps that fill the same total wall clock
   (autoencoder + latent model), and reports its measured wall clock.
3. Scores on the digits yardstick (bench/digits_yardstick.py: digits-FID at 8x8 against the
   train split): the test images, their reconstructions (the ceiling of a latent model), and
   1,000 samples of each model per seed with the same sampler and steps.
4. Times one network call at the sampling batch, and 1,000 samples (a second draw, compiled;
   the latent model's includes its decoder).
Training runs with the grids off (training.num_sample_images=0) for both models. Rows are JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.digits_yardstick import Yardstick  # noqa: E402

CONFIG = os.path.join(ROOT, "configs/digits.py")
NO_GRIDS = ["--config.training.num_sample_images=0", "--progress_bar=false"]


def emit(**row) -> None:
    print(json.dumps(dict(row, date=time.strftime("%Y-%m-%d"))), flush=True)


def train(variant: str, workdir: str, *flags: str) -> float:
    """Wall seconds of `train.py --config configs/digits.py:VARIANT` in a fresh work dir."""
    record = os.path.join(workdir, "bench_seconds.json")
    if os.path.exists(record):  # a finished stage of an earlier, interrupted bench
        with open(record) as f:
            return json.load(f)["seconds"]
    if os.path.exists(workdir):
        raise SystemExit(f"{workdir} exists: pass a fresh --out (this bench times fresh runs).")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"{CONFIG}:{variant}",
           "--workdir", workdir, *NO_GRIDS, *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    with open(record, "w") as f:
        json.dump(dict(seconds=seconds, command=cmd), f)
    return seconds


def seconds_per_step(workdir: str) -> float:
    """The mean seconds per step over the logged intervals after the first (compilation)."""
    rates = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("steps_per_sec", 0) > 0:
                rates.append(1.0 / record["steps_per_sec"])
    return float(np.mean(rates[1:] or rates))


def load(workdir: str):
    """(config, model, params, sampler factory) of a run, pixel or latent."""
    from ddpm_jax import config as config_lib
    from ddpm_jax import runs, sampling
    from ddpm_jax.spec import spec_and_options

    config, model, params = runs.load_for_sampling(workdir, weights="ema")
    schedule = config_lib.schedule_from_config(config)

    def make(batch: int, **options):
        return sampling.make_sampler(
                sampling.ModelApply(model), schedule, (batch, *config_lib.image_shape(config)),
                **spec_and_options(mean_type=config.diffusion.mean_type,
                                   var_type=config.diffusion.var_type,
                                   clip_denoised=config.sampling.clip_denoised, **options))
    return config, model, params, make


def draw(workdir: str, seed: int, num: int, batch: int, options: dict) -> tuple[np.ndarray, float]:
    import jax

    from ddpm_jax import sampling
    _, _, params, make = load(workdir)
    sampler = make(batch, **options)
    start = time.perf_counter()
    images = sampling.draw_images(sampler, params, jax.random.key(seed), num, progress=False)
    return images, time.perf_counter() - start


def network_call_seconds(workdir: str, batch: int, repeats: int = 10) -> float:
    """Median seconds of one jitted UNet call on a batch (the chain's per-step cost)."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax import config as config_lib
    config, model, params, _ = load(workdir)
    if "unet" in params:  # a latent run: its UNet alone
        model, params = model.unet, params["unet"]
    x = jnp.zeros((batch, *config_lib.image_shape(config)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    call = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    call(params, x, t).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(params, x, t).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def reconstruction_rows(ae_dir: str, yardstick: Yardstick) -> None:
    import jax

    from ddpm_jax import data, images, latent, runs
    _, config, model, params = runs.load_step_for_sampling(ae_dir, "ema")
    real = data.load_split_uint8("digits", "test", image_size=16, channels=1)
    x = images.to_model_range(real)
    rebuilt = np.asarray(jax.jit(latent.reconstruct, static_argnums=0)(model, params, x))
    out = images.to_uint8(rebuilt)
    mse = float(np.mean(np.square(rebuilt - x)))
    real_fid, rec_fid = yardstick.score(real)["fid"], yardstick.score(out)["fid"]
    emit(row="reconstruction", images=len(real), l1=float(np.mean(np.abs(rebuilt - x))), mse=mse,
         psnr_db=10 * np.log10(4.0 / mse), real_test_fid=real_fid, reconstruction_fid=rec_fid,
         ratio=rec_fid / real_fid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a fresh directory for the three runs")
    parser.add_argument("--ae_steps", type=int, default=800)
    parser.add_argument("--latent_steps", type=int, default=2000)
    parser.add_argument("--calibration_steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sampler", default="dpm++sde")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--spacing", default="logsnr")
    args = parser.parse_args()
    ae_dir, latent_dir, pixel_dir = (os.path.join(args.out, n) for n in ("autoencoder16",
                                                                          "latent16", "pixel16"))
    ae_s = train("autoencoder16", ae_dir, f"--config.training.num_steps={args.ae_steps}")
    emit(row="train", model="autoencoder16", steps=args.ae_steps, seconds=ae_s)
    latent_s = train("latent16", latent_dir, f"--config.latent.autoencoder={ae_dir}",
                     f"--config.training.num_steps={args.latent_steps}")
    emit(row="train", model="latent16", steps=args.latent_steps, seconds=latent_s)
    calibration = os.path.join(args.out, "pixel16_calibration")
    cal_s = train("16px", calibration, f"--config.training.num_steps={args.calibration_steps}")
    per_step = seconds_per_step(calibration)
    start_up = cal_s - args.calibration_steps * per_step
    budget = ae_s + latent_s
    pixel_steps = max(50, int(round((budget - start_up) / per_step / 50)) * 50)
    pixel_s = train("16px", pixel_dir, f"--config.training.num_steps={pixel_steps}")
    emit(row="train", model="pixel16", steps=pixel_steps, seconds=pixel_s, budget_seconds=budget,
         calibration=dict(seconds_per_step=per_step, start_up_seconds=start_up))

    yardstick = Yardstick()
    reconstruction_rows(ae_dir, yardstick)
    options = dict(sampler=args.sampler, steps=args.steps, spacing=args.spacing)
    for name, workdir in (("latent16", latent_dir), ("pixel16", pixel_dir)):
        emit(row="network_call", model=name, batch=args.batch,
             seconds=network_call_seconds(workdir, args.batch))
        for seed in range(args.seeds):
            samples, seconds = draw(workdir, seed, args.num_samples, args.batch, options)
            row = dict(row="samples", model=name, seed=seed, **options,
                       fid=yardstick.score(samples)["fid"])
            if seed == 0:  # compiled now: time a second, identical draw
                row["seconds_1000"] = draw(workdir, seed, 1000, args.batch, options)[1]
            emit(**row)


if __name__ == "__main__":
    main()
