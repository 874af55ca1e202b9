"""Quality against the number of network calls, for every sampler on one checkpoint (the DDIM
paper's Table 1, on digits): digits-FID at the native 8x8 (bench/digits_yardstick.py).

    python bench/steps_table.py --workdir runs/quality/ours --steps 10,20,50,100 --seeds 0,1

With --reference_split test the reference is the 360 held-out images (which no model saw), and
rows of --num_samples real train images (one random subset per seed) are scored against it
first: the real-data row of a fair comparison. Each cell draws --num_samples images from the run's EMA weights with our compiled chain. The
samplers: ancestral (the run's variance), DDIM (eta 0), DPM-Solver++ and SDE-DPM-Solver++
(dpm++sde) (order 2, logsnr spacing unless --dpm_spacing), Heun and Euler-ancestral (EDM's
rho = 7 sigmas), and any of them with a Langevin corrector of --corrector_snr (name+pc, e.g.
ddpm+pc). The columns are model-call budgets N: a sampler that calls the model more than once
per step (Heun: 2S - 1; +pc: S + S - 1) runs the largest S within N, so rows compare at equal
calls. Prints JSON lines and a Markdown table (mean and range over the seeds, seconds per 1,000
images). Never run by CI.

    python bench/steps_table.py --workdir runs/digits --steps 20,40 --seeds 0,1,2 \
        --samplers dpm++,heun,euler_ancestral,ddpm+pc --num_samples 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.digits_yardstick import Yardstick, sample_checkpoint  # noqa: E402
from ddpm_jax.plans import DPM_SOLVERS  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402


def steps_within(name: str, calls: int, corrector_snr: float) -> tuple[dict, int, int]:
    """(sampler options, steps S, model calls) of `name` ('heun', 'ddpm+pc', ...) for the
    largest S whose model calls fit the budget `calls`."""
    sampler, pc = name.removesuffix("+pc"), name.endswith("+pc")
    options = dict(sampler=sampler)
    if pc:
        options["corrector_snr"] = corrector_snr
    spec = SamplerSpec(**options, steps=1)
    steps = max(s for s in range(1, calls + 1) if spec.model_calls(s) <= calls)
    return options, steps, spec.model_calls(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", default="10,20,50,100")
    parser.add_argument("--samplers", default="ddpm,ddim,dpm++")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--dpm_spacing", default="logsnr", choices=("time", "logsnr", "edm"))
    parser.add_argument("--corrector_snr", type=float, default=0.16)
    parser.add_argument("--out", default=None, help="JSON-lines file to append the cells to.")
    parser.add_argument("--reference_split", default="train", choices=("train", "test"),
                        help="the FID reference: the train images (default) or the 360 held-out "
                             "ones, with a row of 1,000 train images scored the same way")
    args = parser.parse_args()
    yardstick = Yardstick(reference_split=args.reference_split)
    print(yardstick.protocol(), flush=True)
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    samplers = args.samplers.split(",")
    cells: dict = {}
    if args.reference_split == "test":   # real images no model has seen as the FID reference
        from ddpm_jax.data import builders
        train = builders.digits_arrays(8)["train"][0]
        real = []
        for seed in seeds:   # one random subset per seed
            picked = train[np.random.RandomState(seed).permutation(len(train))[:args.num_samples]]
            real.append(dict(sampler=f"{len(picked)} real train images", seed=seed,
                             **yardstick.score(picked)))
            print(json.dumps(real[-1]), flush=True)
        fids = [r["fid"] for r in real]
        print(f"real train images: digits-FID {np.mean(fids):.2f} ({min(fids):.2f}-{max(fids):.2f})",
              flush=True)
    for sampler in samplers:
        for num_steps in steps:
            for seed in seeds:
                options, chain_steps, calls = steps_within(sampler, num_steps, args.corrector_snr)
                if options["sampler"] in DPM_SOLVERS:
                    options.update(spacing=args.dpm_spacing, order=2)
                images, secs = sample_checkpoint(args.workdir, seed=seed, steps=chain_steps,
                                                 num_samples=args.num_samples, **options)
                row = dict(sampler=sampler, budget=num_steps, steps=chain_steps, calls=calls,
                           seed=seed, seconds=round(secs, 1), **yardstick.score(images))
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                cells.setdefault((sampler, num_steps), []).append(row)
    print("\n| sampler | " + " | ".join(f"{s} calls" for s in steps) + " |")
    print("| --- | " + " | ".join("---" for _ in steps) + " |")
    for sampler in samplers:
        parts = []
        for num_steps in steps:
            fids = [r["fid"] for r in cells[(sampler, num_steps)]]
            secs = np.mean([r["seconds"] for r in cells[(sampler, num_steps)]])
            spread = f" ({min(fids):.2f}-{max(fids):.2f})" if len(fids) > 1 else ""
            cell = cells[(sampler, num_steps)][0]
            calls = "" if cell["calls"] == num_steps else f" ({cell['steps']} steps, {cell['calls']} calls)"
            parts.append(f"{np.mean(fids):.2f}{spread}, {secs:.0f} s{calls}")
        print(f"| {sampler} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
