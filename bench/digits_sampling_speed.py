"""Digits sampling speed, ours against the diffusers peer: the same chain of network calls on
the same 1.62M-parameter UNet at 8x8, 1,000 images in batches of 500, on this CPU.

    python bench/digits_sampling_speed.py --workdir runs/digits                 # ancestral 1000
    python bench/digits_sampling_speed.py --workdir runs/digits --steps 100 --rounds 3
    python bench/digits_sampling_speed.py --workdir runs/digits --score         # + digits-FIDs

Ours: the run's EMA weights through the compiled one-scan chain (`sampling.make_sampler`,
ancestral with the run's variance, x0 clipped), first call included (the scan body compiles in
a few seconds). The peer: diffusers' UNet2DModel of the issue's recipe (bench/quality_digits.py,
`Peer`) with DDPMScheduler (fixed_large, clip_sample), 2 torch threads, its own initial weights
(its speed does not depend on them; pass --score only for ours). With --steps below 1000 both
run the same respaced ancestral chain (ours: `steps=N`; the peer: `set_timesteps(N)`), which
gives the per-call cost in a fraction of the time. Rounds alternate ours and the peer so that a
shared machine's load falls on both. Prints one JSON line per chain and the ratio of the
medians (peer seconds / ours seconds: > 1 means ours is faster). Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, sample_checkpoint  # noqa: E402
from bench.quality_digits import Peer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a digits run of train.py (ours)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the peer")
    parser.add_argument("--score", action="store_true",
                        help="digits-FID of ours' samples against the train split and, as "
                             "fid_test, against the 360 held-out test images")
    args = parser.parse_args()
    peer = Peer(args.threads)
    yardstick = Yardstick() if args.score else None
    held_out = Yardstick(reference_split="test") if args.score else None
    seconds: dict[str, list[float]] = {"ours": [], "peer": []}
    for round_ in range(args.rounds):
        images, secs = sample_checkpoint(args.workdir, sampler="ddpm", steps=args.steps,
                                         num_samples=args.num, seed=round_, batch_size=args.batch)
        row = dict(model="ours", round=round_, steps=args.steps, num=args.num, seconds=round(secs, 1))
        if yardstick is not None:
            row.update(yardstick.score(images))
            row["fid_test"] = held_out.score(images)["fid"]
        print(json.dumps(row), flush=True)
        seconds["ours"].append(secs)
        _, secs = peer.sample("ancestral-1000", args.num, seed=round_, batch=args.batch,
                              steps=args.steps)
        print(json.dumps(dict(model="peer", round=round_, steps=args.steps, num=args.num,
                              seconds=round(secs, 1))), flush=True)
        seconds["peer"].append(secs)
    ours, theirs = statistics.median(seconds["ours"]), statistics.median(seconds["peer"])
    print(json.dumps(dict(summary=True, steps=args.steps, num=args.num,
                          ours_s=[round(s, 1) for s in seconds["ours"]],
                          peer_s=[round(s, 1) for s in seconds["peer"]],
                          peer_over_ours=round(theirs / ours, 3))), flush=True)


if __name__ == "__main__":
    main()
