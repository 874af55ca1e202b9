"""The UNet's feature seam: read or replace a block's output, or the queries, keys and values
of an attention block, at apply time, without a second model class.

Sites are named after the UNet's blocks (the parameter tree's top-level names):

    "up_1_block_0"          a ResBlock's output [B, H, W, C]          (method "__call__")
    "up_1_attn_0"           an AttnBlock's output [B, H, W, C]        (method "__call__")
    "up_1_attn_0.attend"    the attention core: (q, k, v) -> [B, N, C] (method "attend")

A hook is `hook(call, args, kwargs) -> output`: `call(*args, **kwargs)` runs the block as it
is, so a hook may change the inputs, the output, or both. Hooks run while the model is traced,
so they can close over arrays of the same jitted function (a guide row's features, a time
threshold) and everything stays one XLA program. With no hooks the model is the model: the
seam is Flax's method interception, which adds nothing to the computation.

    with seams.hooks({"up_1_block_0": replace_rows}):
        eps = model.apply({"params": params}, x, t, y, train=False)

`capture(sites)` is the read-only case: it records each site's output (the last call wins)
into a dict that the caller returns from its own traced function.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax

Array = jax.Array
Hook = Callable[[Callable[..., Any], tuple, dict], Any]

_SITE = re.compile(r"^(down|up)_\d+_(block|attn)_\d+(\.attend)?$|^mid_(block_\d+|attn)(\.attend)?$")


def site_of(module: nn.Module, method_name: str) -> str | None:
    """The site name of a module method call: "<block name>" for `__call__`, "<block name>.<method>"
    otherwise; None for modules that are not direct children of the UNet."""
    name = module.name
    if name is None:
        return None
    return name if method_name == "__call__" else f"{name}.{method_name}"


def check_sites(sites: Mapping[str, Any] | list[str], params: Any | None = None) -> None:
    """Refuses a site that is not a block of the UNet (and, given `params`, one this model lacks)."""
    for site in sites:
        if not _SITE.match(site):
            raise ValueError(f"unknown feature site {site!r}: use a block name such as 'up_1_block_0', "
                             "'mid_attn', or '<attention block>.attend' for its queries/keys/values.")
        if params is not None and site.split(".")[0] not in params:
            blocks = sorted(k for k in params if _SITE.match(k))
            raise ValueError(f"feature site {site!r} is not a block of this model; its blocks are {blocks}.")
        if site.endswith(".attend") and "_attn" not in site:
            raise ValueError(f"feature site {site!r}: only attention blocks have '.attend'.")


@contextlib.contextmanager
def hooks(per_site: Mapping[str, Hook]) -> Iterator[None]:
    """Within the block, calls of the named sites go through their hooks (see the module doc)."""
    check_sites(per_site)

    def interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                    context: nn.module.InterceptorContext) -> Any:
        site = site_of(context.module, context.method_name)
        hook = per_site.get(site) if site is not None else None
        if hook is None:
            return next_fun(*args, **kwargs)
        return hook(next_fun, args, kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def capture(sites: list[str]) -> Iterator[dict[str, Any]]:
    """Records each named site's output into the yielded dict (the traced arrays)."""
    found: dict[str, Any] = {}

    def recorder(site: str) -> Hook:
        def hook(call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
            found[site] = call(*args, **kwargs)
            return found[site]
        return hook

    with hooks({site: recorder(site) for site in sites}):
        yield found
