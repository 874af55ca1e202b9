"""How the device suite times a figure: steady-state rounds of queued work, each process taking
process 0's clock decisions, and the devices' peak memory.

Used by bench/device_suite.py and bench/device_peer.py.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

now = time.monotonic


def agree(value: int) -> int:
    """Process 0's value on every process: a decision from a clock (skip, rounds, steps per
    round) must match everywhere, since every process runs the same collective programs."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def time_units(queue_one: Callable[[], Any], wait: Callable[[Any], Any], *, rounds: int,
               window_s: float, deadline: float) -> dict[str, Any]:
    """Steady-state units (train steps, whole chains) per second: {median, min, max, rounds,
    units_per_round}. queue_one() dispatches one unit and returns what to `wait` on; each round
    queues n units back to back and waits once (as loop.py keeps steps queued), n chosen to fill
    window_s. One unit alone first calibrates n; when it alone fills the window it counts as
    the first round. No round starts after `deadline` except the first."""
    start = now()
    wait(queue_one())
    unit_s = now() - start
    rates, counts = ([1 / unit_s], [1]) if unit_s >= window_s else ([], [])
    while len(rates) < rounds:
        left = deadline - now()
        n = agree(max(1, min(int(window_s / unit_s), int(left / unit_s)))
                  if not rates or left > unit_s else 0)
        if n == 0:
            break
        start, out = now(), None
        for _ in range(n):
            out = queue_one()
        wait(out)
        elapsed = now() - start
        rates.append(n / elapsed)
        counts.append(n)
        unit_s = elapsed / n
    return dict(median=statistics.median(rates), min=min(rates), max=max(rates), rounds=rates,
                units_per_round=counts)


def seconds_per_unit(rates: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """time_units' rounds as seconds per unit (times `scale`: an extrapolation), {median, min,
    max, rounds}."""
    seconds = [scale / r for r in rates["rounds"]]
    return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds),
                rounds=seconds)


def device_memory() -> dict[str, Any]:
    """The largest `peak_bytes_in_use` of this process's devices since it started (it only
    grows, so a figure includes the measurements before it), or None with the reason."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if any(s is None or "peak_bytes_in_use" not in s for s in stats):
        return dict(peak_bytes_in_use=None, memory_reason=f"{jax.default_backend()} devices "
                    "report no peak_bytes_in_use in memory_stats()")
    return dict(peak_bytes_in_use=max(s["peak_bytes_in_use"] for s in stats),
                memory_reason="the process's peak since start")
