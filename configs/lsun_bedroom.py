"""LSUN bedroom 256x256: the official 256px model (113.7M parameters), 2,400,000 steps at batch 64."""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    base.configure_256px(config, dataset="lsun_bedroom", num_steps=2_400_000)
    return base.with_variant(config, variant, "lsun_bedroom")
