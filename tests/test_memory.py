"""Up-front memory estimates of a training or sampling batch (ddpm_jax/memory.py): the largest
convolution output per image, derived here from the tiny UNet's shapes, and one-line refusals
of a batch or sample count that cannot fit (issue 29: batch_size=1e8 grew to 5.5 GB and left a
SIGTERM unanswered)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs` lives at the repo root

from configs import digits  # noqa: E402
from ddpm_jax import config as config_lib, memory  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    config = digits.get_config("tiny")
    config.data.image_size, config.model.attn_resolutions = 8, (4,)
    return config_lib.model_from_config(config)


def test_the_activation_estimate_is_the_largest_convolution_output(tiny_model):
    # ch 16, ch_mult (1, 2): level 1 holds 32 channels at 4x4; its upsampling conv works at 8x8
    # with 32 channels, the largest output of a convolution: 8 * 8 * 32 float32 per image.
    assert memory.activation_bytes_per_image(tiny_model, (8, 8, 1)) == 8 * 8 * 32 * 4


def test_a_training_batch_that_cannot_fit_is_refused_with_the_estimate(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    params = memory.param_bytes(tiny_model, (8, 8, 1))
    assert memory.check_training_batch(tiny_model, (8, 8, 1), 64) == (
            5 * params + 64 * 64 * 4 + 64 * 2 * 8192)
    with pytest.raises(memory.BatchTooLargeError) as refused:
        memory.check_training_batch(tiny_model, (8, 8, 1), 100_000_000)
    assert str(refused.value) == (
            "training.batch_size=100,000,000 needs at least 1,664.0 GB (1,638.4 GB of "
            "activations: 16,384 bytes per image x 100,000,000 images per microbatch, plus the "
            "batch and 5 copies of the parameters), more than the 1.0 GB this machine has free: "
            "lower --config.training.batch_size (about 60,096 at most could fit) or raise "
            "--config.training.microbatches.")  # 60,096 = 1e9 // (2 * 8,192 + 8 * 8 * 4)
    assert isinstance(refused.value, config_lib.ConfigError)  # train.py: one line


def test_a_sample_count_that_cannot_be_kept_is_refused_naming_the_flags(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    memory.check_sampling_batch(tiny_model, (8, 8, 1), 64, 10_000)
    with pytest.raises(memory.BatchTooLargeError, match=r"^--num_samples=100,000,000 at "
                                                       r"--batch_size=64 needs at least 6\.4 GB .*"
                                                       r"6\.4 GB for the samples kept\), more "
                                                       r"than the 1\.0 GB this machine has free"):
        memory.check_sampling_batch(tiny_model, (8, 8, 1), 64, 100_000_000)
    with pytest.raises(memory.BatchTooLargeError, match=r"lower --batch_size"):
        memory.check_sampling_batch(tiny_model, (8, 8, 1), 1_000_000, 1_000_000)


def test_the_machine_reports_some_memory():
    assert memory.available_bytes() > 10**8
