"""The device suite: GPU and TPU figures from one prepared command, within a time budget.

    python bench/device_suite.py --out runs/suite                  # whatever accelerator JAX sees
    python bench/device_suite.py --smoke --out /tmp/suite          # the same code, tiny, on the CPU

Measures, in this order (most valuable first), on every device of the mesh (data parallel, as
the training loop runs): the CIFAR-10 UNet's train steps/s at batch 128 in float32; 256 samples
x 1000 ancestral steps as one scan; DPM-Solver++(2M) 20 steps; the train step in bfloat16
compute; the digits UNet's train steps/s; the diffusers peer (train step, ancestral sampling) on
the same device where torch can reach it. Each figure: compile time, steady-state rounds (median
and min-max), peak device memory, XLA's FLOPs and the share of the device's peak FLOP/s.

The budget: the suite stops itself --budget_s seconds after it started (a watchdog writes what it
has and exits); a measurement is skipped, with the reason, when the time left is below its
estimate, and stops its rounds at its own cap. The JSON and the Markdown table
(bench/device_report.py) are rewritten after every measurement. docs/device_suite.md says how to
run it on a GPU host, a TPU VM or several hosts, and what each figure means. Never run by CI
(tests/test_device_suite.py runs --smoke).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import flops  # noqa: E402
from bench.bench_unet import Peer, memory_mib  # noqa: E402
from bench.device_peer import peer_device, peer_figures  # noqa: E402
from bench.device_report import Report, describe_machine, peak_tflops, share_of_peak  # noqa: E402
from bench.device_timing import (agree, device_memory, now, seconds_per_unit,  # noqa: E402
                                 time_units)
from configs import cifar10, digits  # noqa: E402
from ddpm_jax import loop, parallel, sampling  # noqa: E402
from ddpm_jax import config as config_lib  # noqa: E402
from ddpm_jax.models.unet import count_params  # noqa: E402
from ddpm_jax.spec import SamplerSpec  # noqa: E402

log = logging.getLogger("device_suite")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes and clocks of a run: the real figures, or --smoke's tiny ones (same code)."""

    variant: str | None       # the experiment configs' variant: None, or "tiny" (configs/base.py)
    train_batch: int          # CIFAR-10 train batch (global, rounded up to the device count)
    digits_batch: int         # digits train batch
    sample_batch: int         # images per sampler chain
    ancestral_steps: int      # ancestral chain length
    dpm_steps: int            # DPM-Solver++ steps
    peer_sample_steps: int    # the peer's ancestral steps actually run (extrapolated)
    rounds: int               # timed rounds per figure
    window_s: float           # seconds of one round of queued train steps
    time_scale: float         # multiplies each measurement's estimate and cap
    budget_s: float           # the default --budget_s


REAL = Sizes(None, 128, 64, 256, 1000, 20, 100, 3, 3.0, 1.0, 540.0)
SMOKE = Sizes("tiny", 4, 4, 4, 10, 5, 2, 2, 0.2, 0.1, 240.0)
# --smoke's programs compile without XLA's CPU backend optimisations, as the tests' do: compiling
# is nearly all of a smoke run's time, and its figures are not for reading.
SMOKE_XLA_FLAG = "--xla_backend_optimization_level=0"


@dataclasses.dataclass(frozen=True)
class Measurement:
    name: str
    needs_s: float  # started only when at least this much (x time_scale) is left: compile + rounds
    cap_s: float    # its rounds stop once this much (x time_scale) has passed since its start


# By value: the headline figures first, so that a short budget loses the least.
MEASUREMENTS = (Measurement("train_cifar10_fp32", 60, 120),
                Measurement("sample_ancestral", 60, 120),
                Measurement("sample_dpm", 25, 50),
                Measurement("train_cifar10_bf16", 60, 100),
                Measurement("train_digits", 20, 40),
                Measurement("peer_train", 30, 60),
                Measurement("peer_sample", 20, 45))
RESERVE_S = 1.0  # kept back from the deadline for the last write


# ------------------------------------------------------------------------------------- ours

@dataclasses.dataclass
class Setup:
    """One experiment as the training loop builds it: model, schedule, state, step options."""

    config: Any
    model: Any
    settings: Any  # training.StepConfig
    schedule: Any       # replicated over the mesh (the train step's argument)
    host_schedule: Any  # the samplers'
    state: Any
    shape: tuple[int, int, int]


def make_setup(config: Any, mesh: Any) -> Setup:
    model = config_lib.model_from_config(config)
    settings = config_lib.step_config(config, model)
    shape = config_lib.image_shape(config)
    # The state does not depend on the compute dtype: the float32 module creates it, so the
    # bfloat16 setup reuses the compiled initialisation.
    state = loop.jitted_create_train_state(mesh)(model.clone(dtype=jnp.float32),
                                                 settings.optimizer, jax.random.PRNGKey(0),
                                                 image_shape=shape)
    host_schedule = config_lib.schedule_from_config(config)
    schedule = parallel.replicate(jax.tree.map(np.asarray, host_schedule), mesh)
    return Setup(config, model, settings, schedule, host_schedule, state, shape)


def make_chain(setup: Setup, mesh: Any, batch: int, sampler: str, steps: int) -> sampling.Sampler:
    """Every sampler of the suite, built here only: ancestral ("ddpm", fixedlarge variance, the
    paper's CIFAR-10 sampler) or DPM-Solver++(2M) ("dpm++"), `steps` steps in one lax.scan,
    the batch split over the mesh."""
    spec = SamplerSpec(sampler=sampler, steps=steps, var_type="fixedlarge",
                       order=2 if sampler == "dpm++" else None)
    return sampling.make_sampler(sampling.ModelApply(setup.model), setup.host_schedule,
                                 (batch, *setup.shape), spec, mesh=mesh)


def synthetic_batch(mesh: Any, batch: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """A global batch of uniform images in [-1, 1] split over the mesh; each host makes its
    own rows."""
    first, rows = parallel.local_rows(mesh, batch)
    rng = np.random.default_rng(first)
    return parallel.host_local_to_global(
            dict(image=rng.uniform(-1, 1, (rows, *shape)).astype(np.float32),
                 label=np.zeros((rows,), np.int32)), mesh)


def train_figures(setup: Setup, mesh: Any, sizes: Sizes, deadline: float, peak: dict[str, Any]
                  ) -> dict[str, Any]:
    """Compile time, steps/s, XLA's FLOPs and memory of the loop's jitted train step."""
    batch_size = setup.config.training.batch_size
    batch = synthetic_batch(mesh, batch_size, setup.shape)
    step = loop.jitted_train_step(mesh, 1).jitted
    start = now()
    compiled = step.lower(setup.state, batch, setup.schedule,
                          setup.settings).compile()
    compile_s = now() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_step = (cost or {}).get("flops")  # one device's share of the step
    holder = {}

    def queue_one():
        setup.state, holder["metrics"] = compiled(setup.state, batch, setup.schedule)
        return setup.state, holder["metrics"]

    start = now()
    jax.block_until_ready(queue_one())
    first_call_s = now() - start
    rates = time_units(queue_one, jax.block_until_ready, rounds=sizes.rounds,
                       window_s=sizes.window_s, deadline=deadline)
    loss = float(np.asarray(holder["metrics"]["loss"].addressable_data(0)))
    dtype = setup.config.training.compute_dtype
    return dict(steps_per_s=rates, images_per_s=rates["median"] * batch_size, batch=batch_size,
                compile_s=compile_s, first_call_s=first_call_s, final_loss=loss,
                gflop_per_step_per_device=None if flops_per_step is None else flops_per_step / 1e9,
                gflop_per_image=None if flops_per_step is None else
                flops_per_step * mesh.size / batch_size / 1e9,
                xla_memory_mib={k: None if math.isnan(v) else v  # NaN: not reported
                                for k, v in memory_mib(compiled).items()},
                dtype=dtype,
                **share_of_peak(flops_per_step, rates["median"], peak, dtype))


def model_figures(setup: Setup) -> dict[str, Any]:
    """Parameters and the dense forward GFLOP per image: every conv tap and matmul
    (bench/flops.py); `forward_gflop_xla`, XLA's count that the sampling shares use, joins it
    when a sampler is measured."""
    return dict(params=count_params(setup.state.params),
                forward_gflop_dense=flops.dense_flops_per_image(setup.model, setup.shape) / 1e9)


def chain_figures(setup: Setup, mesh: Any, sizes: Sizes, deadline: float, peak: dict[str, Any],
                  sampler: str, steps: int, forward_gflop: float) -> dict[str, Any]:
    """Seconds per whole chain of sizes.sample_batch images (first call: compile + one chain)."""
    batch = parallel.round_up_to_devices(sizes.sample_batch, mesh.size)
    chain = make_chain(setup, mesh, batch, sampler, steps)
    params, key = setup.state.params, jax.random.key(0)
    start = now()
    chain(params, key)["images"].block_until_ready()
    first_call_s = now() - start
    rates = time_units(lambda: chain(params, key)["images"], jax.block_until_ready,
                       rounds=sizes.rounds, window_s=sizes.window_s, deadline=deadline)
    seconds = seconds_per_unit(rates)
    median = seconds["median"]
    flops_per_chain = forward_gflop * 1e9 * steps * batch / mesh.size  # per device
    return dict(seconds=seconds, images_per_s=batch / median, batch=batch, steps=steps,
                first_call_s=first_call_s, compile_s=max(first_call_s - median, 0.0),
                **share_of_peak(flops_per_chain, 1 / median, peak,
                                setup.config.training.compute_dtype))


# ------------------------------------------------------------------------------------- suite

class Suite:
    """Runs the measurements in order within the budget and keeps the report current."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.sizes, self.mesh = sizes, parallel.make_mesh()
        self.deadline = STARTED + args.budget_s
        self.skip = set(filter(None, args.skip.split(",")))
        machine = describe_machine()
        self.peak = peak_tflops(machine["device_kind"], args.peak_tflops)
        self.report = Report(args.out, dict(smoke=args.smoke, budget_s=args.budget_s,
                                            sizes=dataclasses.asdict(sizes), machine=machine,
                                            peak=self.peak, models={}),
                             tuple(m.name for m in MEASUREMENTS), STARTED)
        self.setups: dict[str, Setup] = {}
        self.current: str | None = None
        self.peer: Peer | None = None

    # -- the budget
    def start_watchdog(self) -> threading.Timer:
        timer = threading.Timer(max(self.deadline - now(), 0.0), self.stop_at_deadline)
        timer.daemon = True
        timer.start()
        return timer

    def stop_at_deadline(self) -> None:
        """The hard stop: the running measurement is marked stopped, the rest skipped, the
        report written, the process ended (a compile or a chain cannot be interrupted)."""
        with self.report.lock:
            if self.report.data["finished"]:
                return
            reason = f"the suite's deadline (--budget_s {self.report.data['budget_s']:g}) passed"
            for name, record in self.report.data["measurements"].items():
                if record["status"] in ("pending", "running"):
                    status = "stopped" if name == self.current else "skipped"
                    self.report.data["measurements"][name] = dict(status=status, reason=reason)
            self.report.data["stopped"] = reason
            self.report.write()
            log.warning("Deadline: %s; wrote %s.", reason, self.report.out_dir)
            logging.shutdown()
            os._exit(0)

    # -- one measurement
    def run(self, measurement: Measurement, fn: Callable[[float], dict[str, Any]]) -> None:
        name, scale = measurement.name, self.sizes.time_scale
        needs, left = measurement.needs_s * scale, self.deadline - RESERVE_S - now()
        reason = ("--skip" if name in self.skip else None) or (
                None if agree(left >= needs) else
                f"budget: {left:.0f} s left, it needs about {needs:.0f} s")
        if reason:
            self.report.set(name, dict(status="skipped", reason=reason))
            log.info("%s: skipped (%s).", name, reason)
            return
        self.current, start = name, now()
        self.report.set(name, dict(status="running"))
        log.info("%s: running (%.0f s left).", name, left)
        try:
            record = fn(min(start + measurement.cap_s * scale, self.deadline - RESERVE_S))
        except Exception as error:  # noqa: BLE001  one failure must not cost the other figures
            log.error("%s failed:\n%s", name, traceback.format_exc())
            record = dict(status="failed", reason=f"{type(error).__name__}: {error}"[:600])
        else:
            if record.get("status") != "skipped":
                memory = record.pop("memory", None) or device_memory()
                record = dict(status="done", wall_s=round(now() - start, 2), **record, **memory)
        self.current = None
        self.report.set(name, record)
        log.info("%s: %s", name, {k: v for k, v in record.items() if not isinstance(v, dict)})

    def setup(self, experiment: str, dtype: str = "float32") -> Setup:
        key = f"{experiment}_{dtype}"
        if key not in self.setups:
            module = cifar10 if experiment == "cifar10" else digits
            config = module.get_config(self.sizes.variant)
            batch = self.sizes.train_batch if experiment == "cifar10" else self.sizes.digits_batch
            config.training.batch_size = parallel.round_up_to_devices(batch, self.mesh.size)
            config.training.compute_dtype = dtype
            self.setups[key] = make_setup(config, self.mesh)
        return self.setups[key]

    def model(self, experiment: str, xla: bool = False) -> dict[str, Any]:
        """The model's figures (report["models"]); xla: with XLA's forward GFLOP per image."""
        setup, models = self.setup(experiment), self.report.data["models"]
        if experiment not in models:
            models[experiment] = model_figures(setup)
        if xla and "forward_gflop_xla" not in models[experiment]:
            models[experiment]["forward_gflop_xla"] = flops.forward_flops_per_image(
                    setup.model, setup.shape) / 1e9
        return models[experiment]

    # -- the measurements
    def train(self, experiment: str, dtype: str, what: str, reference: str = ""
              ) -> Callable[[float], dict[str, Any]]:
        def fn(deadline: float) -> dict[str, Any]:
            self.model(experiment)
            return dict(what=what, reference=reference, **train_figures(
                    self.setup(experiment, dtype), self.mesh, self.sizes, deadline, self.peak))
        return fn

    def chain(self, sampler: str, steps: int, what: str, reference: str = ""
              ) -> Callable[[float], dict[str, Any]]:
        def fn(deadline: float) -> dict[str, Any]:
            gflop = self.model("cifar10", xla=True)["forward_gflop_xla"]
            return dict(what=what, reference=reference, **chain_figures(
                    self.setup("cifar10"), self.mesh, self.sizes, deadline, self.peak, sampler,
                    steps, gflop))
        return fn

    def peer_fn(self, part: str, what: str, reference: str) -> Callable[[float], dict[str, Any]]:
        """The peer's train step or ancestral chain, with ours / peer where both ran alone on
        one device."""
        s, ours = self.sizes, self.report.data["measurements"]

        def fn(deadline: float) -> dict[str, Any]:
            device, why_not = peer_device()
            if device is None:
                return dict(status="skipped", reason=why_not)
            config = self.setup("cifar10").config
            if self.peer is None:
                self.peer = Peer(dict(config.model), config.data.image_size, os.cpu_count() or 1,
                                 device)
            timing = dict(rounds=s.rounds, window_s=s.window_s, deadline=deadline)
            if part == "train":
                record = peer_figures(self.peer, "train", config.training.batch_size, **timing)
                mine = ours["train_cifar10_fp32"].get("steps_per_s", {}).get("median")
                ratio = mine and mine / record["steps_per_s"]["median"]
            else:
                batch = parallel.round_up_to_devices(s.sample_batch, self.mesh.size)
                record = peer_figures(self.peer, "sample", batch, steps_run=s.peer_sample_steps,
                                      steps_total=s.ancestral_steps, **timing)
                mine = ours["sample_ancestral"].get("seconds", {}).get("median")
                ratio = mine and record["seconds"]["median"] / mine
            if ratio and self.mesh.size > 1:
                ratio, record["ratio_reason"] = None, \
                    f"ours ran on {self.mesh.size} devices, the peer on one"
            return dict(what=what, reference=reference, ratio_to_ours=ratio, **record)
        return fn

    def run_all(self) -> None:
        s = self.sizes
        b, tb, db = (parallel.round_up_to_devices(size, self.mesh.size)
                     for size in (s.sample_batch, s.train_batch, s.digits_batch))
        n = s.ancestral_steps
        plan = {
            "train_cifar10_fp32": self.train(
                    "cifar10", "float32", f"CIFAR-10 UNet train step, batch {tb}, float32",
                    "paper, TPU v3-8: 21 steps/s; target, one H100: >= 63"),
            "sample_ancestral": self.chain(
                    "ddpm", n, f"{b} samples x {n} ancestral steps, one scan",
                    "paper, TPU v3-8: 17 s; target, one H100: <= 6 s"),
            "sample_dpm": self.chain("dpm++", s.dpm_steps,
                                     f"{b} samples, DPM-Solver++(2M) {s.dpm_steps} steps"),
            "train_cifar10_bf16": self.train(
                    "cifar10", "bfloat16",
                    f"CIFAR-10 UNet train step, batch {tb}, bfloat16 compute"),
            "train_digits": self.train("digits", "float32", f"digits UNet train step, batch {db}"),
            "peer_train": self.peer_fn(
                    "train", f"diffusers UNet2DModel train step, batch {tb}, same device",
                    "target: ours >= 1.5x"),
            "peer_sample": self.peer_fn(
                    "sample",
                    f"diffusers DDPMScheduler, {b} x {n} steps (from {s.peer_sample_steps})",
                    "time for all steps, extrapolated"),
        }
        for measurement in MEASUREMENTS:
            self.run(measurement, plan[measurement.name])
        with self.report.lock:
            self.report.data["finished"] = True
            self.report.write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for device_suite.json / .md")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and a short budget: the same code on the CPU in seconds")
    parser.add_argument("--budget_s", type=float, default=None,
                        help=f"stop this many seconds after the start (default {REAL.budget_s:g}; "
                             f"--smoke: {SMOKE.budget_s:g})")
    parser.add_argument("--skip", default="",
                        help="comma list of measurements to leave out: "
                             + ",".join(m.name for m in MEASUREMENTS))
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="dense peak TFLOP/s per device, for a device missing from the table")
    # Several hosts: as train.py; Cloud TPU, Slurm and Open MPI need none of them.
    parser.add_argument("--coordinator_address", default=None, help="process 0's host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr,
                        force=True)
    unknown = set(filter(None, args.skip.split(","))) - {m.name for m in MEASUREMENTS}
    if unknown:
        parser.error(f"--skip names unknown measurements {sorted(unknown)}")
    sizes = SMOKE if args.smoke else REAL
    if args.budget_s is None:
        args.budget_s = sizes.budget_s
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAG}".strip()
    if not {"peer_train", "peer_sample"} <= set(args.skip.split(",")):
        # JAX reserves 75% of a GPU's memory at start-up by default; the peer (torch, same
        # process) needs some of the rest.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    suite = Suite(args, sizes)
    watchdog = suite.start_watchdog()
    suite.report.write()
    suite.run_all()
    # Cancel, then join: a daemon thread still alive when the interpreter finalises is ended by
    # pthread_exit, and that aborted the process (SIGABRT, "exception not rethrown") about once
    # in six runs that finished near the deadline.
    watchdog.cancel()
    watchdog.join()
    if jax.process_index() == 0:
        with open(os.path.join(args.out, "device_suite.md"), encoding="utf-8") as f:
            print(f.read())


if __name__ == "__main__":
    main()
