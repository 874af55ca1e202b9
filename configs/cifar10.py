"""CIFAR-10 32x32, the paper's headline model: 35.7M parameters, 800k steps at batch 128."""

import ml_collections

from configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()  # the base values are the official CIFAR-10 ones
    return base.with_variant(config, variant, "cifar10")
