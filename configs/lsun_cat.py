"""LSUN cat 256x256: the official 256px model (113.7M parameters), 1,800,000 steps at batch 64,
no horizontal flips."""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    base.configure_256px(config, dataset="lsun_cat", num_steps=1_800_000)
    config.data.random_flip = False  # the official LSUN cat run trains without flips
    return base.with_variant(config, variant, "lsun_cat")
