"""CelebA-HQ 256x256: the official 256px model (113.7M parameters), 500,000 steps at batch 64."""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    base.configure_256px(config, dataset="celebahq", num_steps=500_000)
    return base.with_variant(config, variant, "celebahq")
