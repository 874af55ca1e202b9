"""DPM-Solver++ (order 2, 20 steps): ours as one lax.scan vs diffusers' DPMSolverMultistepScheduler
loop on the same UNet with the same weights, side by side in one run.

    python bench/bench_dpm.py --config cifar10 --batches 1,16,256
    python bench/bench_dpm.py --config tiny --image_size 16 --batches 1,4 --rounds 2   # smoke run

1. Agreement: the peer's random UNet2DModel is converted to ours (ddpm_jax.convert); both solve
   from the same x_T (our documented x_T of example n) on the same timesteps (ours, passed to
   the scheduler's set_timesteps(timesteps=...)), no clipping. The final images must agree to
   --tol relative to the images' scale (max |ours - peer| / max |peer| <= 1e-4 by default: a
   random eps-network's x0 predictions reach ~100, and float32 noise through 20 steps is
   ~1e-6 of that), which validates our solver against the peer; our order-1 chain (DDIM) is
   compared the same way, to show the check could fail.
2. Speed: images/s of whole 20-step chains at each batch, ours / peer alternating for --rounds
   rounds (--repeats timed calls each, a --settle_s pause before each block), medians and the
   spread of the per-round ratio. Never run by CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.bench_unet import CONFIGS, Peer, emit, timeit  # noqa: E402
from ddpm_jax import sampling, xla_cpu  # noqa: E402
from ddpm_jax.convert import convert_state_dict, unet_kwargs_from_diffusers  # noqa: E402
from ddpm_jax.models.unet import UNet, param_shapes  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

# A smoke-test size (16x16, two levels); GroupNorm(32) needs channels divisible by 32.
BENCH_CONFIGS = dict(CONFIGS, tiny=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                        attn_resolutions=(8,)))


def initial_noise(key: jax.Array, batch: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """x_T [B, H, W, C] of examples 0..B-1 under sampling.py's documented randomness contract."""
    return np.asarray(jax.vmap(lambda n: jax.random.normal(
        jax.random.split(jax.random.fold_in(key, n))[0], image_shape))(jnp.arange(batch)))


class OursDPM:
    """Our chain: one compiled lax.scan of `steps` DPM-Solver++ steps per batch size."""

    def __init__(self, peer: Peer, image_size: int, steps: int):
        torch_params = {k: v.detach().numpy() for k, v in peer.model.state_dict().items()}
        self.model = UNet(**unet_kwargs_from_diffusers(peer.model.config))
        self.shape = (image_size, image_size, 3)
        self.params = convert_state_dict(torch_params, param_shapes(self.model, self.shape),
                                         num_levels=len(self.model.ch_mult))
        self.schedule, self.steps = Schedule.create("linear", 1000), steps

    def sampler(self, batch: int, order: int = 2) -> sampling.Sampler:
        return sampling.make_sampler(sampling.ModelApply(self.model), self.schedule, (batch, *self.shape),
                                     SamplerSpec(sampler="dpm++", steps=self.steps, order=order, clip_denoised=False))

    def sample_fn(self, batch: int) -> tuple[Callable[[], Any], float]:
        """(run, seconds of the first call: compile + one chain)."""
        sampler = self.sampler(batch)
        start = time.perf_counter()
        sampler(self.params, jax.random.key(0))["images"].block_until_ready()
        first = time.perf_counter() - start
        return lambda: sampler(self.params, jax.random.key(1))["images"].block_until_ready(), first


def peer_chain(peer: Peer, timesteps: np.ndarray, order: int = 2) -> Callable[[Any], Any]:
    """x_T (torch, NCHW) -> the final sample of diffusers' DPMSolverMultistepScheduler loop
    (dpmsolver++, `order`, lower_order_final, final sigma 0) on the given timesteps."""
    torch = peer.torch
    from diffusers import DPMSolverMultistepScheduler

    def run(x):
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                solver_order=order, algorithm_type="dpmsolver++")
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(peer.model(x, t).sample, t, x).prev_sample
        return x
    return run


def check_agreement(ours: OursDPM, peer: Peer, batch: int, tol: float) -> dict[str, Any]:
    """Ours vs the peer from the same x_T; exits if max |ours - peer| / max |peer| > tol."""
    torch = peer.torch
    peer.model.eval()
    key = jax.random.key(0)
    sampler = ours.sampler(batch)
    mine = np.asarray(sampler(ours.params, key)["images"], np.float64)
    x_T = initial_noise(key, batch, ours.shape)
    timesteps = np.asarray(sampler.plan.timesteps)[::-1]  # chain order: t_{S-1} first
    theirs = peer_chain(peer, timesteps)(torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()))
    theirs = theirs.numpy().transpose(0, 2, 3, 1).astype(np.float64)
    ddim = np.asarray(ours.sampler(batch, order=1)(ours.params, key)["images"], np.float64)
    scale = float(np.abs(theirs).max())
    record = dict(kind="agreement", batch=batch, steps=ours.steps, tol=tol, image_abs_max=scale,
                  rel_max_diff=float(np.abs(mine - theirs).max()) / scale,
                  rel_mean_diff=float(np.abs(mine - theirs).mean()) / scale,
                  order1_rel_max_diff=float(np.abs(ddim - theirs).max()) / scale)
    emit(record)
    if not record["rel_max_diff"] <= tol:
        raise SystemExit(f"ours and diffusers differ by {record['rel_max_diff']:.3g} of the "
                         f"images' scale > {tol}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(BENCH_CONFIGS), default="cifar10")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,16,256", help="comma list of batch sizes")
    parser.add_argument("--check_batch", type=int, default=4, help="batch of the agreement check")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="agreement: max |ours - peer| / max |peer|")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/peer rounds")
    parser.add_argument("--repeats", type=int, default=1, help="timed chains per round")
    parser.add_argument("--settle_s", type=float, default=1.0,
                        help="pause before each timed block so the other side's threads go idle")
    parser.add_argument("--xla_options", choices=xla_cpu.MODES, default="tuned")
    args = parser.parse_args()
    os.environ[xla_cpu.ENV_VAR] = args.xla_options
    threads = os.cpu_count() or 1
    emit(dict(kind="machine", config=args.config, devices=str(jax.devices()),
              jax=jax.__version__, cpu_count=threads, xla_options=args.xla_options))

    peer = Peer(BENCH_CONFIGS[args.config], args.image_size, threads)
    ours = OursDPM(peer, args.image_size, args.steps)
    agreement = check_agreement(ours, peer, args.check_batch, args.tol)
    torch = peer.torch

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ours_run, first_call_s = ours.sample_fn(batch)
        timesteps = np.asarray(ours.sampler(batch).plan.timesteps)[::-1]
        chain = peer_chain(peer, timesteps)
        x_T = torch.randn(batch, 3, args.image_size, args.image_size)
        peer_run = lambda: chain(x_T)  # noqa: E731
        peer_run()  # warm-up, as ours' first call
        t_ours, t_peer = [], []
        for _ in range(args.rounds):
            time.sleep(args.settle_s)
            t_ours.append(timeit(ours_run, args.repeats))
            time.sleep(args.settle_s)
            t_peer.append(timeit(peer_run, args.repeats))
        ratios = [p / o for o, p in zip(t_ours, t_peer)]
        row = dict(kind=f"dpm++_{args.steps}", batch=batch, first_call_s=round(first_call_s, 2),
                   ours_img_s=batch / statistics.median(t_ours),
                   peer_img_s=batch / statistics.median(t_peer),
                   ratio=statistics.median(t_peer) / statistics.median(t_ours),
                   round_ratios=ratios)
        emit(row)
        rows.append(row)

    print(f"\n{args.config} {args.image_size}px, DPM-Solver++(2M) {args.steps} steps, "
          f"{threads} threads, jax {jax.__version__}")
    print(f"  agreement at batch {agreement['batch']}: max |ours - diffusers| / max |diffusers| "
          f"{agreement['rel_max_diff']:.1e} (mean {agreement['rel_mean_diff']:.1e}, tol "
          f"{args.tol:g}); our order-1 chain: {agreement['order1_rel_max_diff']:.1e}")
    for row in rows:
        spread = f"rounds {min(row['round_ratios']):.2f}-{max(row['round_ratios']):.2f}"
        print(f"  batch {row['batch']:>4}: ours {row['ours_img_s']:.2f} img/s, peer "
              f"{row['peer_img_s']:.2f} img/s, ours/peer {row['ratio']:.2f}x ({spread}); "
              f"first call {row['first_call_s']:.1f} s")


if __name__ == "__main__":
    main()
