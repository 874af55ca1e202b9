"""Digits quality side by side at equal wall clock: ours (configs/digits.py as shipped, trained by
train.py, i.e. the main job) against the diffusers peer, both scored by the 8x8 digits yardstick.

    python bench/quality_digits.py --out runs/quality            # budget: ours' main-job time
    python bench/quality_digits.py --out runs/quality --budget_s 600 --seeds 0,1

The peer is diffusers' UNet2DModel with the recipe of shared/REFERENCE.md ("Digits quality
peer"): block_out_channels (32, 64, 64), 2 layers per block, Down / AttnDown / Down, GroupNorm 8,
dropout 0.1 (1.62M parameters); Adam 2e-4 with 500 linear warm-up steps, clip 1.0, EMA 0.999
from the init (no warm-up), batch 64, linear betas, eps / fixedlarge / mse, on the same digits
train split at 8x8, 2 torch threads. It trains for `--budget_s` seconds of its training loop
(default: what our whole main job took, start-up, compile and grids included), counted on the
wall clock or, with `--budget_clock cpu`, in CPU seconds over all threads (ours: the train.py
process's user + system time), which stays fair when other jobs share the machine.

Each model draws 1,000 images per sampler and seed: ancestral 1000 steps (fixedlarge, x0
clipped), DDIM 50 steps (eta 0) and, for ours, DPM-Solver++ 20 steps when the package has it
(the peer's DPMSolverMultistepScheduler beside it). Reference rows at the same N: real
held-out images (the 360 test images, all there are), 1,000 real train images, and a floor
(1,000 train images blurred with a Gaussian of 0.8 px). Results go to OUT/quality.json and a
Markdown table on stdout, with the protocol. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, blurred, sample_checkpoint  # noqa: E402
from ddpm_jax import writers  # noqa: E402
from ddpm_jax.spec import SAMPLERS  # noqa: E402
from ddpm_jax.data import builders  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
T = 1000


# --------------------------------------------------------------------------------- ours

def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_ours(out: str, extra: list[str]) -> tuple[str, float, float]:
    """Runs the main job; returns (workdir, wall seconds, CPU seconds of the train.py process)."""
    workdir = os.path.join(out, "ours")
    if os.path.exists(workdir):
        raise SystemExit(f"{workdir} exists: pass a fresh --out (this bench times a fresh run).")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs/digits.py"), "--workdir", workdir, "--progress_bar=false",
           *extra]
    start, cpu = time.perf_counter(), child_cpu_s()
    subprocess.run(cmd, check=True)
    return workdir, time.perf_counter() - start, child_cpu_s() - cpu


def ours_samplers() -> dict[str, dict]:
    samplers = {"ancestral-1000": dict(sampler="ddpm", steps=None),
                "DDIM-50": dict(sampler="ddim", steps=50)}
    if "dpm++" in SAMPLERS:
        samplers["DPM++-20"] = dict(sampler="dpm++", steps=20, order=2, spacing="logsnr")
    return samplers


# --------------------------------------------------------------------------------- peer

class Peer:
    """The diffusers peer: training at a wall-clock budget and its schedulers' sampling."""

    def __init__(self, threads: int, seed: int = 0):
        import torch
        from diffusers import UNet2DModel
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.model = UNet2DModel(
                sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                dropout=0.1)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def train(self, images: np.ndarray, budget_s: float, *, clock: str = "wall",
              max_steps: int | None = None, batch: int = 64,
              lr: float = 2e-4, warmup: int = 500, ema_decay: float = 0.999,
              ema_warmup: bool = False, seed: int = 0) -> dict:
        """Trains until `budget_s` seconds of `clock` ("wall", or "cpu": this process's CPU
        time over all its threads) have passed. ema_warmup: update n uses min(ema_decay,
        (1 + n) / (10 + n)), the ramp of diffusers' EMAModel default (the issue's peer: off,
        an EMA from the init)."""
        torch = self.torch
        data = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0).float()
        opt = torch.optim.Adam(self.model.parameters(), lr=lr, eps=1e-8)
        gen = torch.Generator().manual_seed(seed)
        self.model.train()
        step, order, pos, losses = 0, torch.randperm(len(data), generator=gen), 0, []
        now = time.process_time if clock == "cpu" else time.perf_counter
        start, wall, cpu = now(), time.perf_counter(), time.process_time()
        while now() - start < budget_s and (max_steps is None or step < max_steps):
            if pos + batch > len(data):
                order, pos = torch.randperm(len(data), generator=gen), 0
            x0 = data[order[pos:pos + batch]]
            pos += batch
            t = torch.randint(0, T, (batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = abar[t].view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(
                    self.model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, step / warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
            decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    if value.dtype.is_floating_point:
                        self.ema[name].mul_(decay).add_(value, alpha=1 - decay)
            step += 1
            losses.append(loss.item())
        return dict(steps=step, wall_s=round(time.perf_counter() - wall, 1),
                    cpu_s=round(time.process_time() - cpu, 1),
                    final_loss=round(float(np.mean(losses[-50:])), 4))

    def sample(self, kind: str, num: int, seed: int, batch: int = 500,
               steps: int | None = None) -> tuple[np.ndarray, float]:
        """uint8 [num, 8, 8, 1] from the EMA weights with the named diffusers scheduler; steps:
        that scheduler's number of steps instead of the kind's (1000, 50 or 20)."""
        torch = self.torch
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
        common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                      beta_schedule="linear")
        model = type(self.model).from_config(self.model.config)
        model.load_state_dict(self.ema)
        model.eval()
        out, start = [], time.perf_counter()
        for b in range(math.ceil(num / batch)):
            n = min(batch, num - b * batch)
            if kind == "ancestral-1000":
                sched, kind_steps = DDPMScheduler(**common, variance_type="fixed_large",
                                                  clip_sample=True), T
            elif kind == "DDIM-50":
                sched, kind_steps = DDIMScheduler(**common, clip_sample=True), 50
            else:
                sched, kind_steps = DPMSolverMultistepScheduler(
                        **common, algorithm_type="dpmsolver++", solver_order=2), 20
            sched.set_timesteps(kind_steps if steps is None else steps)
            gen = torch.Generator().manual_seed(seed * 1000 + b)
            x = torch.randn((n, 1, 8, 8), generator=gen)
            with torch.no_grad():
                for t in sched.timesteps:
                    eps = model(x, t).sample
                    x = (sched.step(eps, t, x, generator=gen).prev_sample if kind == "ancestral-1000"
                         else sched.step(eps, t, x).prev_sample)
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(pixels.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out), time.perf_counter() - start


# --------------------------------------------------------------------------------- main

def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="A fresh folder for the runs and quality.json.")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="Peer training seconds (default: our main job's, on --budget_clock).")
    parser.add_argument("--budget_clock", choices=("wall", "cpu"), default="wall",
                        help="wall: seconds on the clock; cpu: CPU seconds over all threads "
                             "(equal work on a machine shared with other jobs).")
    parser.add_argument("--seeds", default="0,1", help="Sampling seeds, comma-separated.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the peer.")
    parser.add_argument("--peer_steps", type=int, default=None,
                        help="Train the peer for exactly this many steps instead of a time budget "
                             "(equal work at equal batch when the machine is too loaded to time).")
    parser.add_argument("--ours_workdir", default=None,
                        help="Reuse this finished main-job run instead of training ours anew.")
    parser.add_argument("--peer_ema_warmup", action="store_true",
                        help="Give the peer the EMA ramp of diffusers' EMAModel default.")
    parser.add_argument("--skip_ancestral", action="store_true", help="Only the fast samplers.")
    parser.add_argument("--samplers", default=None,
                        help="Comma-separated subset of the sampler rows to draw (e.g. "
                             "ancestral-1000), to finish an interrupted run with --ours_workdir.")
    parser.add_argument("--skip_reference", action="store_true",
                        help="Leave out the real / floor rows (a rerun that already has them).")
    parser.add_argument("--ours_overrides", default="",
                        help="Space-separated train.py overrides for ours (default: as shipped).")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    yardstick = Yardstick()
    result: dict = dict(protocol=yardstick.protocol(), seeds=seeds, num_samples=args.num_samples,
                        rows=[])
    previous = os.path.join(args.out, "quality.json")
    if os.path.exists(previous):  # a rerun finishing an interrupted run: keep its rows
        with open(previous) as f:
            kept = json.load(f)
        if kept.get("protocol") != result["protocol"]:
            raise SystemExit(f"{previous} was made under another protocol; use a fresh --out.")
        result["rows"] = kept["rows"]
    print(result["protocol"], flush=True)

    def add(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "quality.json"), "w") as f:
            json.dump(result, f, indent=2)

    if args.ours_workdir:
        workdir, ours_wall, ours_cpu = args.ours_workdir, float("nan"), float("nan")
    else:
        workdir, ours_wall, ours_cpu = train_ours(args.out, args.ours_overrides.split())
    budget = args.budget_s or (ours_cpu if args.budget_clock == "cpu" else ours_wall)
    if args.peer_steps:
        budget = float("inf")
    last = writers.read_metrics(workdir)[-1]
    result["ours_train"] = dict(wall_s=round(ours_wall, 1), cpu_s=round(ours_cpu, 1),
                                steps=last["step"],
                                final_loss=round(last["loss"], 4))
    peer = Peer(args.threads)
    train = builders.digits_arrays(8)
    peer_path = os.path.join(args.out, "peer_ema.pt")
    if os.path.exists(peer_path):   # a finished peer of an earlier, interrupted run of this bench
        saved = peer.torch.load(peer_path)
        peer.ema, result["peer_train"] = saved["ema"], saved["info"]
    else:
        result["peer_train"] = dict(peer.train(train["train"][0], budget, clock=args.budget_clock,
                                               max_steps=args.peer_steps,
                                               ema_warmup=args.peer_ema_warmup),
                                    params=peer.num_params, budget_s=round(budget, 1),
                                    budget_clock=args.budget_clock,
                                    ema_warmup=args.peer_ema_warmup)
        peer.torch.save(dict(ema=peer.ema, info=result["peer_train"]), peer_path)
    print(json.dumps({k: result[k] for k in ("ours_train", "peer_train")}), flush=True)

    # The reference rows first (seconds), then the fast samplers, the 1000-step ones last.
    rng = np.random.RandomState(0)
    real_train = train["train"][0][rng.permutation(len(train["train"][0]))[:args.num_samples]]
    if not args.skip_reference:
        add(dict(who="real", sampler="held-out test images", **yardstick.score(train["test"][0])))
        add(dict(who="real", sampler=f"{len(real_train)} train images",
                 **yardstick.score(real_train)))
        add(dict(who="floor", sampler="train images, Gaussian blur 0.8 px",
                 **yardstick.score(blurred(real_train))))

    kinds = [k for k in ours_samplers() if k != "ancestral-1000"]
    kinds += [] if args.skip_ancestral else ["ancestral-1000"]
    if args.samplers:
        unknown = set(args.samplers.split(",")) - set(ours_samplers())
        if unknown:
            raise SystemExit(f"--samplers: unknown {sorted(unknown)}; choose from "
                             f"{sorted(ours_samplers())}.")
        kinds = [k for k in ours_samplers() if k in args.samplers.split(",")]
    for kind in kinds:
        for who in ("ours", "peer"):
            for seed in seeds:
                if who == "ours":
                    images, secs = sample_checkpoint(workdir, seed=seed, num_samples=args.num_samples,
                                                     **ours_samplers()[kind])
                else:
                    images, secs = peer.sample(kind, args.num_samples, seed)
                add(dict(who=who, sampler=kind, seed=seed, seconds=round(secs, 1),
                         **yardstick.score(images)))

    print(f"\n{result['protocol']}")
    print(f"ours: {result['ours_train']}; peer: {result['peer_train']}\n")
    print("| model | sampler | digits-FID (mean, range over seeds) | digits-IS | confidence | "
          "class counts min-max | sampling s (1,000 images) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    groups: dict = {}
    for row in result["rows"]:
        groups.setdefault((row["who"], row["sampler"]), []).append(row)
    for (who, kind), rows in groups.items():
        print(f"| {who} | {kind} | {spread([r['fid'] for r in rows])} | "
              f"{np.mean([r['inception_score'] for r in rows]):.2f} | "
              f"{np.mean([r['confidence'] for r in rows]):.3f} | "
              f"{min(r['class_min'] for r in rows)}-{max(r['class_max'] for r in rows)} | "
              f"{spread([r['seconds'] for r in rows]) if 'seconds' in rows[0] else '-'} |")
    ours = {k: [r["fid"] for r in v] for (w, k), v in groups.items() if w == "ours"}
    peers = {k: [r["fid"] for r in v] for (w, k), v in groups.items() if w == "peer"}
    for kind in ours:
        if kind in peers:
            print(f"{kind}: ours / peer digits-FID = {np.mean(ours[kind]) / np.mean(peers[kind]):.3f}")


if __name__ == "__main__":
    main()
