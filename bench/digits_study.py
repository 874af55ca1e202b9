"""What buys digits quality per CPU minute: train variants of the digits config with train.py,
then score each run's EMA weights with the 8x8 digits yardstick (bench/digits_yardstick.py).

    python bench/digits_study.py --out runs/study                       # every variant
    python bench/digits_study.py --out runs/study --only lr5e-4,lr1e-3 --num_steps 1500

Each variant is a list of command-line overrides of configs/digits.py (the shipped default);
`--num_steps` (if given) overrides every variant's training length, so a screen at a shorter
length compares settings at equal steps. Results (train wall time, seconds per step, digits-FID
of DDIM-50 and, with --ancestral_samples, of the 1000-step ancestral sampler) are appended to
OUT/study.jsonl, one line per variant, and printed as a table. Runs that already have a line are
not retrained (delete the line to redo one). Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, sample_checkpoint  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")

NATIVE = ["--config.data.image_size=8", "--config.model.num_res_blocks=2",
          "--config.model.attn_resolutions=(4,)", "--config.model.num_groups=8",
          "--config.training.batch_size=64"]
PEER_RECIPE = ["--config.training.lr=2e-4", "--config.training.warmup_steps=500",
               "--config.training.ema_decay=0.999", "--config.training.ema_warmup=False",
               "--config.model.dropout=0.1"]
OURS = ["--config.training.lr=5e-4", "--config.training.warmup_steps=100",
        "--config.training.ema_decay=0.999", "--config.training.ema_warmup=True"]

# name -> overrides of configs/digits.py. "default" is the config as shipped.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "old16": ["--config.data.image_size=16", "--config.model.num_res_blocks=1",
              "--config.model.attn_resolutions=(8,)", "--config.model.num_groups=32",
              "--config.training.batch_size=32", "--config.training.lr=5e-4",
              "--config.training.warmup_steps=100", "--config.training.ema_decay=0.995",
              "--config.training.ema_warmup=False", "--config.training.num_steps=2000"],
    "peer-recipe": NATIVE + PEER_RECIPE,
    "peer-recipe+emawarm": NATIVE + PEER_RECIPE + ["--config.training.ema_warmup=True"],
    "lr5e-4": NATIVE + OURS,
    "lr1e-3": NATIVE + OURS + ["--config.training.lr=1e-3"],
    "lr5e-4-drop0": NATIVE + OURS + ["--config.model.dropout=0.0"],
    "lr5e-4-ema9995": NATIVE + OURS + ["--config.training.ema_decay=0.9995"],
    "lr5e-4-b128": NATIVE + OURS + ["--config.training.batch_size=128"],
    "lr5e-4-ch48": NATIVE + OURS + ["--config.model.ch=48"],
}


def train(name: str, overrides: list[str], out: str, num_steps: int | None) -> dict:
    workdir = os.path.join(out, name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs/digits.py"), "--workdir", workdir,
           "--progress_bar=false", *overrides]
    if num_steps is not None:
        cmd.append(f"--config.training.num_steps={num_steps}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["steps_per_sec"] for r in rows[1:] if "steps_per_sec" in r]
    rates.sort()
    return dict(workdir=workdir, train_wall_s=round(wall, 1), steps=rows[-1]["step"],
                final_loss=round(rows[-1]["loss"], 4),
                s_per_step_median=round(1.0 / rates[len(rates) // 2], 4) if rates else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for the runs and study.jsonl.")
    parser.add_argument("--only", default=None, help=f"Comma-separated subset of {list(VARIANTS)}.")
    parser.add_argument("--num_steps", type=int, default=None, help="Train length for every variant.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--ancestral_samples", type=int, default=0,
                        help="Also score this many ancestral-1000 samples (0: skip).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "study.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {row["name"]: row for row in map(json.loads, f)}
    yardstick = Yardstick()
    print(yardstick.protocol(), flush=True)
    for name in names:
        if name in done:
            continue
        row = dict(name=name, overrides=VARIANTS[name], num_steps=args.num_steps)
        row.update(train(name, VARIANTS[name], args.out, args.num_steps))
        images, secs = sample_checkpoint(row["workdir"], sampler="ddim", steps=50,
                                         num_samples=args.num_samples, seed=args.seed)
        row["ddim50"] = dict(yardstick.score(images), seconds=round(secs, 1))
        if args.ancestral_samples:
            images, secs = sample_checkpoint(row["workdir"], sampler="ddpm", steps=None,
                                             num_samples=args.ancestral_samples, seed=args.seed)
            row["ancestral1000"] = dict(yardstick.score(images), seconds=round(secs, 1))
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[name] = row
    print("\n| variant | steps | train wall s | s/step | DDIM-50 digits-FID | ancestral-1000 digits-FID |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        r = done[name]
        anc = r.get("ancestral1000", {}).get("fid")
        print(f"| {name} | {r['steps']} | {r['train_wall_s']} | {r['s_per_step_median']} | "
              f"{r['ddim50']['fid']:.3f} | {'-' if anc is None else f'{anc:.3f}'} |")


if __name__ == "__main__":
    main()
