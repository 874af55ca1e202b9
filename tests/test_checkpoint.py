"""Checkpoints: config checks, corrupt and half-written checkpoints, kill -9 mid-save."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoint, checksums, runs

CONFIG = {"model": {"ch": 16, "ch_mult": [1, 2], "remat": False},
          "diffusion": {"timesteps": 1000, "schedule": "linear"},
          "data": {"image_size": 8, "channels": 1, "random_flip": False},
          "training": {"lr": 1e-3, "batch_size": 8}}


def _with(**changes):
    """A copy of CONFIG with dotted keys changed: _with(**{"model.ch": 32})."""
    config = {section: dict(values) for section, values in CONFIG.items()}
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _state(scale):
    return {"params": {"w": jnp.full((3, 4), scale, jnp.float32)},
            "step": jnp.asarray(int(scale), jnp.int32)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))


def test_config_differences_name_every_changed_key_and_ignore_the_rest():
    current = _with(**{"model.ch": 32, "diffusion.schedule": "cosine", "data.image_size": 16,
                       "training.lr": 5e-4, "training.batch_size": 64, "model.remat": True,
                       "data.random_flip": True})
    assert checkpoint.config_differences(CONFIG, current) == [
        "data.image_size: saved 8, now 16",
        'diffusion.schedule: saved "linear", now "cosine"',
        "model.ch: saved 16, now 32",
    ]
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)step 1200 .*model\.ch: saved 16, now 32"):
        checkpoint.check_config_compatible(CONFIG, current, step=1200, directory="somewhere")
    checkpoint.check_config_compatible(CONFIG, _with(**{"training.lr": 1.0}), step=1, directory="x")


def test_restore_refuses_other_config_and_corrupt_checkpoint_deleting_nothing(tmp_path):
    workdir = str(tmp_path)
    manager = checkpoint.make_manager(workdir, max_to_keep=5)
    for step in (1, 2):
        checkpoint.save(manager, step, _state(float(step)), CONFIG)
    manager.wait_until_finished()
    manager.close()

    manager = checkpoint.make_manager(workdir, max_to_keep=5)
    restored = checkpoint.restore(manager, 2, _abstract(), CONFIG)
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 4), 2.0))
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)step 2 .*model\.ch_mult: saved \[1, 2\]"):
        checkpoint.restore(manager, 2, _abstract(), _with(**{"model.ch_mult": [1, 2, 2]}))

    # Corrupt step 2's array data: restoring it fails naming the step; nothing is deleted.
    step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), "2")
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            if not name.startswith("_") and "metadata" not in name:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)step 2 .*corrupt.*Nothing was deleted"):
        checkpoint.restore(manager, 2, _abstract(), CONFIG)
    manager.close()
    manager = checkpoint.make_manager(workdir, max_to_keep=5)
    assert list(manager.all_steps()) == [1, 2] and os.path.isdir(step_dir)
    restored = checkpoint.restore(manager, 1, _abstract(), CONFIG)
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 4), 1.0))
    manager.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_refuses_a_non_finite_state_naming_the_array_and_the_newest_finite_step(tmp_path, bad):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5, async_save=False)
    with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 1: \['ema'\]\['w'\] hold NaN or "
                       r"inf; there is no checkpoint in .* yet"):
        checkpoint.save(manager, 1, {"ema": {"w": jnp.full((3,), bad)}, "n": jnp.int32(1)}, CONFIG)
    checkpoint.save(manager, 2, _state(2.0), CONFIG)
    state = _state(3.0)
    state["params"]["v"] = jnp.ones((2,)).at[1].set(bad)
    state["params"]["w"] = state["params"]["w"].at[0, 0].set(bad)
    with pytest.raises(checkpoint.NonFiniteStateError,
                       match=r"step 3: \['params'\]\['v'\] and 1 more arrays hold NaN or inf; the "
                             r"newest checkpoint, step 2 in .*, is finite"):
        checkpoint.save(manager, 3, state, CONFIG)
    assert list(manager.all_steps()) == [2]
    assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["2"]
    manager.close()


_KILLED_MID_SAVE = textwrap.dedent("""
    import glob, os, signal, sys, time
    import jax.numpy as jnp
    from ddpm_jax import checkpoint, checksums
    workdir = sys.argv[1]
    config = {"model": {"ch": 16}}
    manager = checkpoint.make_manager(workdir, max_to_keep=3)
    checkpoint.save(manager, 1, {"w": jnp.full((4,), 1.0)}, config)
    manager.wait_until_finished()
    big = jnp.asarray(__import__("numpy").random.default_rng(0).standard_normal(48_000_000,
                                                                              dtype="float32"))
    checkpoint.save(manager, 2, {"w": big}, config)      # async: returns while writing
    tmp = os.path.join(checkpoint.checkpoint_dir(workdir), "2.orbax-checkpoint-tmp*")
    deadline = time.time() + 30
    while not glob.glob(tmp) and time.time() < deadline:
        time.sleep(0.01)
    print("tmp dirs:", glob.glob(tmp), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_kill_9_during_async_save_leaves_previous_checkpoint_restorable(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, workdir], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    leftovers = [name for name in os.listdir(ckpt_dir) if "tmp" in name]
    assert leftovers, f"the save finished before the kill; nothing tested: {proc.stdout}"
    assert not os.path.exists(os.path.join(ckpt_dir, "2"))

    manager = checkpoint.make_manager(workdir, max_to_keep=3)
    assert list(manager.all_steps()) == [1]
    restored = checkpoint.restore(manager, 1, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)},
                                  {"model": {"ch": 16}})
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    manager.wait_until_finished()
    manager.close()
    # orbax removes the half-written dir in a background thread started when the manager opens
    # (awaited only by its next save), so give that thread a moment.
    deadline = time.time() + 20
    while [name for name in os.listdir(ckpt_dir) if "tmp" in name] and time.time() < deadline:
        time.sleep(0.05)
    assert not [name for name in os.listdir(ckpt_dir) if "tmp" in name], "half-written dir kept"


def test_keeps_the_latest_n_plus_milestones(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, keep_period=4,
                                      async_save=False)
    for step in range(1, 10):
        checkpoint.save(manager, step, _state(float(step)), CONFIG)
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [4, 8, 9]  # milestones 4, 8; latest two 8, 9
    manager.close()


def test_checksums_name_every_leaf_and_change_with_any_element():
    tree = {"params": {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
            "step": jnp.int32(7), "rng": jax.random.key(0), "mask": jnp.array([True, False])}
    sums = checksums.array_checksums(tree)
    assert sorted(sums) == ["mask", "params/w", "rng", "step"]
    assert sums["params/w"]["shape"] == [2, 3] and sums["params/w"]["dtype"] == "bfloat16"
    changed = checksums.array_checksums({**tree, "params": {"w": tree["params"]["w"].at[1, 2].add(1)}})
    assert changed["params/w"]["crc32"] != sums["params/w"]["crc32"]
    assert {k: v for k, v in changed.items() if k != "params/w"} == {
        k: v for k, v in sums.items() if k != "params/w"}


# ------------------------------------------- issue 29: a run that is training, a hand-edited copy

@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A tiny digits run's work dir with steps 1 and 2 (the same untrained weights)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs import digits
    from ddpm_jax import config as config_lib, training
    config = digits.get_config("tiny")
    config.data.image_size, config.model.attn_resolutions = 8, (4,)
    model, optimizer = config_lib.model_from_config(config), config_lib.optimizer_from_config(config)
    state = jax.jit(lambda key: training.create_train_state(  # jit: seconds, not ~25 s eager
            model, optimizer, key, config_lib.image_shape(config)))(jax.random.PRNGKey(0))
    workdir = tmp_path_factory.mktemp("run")
    manager = checkpoint.make_manager(str(workdir), max_to_keep=5)
    for step in (1, 2):
        checkpoint.save(manager, step, state, config)
    manager.wait_until_finished()
    manager.close()
    return workdir, config


def _rotate_during_the_first_restore(monkeypatch, workdir, tmp_path):
    """Step 2 is hidden; the first restore call finds step 1 rotated away and step 2 written,
    as a trainer with keep 1 would do while sample.py loads."""
    import shutil
    import orbax.checkpoint as ocp
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    shutil.move(os.path.join(checkpoint.checkpoint_dir(str(run)), "2"), tmp_path / "aside")
    real, calls = ocp.CheckpointManager.restore, []

    def restore(self, step, *args, **kwargs):
        if not calls:
            calls.append(step)
            shutil.move(tmp_path / "aside", os.path.join(checkpoint.checkpoint_dir(str(run)), "2"))
            shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(str(run)), "1"))
        return real(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    return str(run), calls


def test_a_step_rotated_away_while_loading_is_retried_on_the_newest(two_steps, tmp_path,
                                                                  monkeypatch, caplog):
    # Before: "The checkpoint is incomplete or corrupt ... move or delete checkpoints/1", which
    # would make a user delete good data.
    run, calls = _rotate_during_the_first_restore(monkeypatch, two_steps[0], tmp_path)
    config, model, params = runs.load_for_sampling(run)
    assert calls == [1] and config.model.ch == two_steps[1].model.ch and params
    assert "step 1 in" in caplog.text and "was rotated away while loading" in caplog.text
    assert "loading the newest one instead" in caplog.text
    assert runs.load_step_for_sampling(run)[0] == 2


def test_an_explicit_step_rotated_away_while_loading_says_so(two_steps, tmp_path, monkeypatch):
    run, _ = _rotate_during_the_first_restore(monkeypatch, two_steps[0], tmp_path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"^The checkpoint at step 1 in .* was rotated away while loading \(a "
                             r"running trainer keeps only its newest checkpoints\): pass a newer "
                             r"--step, or none for the newest\.$"):
        runs.load_for_sampling(run, step=1)


def test_a_hand_edited_config_json_is_named_and_the_checkpoints_config_used(two_steps, tmp_path,
                                                                          caplog):
    # Before: config.json was silently ignored by sample.py / evaluate.py.
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(two_steps[0], run)
    edited = checkpoint.config_to_dict(two_steps[1])
    edited["model"]["ch"], edited["sampling"]["steps"] = 32, 7
    (run / "config.json").write_text(json.dumps(edited))
    config, _, _ = runs.load_for_sampling(str(run))
    assert config.model.ch == 16  # the checkpoint's
    assert ("config.json differs from the config saved with the checkpoint of step 2 "
            "(model.ch: checkpoint 16, config.json 32; sampling.steps: checkpoint") in caplog.text
    assert "the checkpoint's config is used" in caplog.text
    caplog.clear()
    (run / "config.json").write_text(json.dumps(checkpoint.config_to_dict(two_steps[1])))
    runs.load_for_sampling(str(run))
    assert "config.json" not in caplog.text  # an unedited copy: nothing to say
