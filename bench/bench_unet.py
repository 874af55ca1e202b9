"""Speed of ddpm-jax against the diffusers peer, side by side in one run, and against the FLOP
limit of this machine measured in the same run.

    python bench/bench_unet.py --config small --batch_forward 8 --batch_train 32
    python bench/bench_unet.py --config cifar10 --sample_steps 20

Measures (fp32 unless --dtype bfloat16 for ours):
  * the practical peak: a large matmul (jax) and a 3x3 conv at UNet shapes (XLA and oneDNN);
  * forward images/s (train=False) and train-step images/s (Adam + clip + EMA for ours, Adam +
    clip for the peer), alternating ours / peer for --rounds rounds, medians reported;
  * compile time of ours, separately;
  * the train step is timed as the training loop runs it: --train_steps_per_call steps queued
    back to back, then one wait (loop.py keeps the next step queued while it reads the last
    one's metrics); the peer runs the same number of steps per call; --microbatches M runs each
    step's batch in M slices (gradient accumulation) in both;
  * sampling: ours as one lax.scan over --sample_steps ancestral steps vs the peer's
    DDPMScheduler Python loop; per-step cost is extrapolated to 1000 steps (stated in the
    output) unless --sample_steps 1000; and a whole --ddim_steps DDIM chain (eta 0, no
    extrapolation) vs the peer's DDIMScheduler;
  * the peer's FLOP/s too: its images/s times our XLA FLOPs per image (the same network);
  * XLA cost-analysis FLOPs per image, achieved FLOP/s, and XLA's temp memory (the program's
    peak working memory beyond its arguments and outputs) of every program of ours.
Prints one JSON line per measurement and a table at the end. Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ddpm_jax import reverse  # noqa: E402
from ddpm_jax import sampling  # noqa: E402
from ddpm_jax import training  # noqa: E402
from ddpm_jax import xla_cpu  # noqa: E402
from ddpm_jax.models.unet import UNet, count_params  # noqa: E402
from ddpm_jax.schedule import Schedule  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

CONFIGS = {
    # The paper's CIFAR-10 model (35.7M parameters).
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
    # Block channels 32/64/64/64, one res block per level, attention at 16x16.
    "small": dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,)),
}


def timeit(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls of fn (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def memory_mib(compiled: Any) -> dict[str, float]:
    """XLA's memory analysis of a compiled program, MiB: arguments, outputs and temporaries (the
    working memory beyond both); nan where the backend does not report it."""
    mem = compiled.memory_analysis()
    fields = dict(arguments_mib="argument_size_in_bytes", outputs_mib="output_size_in_bytes",
                  temp_mib="temp_size_in_bytes")
    return {k: getattr(mem, v, float("nan")) / 2**20 if mem is not None else float("nan")
            for k, v in fields.items()}


def forward_jit(model: Any) -> Any:
    """The forward pass (train=False) as this package's inference programs compile it."""
    return jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                   compiler_options=xla_cpu.compiler_options("inference"))


def train_step_jit(model: Any, schedule: Schedule, optimizer: Any, microbatches: int = 1) -> Any:
    """The train step (Adam, clip, EMA; the state donated; the batch in `microbatches` slices)
    under the train preset."""
    settings = training.StepConfig(model=model, optimizer=optimizer, base_lr=2e-4,
                                   warmup_steps=5000, ema_decay=0.9999, microbatches=microbatches)
    return jax.jit(lambda s, b: training.train_step(s, b, schedule, settings), donate_argnums=0,
        compiler_options=xla_cpu.compiler_options("train"))


def lower_sampler(sampler: sampling.Sampler, params: Any) -> Any:
    """The executable `sampler(params, key)` runs, lowered (for XLA's cost and memory analysis)."""
    return reverse.chain_jit(True).lower(sampler.apply_fn, params, sampler.plan,
                                         jax.random.key(0), jnp.int32(0), None,
                                         jnp.float32(sampler.guidance), None, None, None,
                                         jnp.float32(0.0), static=sampler.static)


# ----------------------------------------------------------------------------- FLOP limit

def measure_peak(repeats: int, dtype: Any = jnp.float32) -> dict[str, float]:
    """GFLOP/s of a 2048^2 matmul and a 3x3 conv at UNet shapes in `dtype` (the dtype ours runs
    in: the limit of bfloat16 programs is bfloat16's), XLA and, in float32, oneDNN."""
    out = {}
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    sec = timeit(lambda: matmul(a).block_until_ready(), repeats)
    out["matmul_gflops"] = 2 * n**3 / sec / 1e9

    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 128), dtype)
    w = jax.random.normal(jax.random.key(2), (3, 3, 128, 128), dtype)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv_flops = 2 * 8 * 32 * 32 * 128 * 128 * 9
    # XLA's default CPU convolution (YNNPACK in jaxlib 0.10) and the one ddpm_jax's presets pick.
    for name, options in (("xla_conv_gflops", None),
                          ("xla_conv_preset_gflops", xla_cpu.compiler_options("inference"))):
        if name != "xla_conv_gflops" and options is None:
            continue
        fn = jax.jit(conv, compiler_options=options)
        fn(x, w).block_until_ready()
        sec = timeit(lambda: fn(x, w).block_until_ready(), repeats)
        out[name] = conv_flops / sec / 1e9
    if dtype != jnp.float32:
        return out
    try:
        import torch
        xt = torch.randn(8, 128, 32, 32)
        wt = torch.randn(128, 128, 3, 3)
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, padding=1)
            sec = timeit(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), repeats)
        out["onednn_conv_gflops"] = conv_flops / sec / 1e9
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------- ours

class Ours:
    def __init__(self, kwargs: dict[str, Any], image_size: int, dtype: Any):
        self.model = UNet(**kwargs, dropout=0.1, dtype=dtype)
        self.shape = (image_size, image_size, 3)
        self.schedule = Schedule.create("linear", 1000)
        self.optimizer = training.make_optimizer(grad_clip=1.0)
        self.state = jax.jit(lambda key: training.create_train_state(
            self.model, self.optimizer, key, self.shape))(jax.random.PRNGKey(0))
        self.num_params = count_params(self.state.params)

    def forward_fn(self, batch: int):
        x = jax.random.normal(jax.random.key(3), (batch, *self.shape))
        t = jnp.arange(batch, dtype=jnp.int32) * 7 % 1000
        start = time.perf_counter()
        compiled = forward_jit(self.model).lower(self.state.params, x, t).compile()
        compile_s = time.perf_counter() - start
        flops = compiled.cost_analysis()
        flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
        run = lambda: compiled(self.state.params, x, t).block_until_ready()  # noqa: E731
        run()
        return run, compile_s, flops / batch, memory_mib(compiled)["temp_mib"]

    def train_fn(self, batch: int, steps_per_call: int = 1, microbatches: int = 1):
        step = train_step_jit(self.model, self.schedule, self.optimizer, microbatches)
        images = jax.random.uniform(jax.random.key(4), (batch, *self.shape), minval=-1, maxval=1)
        b = {"image": images, "label": jnp.zeros((batch,), jnp.int32)}
        start = time.perf_counter()
        compiled = step.lower(self.state, b).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # The step donates its input; keep self.state (its params serve the sampler) intact.
        holder = {"state": jax.tree.map(jnp.copy, self.state)}

        def run():
            for _ in range(steps_per_call):  # queued back to back, one wait: as loop.py runs
                holder["state"], metrics = compiled(holder["state"], b)
            metrics["loss"].block_until_ready()
            jax.block_until_ready(holder["state"])
        run()
        self._holder = holder
        return run, compile_s, cost.get("flops", float("nan")) / batch, memory_mib(compiled)["temp_mib"]

    def sample_fn(self, batch: int, steps: int, sampler: str = "ddpm"):
        """`steps` respaced steps of ancestral sampling (the same per-step work as the full
        1000-step chain: one network call + one update) or of DDIM (eta 0), in one lax.scan."""
        sampler = sampling.make_sampler(sampling.ModelApply(self.model), self.schedule, (batch, *self.shape),
                                        SamplerSpec(sampler=sampler, steps=steps, var_type="fixedlarge"))
        params = self.state.params
        # The same executable the sampler runs, compiled once more for XLA's memory analysis.
        temp = memory_mib(lower_sampler(sampler, params).compile())["temp_mib"]
        return (lambda key: sampler(params, key)["images"]), temp


# ------------------------------------------------------------------------------------- peer

def diffusers_unet(kwargs: dict[str, Any], image_size: int):
    from diffusers import UNet2DModel
    levels = len(kwargs["ch_mult"])
    res = [image_size // 2**i for i in range(levels)]
    down = tuple("AttnDownBlock2D" if r in kwargs["attn_resolutions"] else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in kwargs["attn_resolutions"] else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(kwargs["ch"] * m for m in kwargs["ch_mult"]),
        layers_per_block=kwargs["num_res_blocks"], down_block_types=down, up_block_types=up,
        norm_eps=1e-6, norm_num_groups=kwargs.get("num_groups", 32), downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, attention_head_dim=None, dropout=0.1, act_fn="silu")


class Peer:
    """The diffusers UNet2DModel of `kwargs` on torch's `device` ("cpu", "cuda"); every run
    returns after the device has finished (`sync`)."""

    def __init__(self, kwargs: dict[str, Any], image_size: int, threads: int, device: str = "cpu"):
        import torch
        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        self.model = diffusers_unet(kwargs, image_size).to(device)
        self.shape = (3, image_size, image_size)
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def sync(self) -> None:
        """Waits for the device's queued work (torch runs CUDA kernels asynchronously)."""
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def forward_fn(self, batch: int):
        torch = self.torch
        x = torch.randn(batch, *self.shape, device=self.device)
        t = torch.arange(batch, device=self.device) * 7 % 1000
        self.model.eval()

        def run():
            with torch.no_grad():
                self.model(x, t)
            self.sync()
        run()
        return run

    def train_fn(self, batch: int, steps_per_call: int = 1, microbatches: int = 1):
        """Adam steps on `batch` images, each step's backward in `microbatches` slices (the
        gradients accumulate in .grad, as ours)."""
        torch = self.torch
        self.model.train()
        opt = torch.optim.Adam(self.model.parameters(), lr=2e-4, eps=1e-8)
        x0 = torch.rand(batch, *self.shape, device=self.device) * 2 - 1

        def run():
            for _ in range(steps_per_call):
                t = torch.randint(0, 1000, (batch,), device=self.device)
                noise = torch.randn_like(x0)
                x_t = x0 + 0.1 * noise  # the cost is the network; the exact q_sample is moot
                opt.zero_grad(set_to_none=True)
                for xs, ts, ns in zip(x_t.chunk(microbatches), t.chunk(microbatches),
                                      noise.chunk(microbatches)):
                    loss = torch.nn.functional.mse_loss(self.model(xs, ts).sample, ns)
                    (loss / microbatches).backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
            self.sync()
        run()
        return run

    def sample_fn(self, batch: int, steps: int, sampler: str = "ddpm"):
        """The first `steps` of the 1000-step DDPMScheduler chain, or a whole `steps`-step
        DDIMScheduler chain (eta 0; its own "leading" spacing, the same cost as ours)."""
        torch = self.torch
        from diffusers import DDIMScheduler, DDPMScheduler
        if sampler == "ddim":
            scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      clip_sample=True)
            scheduler.set_timesteps(steps)
        else:
            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      variance_type="fixed_large", clip_sample=True)
            scheduler.set_timesteps(1000)
        timesteps = scheduler.timesteps[:steps]
        assert len(timesteps) == steps
        self.model.eval()

        def run():
            x = torch.randn(batch, *self.shape, device=self.device)
            with torch.no_grad():
                for t in timesteps:
                    eps = self.model(x, t).sample
                    x = scheduler.step(eps, t, x).prev_sample
            self.sync()
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_forward", type=int, default=8)
    parser.add_argument("--batch_train", type=int, default=32)
    parser.add_argument("--batch_sample", type=int, default=16)
    parser.add_argument("--sample_steps", type=int, default=50,
                        help="reverse steps actually run; per-step time is extrapolated to 1000")
    parser.add_argument("--ddim_steps", type=int, default=50, help="steps of the DDIM chain")
    parser.add_argument("--batch_ddim", type=int, default=None, help="default: --batch_sample")
    parser.add_argument("--train_steps_per_call", type=int, default=2,
                        help="train steps queued back to back per timed call (one wait)")
    parser.add_argument("--microbatches", type=int, default=1,
                        help="both: each train step's batch in this many slices (gradient accumulation)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/peer rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no_peer", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of forward,train,sample,ddim to skip")
    parser.add_argument("--settle_s", type=float, default=1.0,
                        help="pause before each timed block so the other side's threads go idle")
    parser.add_argument("--xla_options", choices=xla_cpu.MODES, default="tuned",
                        help="ours under ddpm_jax.xla_cpu's CPU presets (tuned) or XLA's defaults")
    args = parser.parse_args()
    os.environ[xla_cpu.ENV_VAR] = args.xla_options
    skip = set(filter(None, args.skip.split(",")))
    threads = os.cpu_count() or 1
    info = dict(config=args.config, devices=str(jax.devices()), jax=jax.__version__,
                cpu_count=threads, dtype=args.dtype, xla_options=args.xla_options,
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    emit(dict(kind="machine", **info))

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = measure_peak(args.repeats, dtype)
    emit(dict(kind="peak", **peak))
    limit = max(v for v in peak.values())

    ours = Ours(CONFIGS[args.config], args.image_size, dtype)
    peer = None if args.no_peer else Peer(CONFIGS[args.config], args.image_size, threads)
    emit(dict(kind="params", ours=ours.num_params, peer=peer.num_params if peer else None))

    rows = []

    def settle() -> None:
        """Both runtimes keep worker threads spinning for a while after their last kernel
        (OpenMP for the peer, the Eigen pool for XLA); on 2 cores those spinners slow whichever
        side runs next. A pause before each timed block lets them go idle."""
        time.sleep(args.settle_s)

    def compare(name: str, batch: int, ours_run, peer_run, flops_per_image: float, extra: dict):
        """Images/s of ours and the peer, alternating; `batch` images per call."""
        t_ours, t_peer = [], []
        for _ in range(args.rounds):
            settle()
            t_ours.append(timeit(ours_run, args.repeats))
            if peer_run is not None:
                settle()
                t_peer.append(timeit(peer_run, args.repeats))
        ours_ips = batch / statistics.median(t_ours)
        peer_ips = batch / statistics.median(t_peer) if t_peer else float("nan")
        achieved = ours_ips * flops_per_image / 1e9
        # Ours and the peer alternate, so each round's ratio sees the same machine load; the
        # median of those is the figure to quote, their spread says how noisy the machine was.
        round_ratios = [p / o for o, p in zip(t_ours, t_peer)]
        row = dict(kind=name, batch=batch, ours_img_s=ours_ips, peer_img_s=peer_ips,
                   ratio=statistics.median(round_ratios) if round_ratios else float("nan"),
                   round_ratios=round_ratios, gflop_per_img=flops_per_image / 1e9,
                   ours_gflops=achieved, pct_of_limit=100 * achieved / limit,
                   peer_pct_of_limit=100 * peer_ips * flops_per_image / 1e9 / limit, **extra)
        emit(row)
        rows.append(row)

    forward_flops = float("nan")
    if "forward" not in skip:
        run, compile_s, flops, temp = ours.forward_fn(args.batch_forward)
        forward_flops = flops
        compare("forward", args.batch_forward, run,
                peer.forward_fn(args.batch_forward) if peer else None, flops,
                dict(compile_s=compile_s, xla_temp_mib=temp))
    if "train" not in skip:
        k = args.train_steps_per_call
        run, compile_s, flops, temp = ours.train_fn(args.batch_train, k, args.microbatches)
        compare("train_step", args.batch_train * k, run,
                peer.train_fn(args.batch_train, k, args.microbatches) if peer else None, flops,
                dict(compile_s=compile_s, xla_temp_mib=temp, batch_per_step=args.batch_train,
                     steps_per_call=k, microbatches=args.microbatches))
    if "sample" not in skip:
        fn, temp = ours.sample_fn(args.batch_sample, args.sample_steps)
        start = time.perf_counter()
        fn(jax.random.key(0)).block_until_ready()
        compile_s = time.perf_counter() - start
        ours_run = lambda: fn(jax.random.key(1)).block_until_ready()  # noqa: E731
        peer_run = peer.sample_fn(args.batch_sample, args.sample_steps) if peer else None
        t_ours, t_peer = [], []
        for _ in range(args.rounds):
            settle()
            t_ours.append(timeit(ours_run, 1))
            if peer_run is not None:
                settle()
                t_peer.append(timeit(peer_run, 1))
        scale = 1000 / args.sample_steps
        row = dict(kind="sample_1000_steps", batch=args.batch_sample, steps_run=args.sample_steps,
                   extrapolated=args.sample_steps != 1000,
                   ours_s=statistics.median(t_ours) * scale,
                   peer_s=statistics.median(t_peer) * scale if t_peer else float("nan"),
                   first_call_s=compile_s, xla_temp_mib=temp)
        row["round_ratios"] = [p / o for o, p in zip(t_ours, t_peer)]
        row["ratio"] = statistics.median(row["round_ratios"]) if t_peer else float("nan")
        emit(row)
        rows.append(row)
    if "ddim" not in skip:
        if forward_flops != forward_flops:  # forward skipped: still count its FLOPs (no timing)
            forward_flops = ours.forward_fn(1)[2]
        batch_ddim = args.batch_ddim or args.batch_sample
        fn, temp = ours.sample_fn(batch_ddim, args.ddim_steps, "ddim")
        start = time.perf_counter()
        fn(jax.random.key(0)).block_until_ready()
        compile_s = time.perf_counter() - start
        # One whole chain per call: images/s of finished samples; FLOPs = steps x forward.
        compare(f"ddim_{args.ddim_steps}", batch_ddim,
                lambda: fn(jax.random.key(1)).block_until_ready(),
                peer.sample_fn(batch_ddim, args.ddim_steps, "ddim") if peer else None,
                args.ddim_steps * forward_flops, dict(first_call_s=compile_s, xla_temp_mib=temp))

    def spread(row: dict[str, Any]) -> str:
        ratios = row.get("round_ratios") or []
        return f" (rounds {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""

    print(f"\n{args.config} ({ours.num_params:,} params), {info['devices']}, jax {jax.__version__}, "
          f"{threads} threads; FLOP limit {limit:.0f} GFLOP/s "
          + ", ".join(f"{k}={v:.0f}" for k, v in peak.items()))
    for row in rows:
        if row["kind"] == "sample_1000_steps":
            note = " (extrapolated from %d steps)" % row["steps_run"] if row["extrapolated"] else ""
            print(f"  sample 1000 steps x{row['batch']}: ours {row['ours_s']:.1f} s, peer "
                  f"{row['peer_s']:.1f} s, ours/peer speed {row['ratio']:.2f}x{spread(row)}{note}; "
                  f"XLA temp {row['xla_temp_mib']:.0f} MiB")
        else:
            batch = (f"{row['steps_per_call']} x batch {row['batch_per_step']}"
                     if "steps_per_call" in row else f"batch {row['batch']}")
            if row.get("microbatches", 1) > 1:
                batch += f" in {row['microbatches']} microbatches"
            print(f"  {row['kind']:<10} {batch}: ours {row['ours_img_s']:.2f} img/s, "
                  f"peer {row['peer_img_s']:.2f} img/s, ratio {row['ratio']:.2f}x{spread(row)}; "
                  f"ours {row['ours_gflops']:.0f} GFLOP/s = {row['pct_of_limit']:.0f}% of limit, "
                  f"peer {row['peer_pct_of_limit']:.0f}%; XLA temp {row['xla_temp_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
