"""What buys digits quality per CPU minute: train variants of the digits config with train.py,
then score each run's EMA weights with the 8x8 digits yardstick (bench/digits_yardstick.py).

    python bench/digits_study.py --out runs/study                       # every variant
    python bench/digits_study.py --out runs/study --only lr5e-4,lr1e-3 --num_steps 1500

Each variant is a list of command-line overrides of configs/digits.py (the shipped default);
`--num_steps` (if given) overrides every variant's training length, so a screen at a shorter
length compares settings at equal steps. Results (train wall time, seconds per step, digits-FID
of each of --samplers for each of --seeds against each of --reference_splits) are appended to
OUT/study.jsonl, one line per variant, and printed as a table. Runs that already have a line are
not retrained (delete the line to redo one). Never run by CI.

    python bench/digits_study.py --out runs/study8 --only default,cosine,minsnr5 \
        --samplers ddim50,dpm++sde20 --seeds 0,1,2 --reference_splits train,test
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
from ddpm_jax import writers  # noqa: E402

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
    # On top of the shipped default config (measured when it trained 2,500 steps).
    "cosine": ["--config.training.lr_decay=cosine"],
    "linear": ["--config.training.lr_decay=linear"],
    "minsnr5": ["--config.training.loss_weight=min_snr"],
    "cosine+minsnr5": ["--config.training.lr_decay=cosine", "--config.training.loss_weight=min_snr"],
    "cosine-lr1e-3": ["--config.training.lr_decay=cosine", "--config.training.lr=1e-3"],
    "cosine-ema998": ["--config.training.lr_decay=cosine", "--config.training.ema_decay=0.998"],
    "default-3000": ["--config.training.num_steps=3000", "--config.training.sample_every=1500"],
    "minsnr5-3000": ["--config.training.loss_weight=min_snr", "--config.training.num_steps=3000",
                     "--config.training.sample_every=1500"],
}
# name -> make_sampler options of the scored samplers (--samplers).
SAMPLERS: dict[str, dict] = {
    "ddim50": dict(sampler="ddim", steps=50),
    "dpm++sde20": dict(sampler="dpm++sde", steps=20, spacing="logsnr", order=2),
    "dpm++20": dict(sampler="dpm++", steps=20, spacing="logsnr", order=2),
    "ancestral1000": dict(sampler="ddpm", steps=None),
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
    rows = writers.read_metrics(workdir)
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
    parser.add_argument("--samplers", default="ddim50",
                        help=f"Comma-separated samplers to score, of {list(SAMPLERS)}.")
    parser.add_argument("--seeds", default="0", help="Comma-separated sampling seeds.")
    parser.add_argument("--reference_splits", default="train",
                        help="Comma-separated FID references: train (the 1,437 train images) "
                             "and / or test (the 360 held-out ones).")
    parser.add_argument("--reuse", default="",
                        help="Comma-separated NAME=WORKDIR: score an existing run of the variant "
                             "(same overrides and steps) instead of training it again.")
    args = parser.parse_args()
    reuse = dict(item.split("=", 1) for item in args.reuse.split(",") if item)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    samplers = args.samplers.split(",")
    if any(s not in SAMPLERS for s in samplers):
        parser.error(f"--samplers {args.samplers!r}: choose from {list(SAMPLERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = args.reference_splits.split(",")
    if any(s not in ("train", "test") for s in splits):
        parser.error(f"--reference_splits {args.reference_splits!r}: use train and / or test")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "study.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {row["name"]: row for row in map(json.loads, f)}
    yardsticks = {split: Yardstick(reference_split=split) for split in splits}
    for yardstick in yardsticks.values():
        print(yardstick.protocol(), flush=True)
    for name in names:
        if name in done:
            continue
        row = dict(name=name, overrides=VARIANTS[name], num_steps=args.num_steps)
        if name in reuse:
            row.update(workdir=reuse[name], train_wall_s=None, s_per_step_median=None,
                       steps=writers.read_metrics(reuse[name])[-1]["step"])
        else:
            row.update(train(name, VARIANTS[name], args.out, args.num_steps))
        row["scores"] = []
        for sampler in samplers:
            for seed in seeds:
                images, secs = sample_checkpoint(row["workdir"], num_samples=args.num_samples,
                                                 seed=seed, **SAMPLERS[sampler])
                for split, yardstick in yardsticks.items():
                    row["scores"].append(dict(sampler=sampler, seed=seed, reference=split,
                                              seconds=round(secs, 1), **yardstick.score(images)))
                    print(json.dumps(row["scores"][-1]), flush=True)
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[name] = row
    print_table([done[name] for name in names])


def _cells(row: dict) -> dict[tuple[str, str], list[float]]:
    """(sampler, reference) -> digits-FIDs over the seeds; older rows held one DDIM-50 seed."""
    if "scores" not in row:
        cells = {("ddim50", "train"): [row["ddim50"]["fid"]]}
        if "ancestral1000" in row:
            cells[("ancestral1000", "train")] = [row["ancestral1000"]["fid"]]
        return cells
    cells: dict[tuple[str, str], list[float]] = {}
    for score in row["scores"]:
        cells.setdefault((score["sampler"], score["reference"]), []).append(score["fid"])
    return cells


def print_table(rows: list[dict]) -> None:
    """Markdown: one row per variant, one column per (sampler, reference): mean (min-max)."""
    columns = sorted({key for row in rows for key in _cells(row)})
    print("\n| variant | steps | train wall s | s/step | "
          + " | ".join(f"{s} vs {r}" for s, r in columns) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        cells = _cells(row)
        parts = []
        for key in columns:
            fids = cells.get(key)
            if not fids:
                parts.append("-")
            elif len(fids) == 1:
                parts.append(f"{fids[0]:.2f}")
            else:
                parts.append(f"{sum(fids) / len(fids):.2f} ({min(fids):.2f}-{max(fids):.2f})")
        print(f"| {row['name']} | {row['steps']} | {row['train_wall_s']} | "
              f"{row['s_per_step_median']} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
