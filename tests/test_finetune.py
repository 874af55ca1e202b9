"""Fine-tuning runs (ddpm_jax/finetune.py through loop.py): a LoRA run with a new class and prior
preservation resumes bit for bit, its checkpoints hold only the adapters, the sampler gets plain
merged parameters; bad inputs give one line each and leave the base run untouched."""

import hashlib
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import write_untrained_run

from configs import digits
from ddpm_jax import adapters, checkpoint, finetune, frozen, loop, runs
from ddpm_jax import config as config_lib


def _tree_digest(path: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A class-conditional tiny run (3 classes) at step 0 with perturbed weights, and 5 images."""
    tmp = tmp_path_factory.mktemp("finetune")
    config = digits.get_config("cond_tiny")
    config.model.num_classes = 3
    write_untrained_run(config, str(tmp / "base"), perturb=0.05)
    rng = np.random.default_rng(0)
    np.savez(tmp / "five.npz", images=rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8))
    return tmp


def tuning_config(tmp, **changes):
    config = digits.get_config("finetune_tiny")
    values = {"finetune.base": str(tmp / "base"), "finetune.images": str(tmp / "five.npz"),
              "finetune.method": "lora", "finetune.prior_samples": 4,
              "training.num_sample_images": 0, "training.checkpoint_every": 2, **changes}
    for key, value in values.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.mark.slow
def test_lora_run_resumes_bit_for_bit_and_samples_from_merged_params(base_run, tmp_path):
    before = _tree_digest(str(base_run / "base"))
    straight = loop.train_and_evaluate(tuning_config(base_run, **{"training.num_steps": 4}),
                                       str(tmp_path / "straight"))
    # The same run resumed from its step-2 checkpoint (as if it had died before saving step 4).
    workdir = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", workdir)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), "4"))
    resumed = loop.train_and_evaluate(tuning_config(base_run, **{"training.num_steps": 4}), workdir)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    # The state holds the adapters and the new class's row, not the base's weights.
    assert set(straight.params) == {"lora", "rows"} and straight.params["rows"].shape == (1, 64)
    prior = np.load(os.path.join(workdir, finetune.PRIOR_FILE))
    assert prior["images"].shape == (4, 8, 8, 1) and list(prior["labels"]) == [0, 1, 2, 0]
    config, model, params = runs.load_for_sampling(workdir)
    assert config.model.num_classes == 4 and config.finetune.base_step == 0
    _, _, base = runs.load_for_sampling(str(base_run / "base"))
    setup = finetune.resolve(config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    want = adapters.merge(setup.base_params, resumed.ema_params, setup.transform)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    # Frozen leaves are the base's, bit for bit; the adapted kernels and the new row trained.
    for path, leaf in adapters.flat(setup.base_params).items():
        merged = adapters.flat(params)[path]
        if path in setup.transform.lora_paths:
            assert not np.array_equal(merged, leaf), path
        elif path == adapters.EMBED_PATH:
            np.testing.assert_array_equal(np.delete(merged, 3, 0), np.delete(leaf, 3, 0))
            assert not np.array_equal(merged[3], leaf[3])
        else:
            np.testing.assert_array_equal(merged, leaf, err_msg=path)
    assert params["class_embed"]["embedding"].shape == (5, 64)
    np.testing.assert_array_equal(params["class_embed"]["embedding"][4],
                                  base["class_embed"]["embedding"][3])  # null row, moved
    assert model == config_lib.model_from_config(config)
    assert _tree_digest(str(base_run / "base")) == before


def test_ema_warmup_on_a_fine_tuning_run_is_warned_about(base_run, tmp_path, caplog):
    # The warm-up's decay (1+n)/(10+n) would forget the base's EMA weights the run starts from.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    manager = checkpoint.make_manager(str(tmp_path / "run"), max_to_keep=1)
    for warmup in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            frozen.resolve(tuning_config(base_run, **{"training.ema_warmup": warmup}), None,
                           manager, None, replicated)
        assert ("ema_warmup=True on a fine-tuning run" in caplog.text) == warmup, caplog.text


@pytest.mark.parametrize("change, message", [
    ({"finetune.base": "{tmp}/missing"}, r"config.finetune.base=.*/missing does not exist"),
    ({"model.ch": 8}, r"leaf .* has shape .* in the base run"),
    ({"finetune.new_class": False, "finetune.label": 3}, r"finetune.label=3: the base run has "
                                                          r"classes 0..2"),
    ({"finetune.images": "{tmp}/wide.npz"}, r"'images' of shape \(2, 8, 9, 1\)"),
    ({"finetune.images": "{tmp}/rgb.npz"}, r"'images' of shape \(2, 8, 8, 3\)"),
    ({"finetune.images": "{tmp}/empty.npz"}, r"'images' of shape \(0, 8, 8, 1\)"),
])
def test_bad_inputs_give_one_line_and_leave_the_base_untouched(base_run, tmp_path, change,
                                                               message):
    if not (base_run / "empty.npz").exists():
        for name, shape in (("wide", (2, 8, 9, 1)), ("rgb", (2, 8, 8, 3)), ("empty", (0, 8, 8, 1))):
            np.savez(base_run / f"{name}.npz", images=np.zeros(shape, np.uint8))
    before = _tree_digest(str(base_run / "base"))
    config = tuning_config(base_run, **{k: v.format(tmp=base_run) if isinstance(v, str) else v
                                        for k, v in change.items()})
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert _tree_digest(str(base_run / "base")) == before
    assert not checkpoint.make_manager(str(tmp_path / "run"), max_to_keep=1).all_steps()


@pytest.mark.parametrize("change, message", [
    ({"finetune.method": "dreambooth"}, r"config.finetune.method='dreambooth'"),
    ({"finetune.images": None}, r"config.finetune.images=None: name the images"),
    ({"finetune.label": 1}, r"config.finetune.label=1: new_class=True teaches a new class id"),
    ({"finetune.prior_weight": -1.0}, r"config.finetune.prior_weight=-1.0"),
    ({"lora.targets": ("mlp",)}, r"config.lora.targets=\('mlp',\)"),
    ({"lora.rank": 0}, r"config.lora.rank=0"),
    ({"finetune.row_lr_scale": 0.0}, r"config.finetune.row_lr_scale=0.0: use a value in \(0.0"),
    ({"distill.teacher": "t"}, r"either distils"),
])
def test_validate_names_the_bad_finetune_field(tmp_path, change, message):
    config = tuning_config(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_exclude_labels_leaves_a_class_out_of_the_training_split(digits_data_dir):
    from ddpm_jax import data, parallel

    mesh = parallel.make_mesh()
    kept = data.make_input_iterator("digits", "train", global_batch_size=1000, seed=0,
                                    image_size=8, channels=1, random_flip=False, mesh=mesh,
                                    data_dir=digits_data_dir, shuffle=False, num_epochs=1,
                                    exclude_labels=(9,))
    labels = np.asarray(next(kept)["label"])
    assert 9 not in labels and set(labels) == set(range(9))
    assert kept.get_state()["settings"]["exclude_labels"] == [9]
