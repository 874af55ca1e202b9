"""Where the train step's time goes: variants of ours and of the peer, alternating round by
round in one process, seconds per step (two steps queued per call, as the loop runs them).

    python bench/bench_ablation.py --config cifar10 --batch 8 \
        --ours base,nokgrad,nogn,noswish,nodrop --peer base,nokgrad,nogn,noswish
    python bench/bench_ablation.py --config cifar10 --batch 32 --ours base,mb2,mb4,mb8 --peer ""

Variants (all but mbM change the network, so they are for attributing time, not for training):
  base     the train step as shipped;
  nokgrad  no gradient for the convolution kernels (ours: stop_gradient on every conv kernel;
           the peer: requires_grad=False on the 3x3 conv weights);
  nogn     GroupNorm replaced by the identity;
  noswish  swish replaced by the identity;
  nodrop   ours with dropout 0 (the peer's dropout is left as is);
  mbM      ours with training.microbatches=M (the same update; see README "Scale-out").
Never run by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_unet import CONFIGS, Ours, Peer  # noqa: E402
from ddpm_jax.models import unet  # noqa: E402

OURS = ("base", "nokgrad", "nogn", "noswish", "nodrop")
PEER = ("base", "nokgrad", "nogn", "noswish")


@contextlib.contextmanager
def _ours_patched(variant: str) -> Iterator[None]:
    """Module attributes swapped while the variant's network is traced (restored after)."""
    saved: dict[tuple[Any, str], Any] = {}

    def swap(owner: Any, name: str, value: Any) -> None:
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, value)

    if variant == "nogn":
        swap(unet, "group_norm", lambda x, num_groups, dtype, name: x.astype(dtype))
    elif variant == "noswish":
        swap(nn, "swish", lambda x: x)
    elif variant == "nokgrad":
        conv = jax.lax.conv_general_dilated
        swap(jax.lax, "conv_general_dilated",
             lambda x, k, *a, **kw: conv(x, jax.lax.stop_gradient(k), *a, **kw))
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def _peer_variant(peer: Peer, variant: str) -> None:
    torch = peer.torch
    for module in list(peer.model.modules()):
        if variant == "nokgrad" and isinstance(module, torch.nn.Conv2d) \
                and module.kernel_size == (3, 3):
            module.weight.requires_grad_(False)
        for child_name, child in list(module.named_children()):
            if (variant == "nogn" and isinstance(child, torch.nn.GroupNorm)) or \
                    (variant == "noswish" and isinstance(child, torch.nn.SiLU)):
                setattr(module, child_name, torch.nn.Identity())
        if variant == "noswish" and hasattr(module, "nonlinearity"):
            module.nonlinearity = torch.nn.Identity()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ours", default="base,nokgrad,nogn,noswish,nodrop",
                        help=f"comma list of {OURS} and mbM")
    parser.add_argument("--peer", default="base,nokgrad,nogn,noswish",
                        help=f"comma list of {PEER}, or empty")
    args = parser.parse_args()
    runs = {}
    for variant in filter(None, args.ours.split(",")):
        if variant not in OURS and not (variant.startswith("mb") and variant[2:].isdigit()):
            parser.error(f"--ours: unknown variant {variant!r}; use {OURS} or mbM")
        microbatches = int(variant[2:]) if variant.startswith("mb") else 1
        with _ours_patched(variant):
            ours = Ours(CONFIGS[args.config], 32, jnp.float32)
            if variant == "nodrop":
                ours.model = ours.model.clone(dropout=0.0)
            start = time.perf_counter()
            runs[f"ours {variant}"] = ours.train_fn(args.batch, 2, microbatches)[0]
        print(f"ours {variant}: compiled and warmed up in {time.perf_counter() - start:.1f} s",
              flush=True)
    for variant in filter(None, args.peer.split(",")):
        if variant not in PEER:
            parser.error(f"--peer: unknown variant {variant!r}; use {PEER}")
        peer = Peer(CONFIGS[args.config], 32, os.cpu_count() or 1)
        _peer_variant(peer, variant)
        runs[f"peer {variant}"] = peer.train_fn(args.batch, 2)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            time.sleep(1.0)  # let the other runtime's spinning worker threads go idle
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / 2)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
    print(f"\n{args.config}, batch {args.batch}, {jax.devices()}, seconds per step:")
    for name, values in times.items():
        print(f"  {name:<14} median {statistics.median(values):.3f}  min {min(values):.3f}")


if __name__ == "__main__":
    main()
