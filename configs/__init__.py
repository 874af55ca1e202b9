"""Experiment configs (ml_collections): `--config configs/cifar10.py[:tiny]`."""
