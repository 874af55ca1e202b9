"""LSUN church 256x256: the official 256px model (113.7M parameters), 1,200,000 steps at batch 64."""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    base.configure_256px(config, dataset="lsun_church", num_steps=1_200_000)
    return base.with_variant(config, variant, "lsun_church")
