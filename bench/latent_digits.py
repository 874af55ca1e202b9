"""Latent diffusion on the 16px digits: the first stage's reconstructions, and the latent model
against the pixel model at equal total wall clock (docs/latent.md).

    nice -n 10 python bench/latent_digits.py --out /tmp/latent_bench [--ae_steps 800]
        [--latent_steps 1000] [--seeds 2]

1. Trains the autoencoder (configs/digits.py:autoencoder16: 16x16 -> 8x8x2) and the latent DDPM
   (configs/digits.py:latent16) with train.py, measuring each command's CPU seconds and wall
   clock (start-up and compilation included).
2. Trains the pixel model (configs/digits.py:16px, a checkpoint every 50 steps) until its
   process has used the same CPU seconds as the two latent stages together, stops it there and
   scores its newest checkpoint. The budget is CPU time, not wall clock, because the machine is
   shared: on an idle machine, where each command keeps the cores busy, equal CPU time is equal
   wall clock, while the wall clock of a shared machine measures the neighbours.
3. Scores on the digits yardstick (bench/digits_yardstick.py: digits-FID at 8x8 against the
   train split): the test images, their reconstructions (the ceiling of a latent model), and
   1,000 samples of each model per seed with the same sampler and steps.
4. Times one network call at the sampling batch and 1,000 samples (compiled; the latent
   model's include its decoder) of both models, alternating between them over --repeats rounds
   so that both see the same load of a shared machine; reports the median and the minimum.
   `--only timing` runs this step alone on the runs of an earlier bench in --out.
Training runs with the grids off (training.num_sample_images=0) for both models. Rows are JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command(variant: str, workdir: str, *flags: str) -> list[str]:
    if os.path.exists(workdir):
        raise SystemExit(f"{workdir} exists: pass a fresh --out (this bench times fresh runs).")
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"{CONFIG}:{variant}",
            "--workdir", workdir, *NO_GRIDS, *flags]


def train(variant: str, workdir: str, *flags: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `train.py --config configs/digits.py:VARIANT`."""
    record = os.path.join(workdir, "bench_seconds.json")
    if os.path.exists(record):  # a finished stage of an earlier, interrupted bench
        with open(record) as f:
            saved = json.load(f)
            return saved["cpu_seconds"], saved["seconds"]
    cmd = command(variant, workdir, *flags)
    start, cpu = time.perf_counter(), child_cpu_s()
    subprocess.run(cmd, check=True)
    seconds, cpu = time.perf_counter() - start, child_cpu_s() - cpu
    with open(record, "w") as f:
        json.dump(dict(seconds=seconds, cpu_seconds=cpu, command=cmd), f)
    return cpu, seconds


def train_for_cpu(variant: str, workdir: str, budget: float, *flags: str) -> tuple[int, float, float]:
    """Runs train.py until its process has used `budget` CPU seconds (or finishes); returns
    (newest checkpoint step, CPU seconds, wall seconds) at the stop."""
    from ddpm_jax import checkpoint
    proc = subprocess.Popen(command(variant, workdir, *flags))
    start, cpu = time.perf_counter(), 0.0
    while proc.poll() is None:
        try:
            cpu = process_cpu_s(proc.pid)
        except (OSError, IndexError):
            break
        if cpu >= budget:
            proc.kill()
            break
        time.sleep(0.5)
    proc.wait()
    seconds = time.perf_counter() - start
    manager = checkpoint.make_manager(workdir, max_to_keep=1, read_only=True)
    step = manager.latest_step()
    manager.close()
    return step, cpu, seconds


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


def draw(workdir: str, seed: int, num: int, batch: int, options: dict) -> np.ndarray:
    import jax

    from ddpm_jax import sampling
    _, _, params, make = load(workdir)
    return sampling.draw_images(make(batch, **options), params, jax.random.key(seed), num,
                                progress=False)


def timers(workdir: str, batch: int, options: dict) -> dict:
    """{"network_call": f, "samples_1000": g}: compiled, warmed-up callables of a run (a latent
    run's network call is its UNet's alone; its samples include the decoder)."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax import config as config_lib
    from ddpm_jax import sampling
    config, model, params, make = load(workdir)
    unet, unet_params = (model.unet, params["unet"]) if "unet" in params else (model, params)
    x = jnp.zeros((batch, *config_lib.image_shape(config)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    call = jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t, train=False))
    sampler = make(batch, **options)
    fns = dict(network_call=lambda: call(unet_params, x, t).block_until_ready(),
               samples_1000=lambda: sampling.draw_images(sampler, params, jax.random.key(0),
                                                         1000, progress=False))
    for fn in fns.values():
        fn()
    return fns


def timing_rows(runs: dict, batch: int, options: dict, repeats: int) -> None:
    """Alternates the runs' timers over `repeats` rounds (the same load for both)."""
    fns = {name: timers(workdir, batch, options) for name, workdir in runs.items()}
    times = {(name, what): [] for name in fns for what in fns[name]}
    for _ in range(repeats):
        for name, timer in fns.items():
            for what, fn in timer.items():
                start = time.perf_counter()
                fn()
                times[name, what].append(time.perf_counter() - start)
    for (name, what), values in times.items():
        emit(row=what, model=name, batch=batch, **options, median_s=float(np.median(values)),
             min_s=float(np.min(values)), repeats=repeats)


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
    parser.add_argument("--latent_steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sampler", default="dpm++sde")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--spacing", default="logsnr")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("timing",), default=None)
    args = parser.parse_args()
    ae_dir, latent_dir, pixel_dir = (os.path.join(args.out, n) for n in ("autoencoder16",
                                                                          "latent16", "pixel16"))
    options = dict(sampler=args.sampler, steps=args.steps, spacing=args.spacing)
    if args.only == "timing":
        return timing_rows(dict(latent16=latent_dir, pixel16=pixel_dir), args.batch, options,
                           args.repeats)
    ae_cpu, ae_s = train("autoencoder16", ae_dir, f"--config.training.num_steps={args.ae_steps}")
    emit(row="train", model="autoencoder16", steps=args.ae_steps, cpu_seconds=ae_cpu, seconds=ae_s)
    latent_cpu, latent_s = train("latent16", latent_dir, f"--config.latent.autoencoder={ae_dir}",
                                 f"--config.training.num_steps={args.latent_steps}")
    emit(row="train", model="latent16", steps=args.latent_steps, cpu_seconds=latent_cpu,
         seconds=latent_s)
    budget = ae_cpu + latent_cpu
    pixel_step, pixel_cpu, pixel_s = train_for_cpu(
            "16px", pixel_dir, budget, "--config.training.num_steps=100000",
            "--config.training.checkpoint_every=50", "--config.training.keep_checkpoints=1")
    emit(row="train", model="pixel16", steps=pixel_step, cpu_seconds=pixel_cpu, seconds=pixel_s,
         budget_cpu_seconds=budget)

    yardstick = Yardstick()
    reconstruction_rows(ae_dir, yardstick)
    for name, workdir in (("latent16", latent_dir), ("pixel16", pixel_dir)):
        for seed in range(args.seeds):
            samples = draw(workdir, seed, args.num_samples, args.batch, options)
            emit(row="samples", model=name, seed=seed, **options,
                 fid=yardstick.score(samples)["fid"])
    timing_rows(dict(latent16=latent_dir, pixel16=pixel_dir), args.batch, options, args.repeats)


if __name__ == "__main__":
    main()
