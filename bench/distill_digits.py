"""Progressive distillation of the default digits run: the wall time of each round, the
students' digits-FID at their own 4/2/1-step chains (and 8 after round 3), next to the teacher's
DDIM, DPM-Solver++ and SDE-DPM-Solver++ at the same steps and its best (SDE-DPM-Solver++ 20),
and the wall time of 1,000 samples of each.

    python bench/distill_digits.py --teacher runs/digits --workdir runs/digits-distill
    python bench/distill_digits.py --teacher runs/digits --workdir runs/digits-distill \
        --rounds 6 --seeds 3                        # down to 1 step, three sample seeds
    python bench/distill_digits.py --teacher runs/digits --workdir runs/digits-distill --no-train
    python bench/distill_digits.py --teacher runs/digits --workdir runs/digits-distill --no-train \
        --rounds 0 --no-teacher_rows --chain_steps 64,128,256 --seeds 3   # the distilled chain

Training runs the chain exactly as `train.py --config configs/digits.py:distill
--config.distill.teacher=TEACHER --workdir WORKDIR` does (`loop.distillation_rounds`, each round
an ordinary run in WORKDIR/round_k), in this process, timing each round; a round that was
already finished only loads (its time is then reported as null). The teacher's training time
comes from its metrics.jsonl (steps / steps_per_sec of each logged interval).

Scores: digits-FID (bench/digits_yardstick.py) of 1,000 samples against the 1,437 train images
(`fid`) and the 360 held-out test images (`fid_test`), per seed, from the students' EMA
weights (`--student_weights raw`: the raw ones; every round teaches from its EMA weights);
`seconds` is the second of two identical draws of 1,000 samples (compiled), batch 500. Prints
one JSON line per row.
Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, sample_checkpoint  # noqa: E402


def teacher_training_seconds(workdir: str) -> float | None:
    """Seconds the run's logged intervals took: sum of (steps in interval / steps_per_sec)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    total, previous = 0.0, 0
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "steps_per_sec" in record and record["steps_per_sec"] > 0:
                total += (record["step"] - previous) / record["steps_per_sec"]
                previous = record["step"]
    return total


def train_rounds(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Runs (or resumes) the chain; returns (round work dir, student steps) per round (none
    for --rounds 0: only the teacher's rows)."""
    if args.rounds == 0:
        return []
    from configs import digits
    from ddpm_jax import loop
    from ddpm_jax import config as config_lib

    config = digits.get_config("distill")
    config.distill.teacher = args.teacher
    config.distill.rounds = args.rounds
    config.distill.teacher_steps = args.teacher_steps
    config.training.num_steps = args.steps_per_round
    config.distill.first_round_steps = args.first_round_steps
    if args.batch_size is not None:
        config.training.batch_size = args.batch_size
    config_lib.validate(config)
    out = []
    for workdir, round_config in loop.distillation_rounds(config, args.workdir):
        steps = round_config.distill.teacher_steps // 2
        done = os.path.isdir(os.path.join(workdir, "checkpoints"))
        if args.train:
            start = time.perf_counter()
            loop.train_and_evaluate(round_config, workdir)
            seconds = None if done else round(time.perf_counter() - start, 1)
            print(json.dumps(dict(row="round", workdir=workdir, teacher_steps=steps * 2,
                                  student_steps=steps,
                                  train_steps=round_config.training.num_steps,
                                  seconds=seconds, date=time.strftime("%Y-%m-%d"))), flush=True)
        out.append((workdir, steps))
    return out


def score(workdir: str, label: str, seeds: int, train_ref: Yardstick, test_ref: Yardstick,
          **options) -> None:
    for seed in range(seeds):
        images, _ = sample_checkpoint(workdir, num_samples=1000, seed=seed, **options)
        if seed == 0:  # compiled now: time a second identical draw
            _, seconds = sample_checkpoint(workdir, num_samples=1000, seed=seed, **options)
        row = dict(row="samples", model=label, seed=seed, **options,
                   fid=train_ref.score(images)["fid"], fid_test=test_ref.score(images)["fid"])
        if seed == 0:
            row["seconds_1000"] = round(seconds, 2)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="the default digits run (train.py)")
    parser.add_argument("--workdir", required=True, help="the chain's work dir (round_k inside)")
    parser.add_argument("--teacher_steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps_per_round", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training.batch_size of every round (default: the config's, 64)")
    parser.add_argument("--first_round_steps", type=int, default=None,
                        help="round 1's steps (config.distill.first_round_steps)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--student_weights", choices=("ema", "raw"), default="ema",
                        help="the students' weights scored (the teacher's are its EMA ones)")
    parser.add_argument("--teacher_rows", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--chain_steps", default="", help="also score the teacher's DDIM chain "
                        "(trailing) at these step counts, e.g. 64,128,256: the chain the "
                        "students learn, and so the level a faithful student approaches")
    args = parser.parse_args()
    print(json.dumps(dict(row="teacher_training", workdir=args.teacher,
                          seconds=teacher_training_seconds(args.teacher))), flush=True)
    rounds = train_rounds(args)
    train_ref, test_ref = Yardstick(), Yardstick(reference_split="test")
    for workdir, steps in rounds:
        if steps <= 8:
            score(workdir, f"student_{steps}", args.seeds, train_ref, test_ref, sampler="ddim",
                  steps=steps, spacing="trailing", weights=args.student_weights)
    for steps in (int(v) for v in args.chain_steps.split(",") if v):
        score(args.teacher, "teacher_chain", args.seeds, train_ref, test_ref, sampler="ddim",
              steps=steps, spacing="trailing")
    if not args.teacher_rows:
        return
    for steps in (1, 2, 4, 8):
        for options in (dict(sampler="ddim", spacing="trailing"),
                        dict(sampler="dpm++", spacing="logsnr", order=min(2, steps)),
                        dict(sampler="dpm++sde", spacing="logsnr", order=min(2, steps))):
            score(args.teacher, "teacher", args.seeds, train_ref, test_ref, steps=steps, **options)
    score(args.teacher, "teacher_best", args.seeds, train_ref, test_ref, sampler="dpm++sde",
          steps=20, spacing="logsnr", order=2)


if __name__ == "__main__":
    main()
