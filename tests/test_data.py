"""Tests for the TFDS builders and the grain input pipeline (CPU, tiny data, no TensorFlow)."""

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from ddpm_jax import data, parallel
from ddpm_jax.data import builders, pipeline
from multihost import run_on_two_hosts
from conftest import xla_flags


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


def digits_iterator(data_dir, mesh, split="train", **overrides):
    kwargs = dict(global_batch_size=8, seed=0, image_size=8, channels=1, random_flip=True,
                  mesh=mesh, data_dir=data_dir)
    return data.make_input_iterator("digits", split, **{**kwargs, **overrides})


def take(iterator, n):
    return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def to_uint8(images):
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def test_digits_round_trip_against_sklearn(data_dir, mesh, monkeypatch):
    # The work counted, not timed (a loaded machine cannot break a count): scikit-learn's set
    # read once, each of its 1,797 examples generated once (keys count per split: 1437 + 360).
    reads, examples = [], []
    real_arrays, real_generate = builders.digits_arrays, builders.DdpmDigits._generate_examples

    def generate(self, images, labels):
        for key, example in real_generate(self, images, labels):
            examples.append(key)
            yield key, example

    monkeypatch.setattr(builders, "digits_arrays", lambda size: reads.append(size) or real_arrays(size))
    monkeypatch.setattr(builders.DdpmDigits, "_generate_examples", generate)
    data.prepare_dataset("digits", data_dir, image_size=8)
    assert reads == [8] and sorted(examples) == sorted([*range(1437), *range(360)])
    digits = load_digits()
    # Derived independently of the builder: ink counts 0..16 -> 0..255, test = index % 5 == 0.
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    is_test = np.arange(len(expected)) % 5 == 0
    train = data.load_split_uint8("digits", "train", data_dir, image_size=8)
    test = data.load_split_uint8("digits", "test", data_dir, image_size=8)
    np.testing.assert_array_equal(train, expected[~is_test])
    np.testing.assert_array_equal(test, expected[is_test])
    assert data.num_examples("digits", "test", data_dir, image_size=8) == 360
    assert pipeline.SplitReader("digits", "train", data_dir, 8, 1)._fast  # not TFDS's decoder
    it = digits_iterator(data_dir, mesh, global_batch_size=360, split="test", shuffle=False,
                         random_flip=False, num_epochs=1)
    batch = take(it, 1)[0]
    np.testing.assert_array_equal(batch["label"], digits.target[is_test])
    np.testing.assert_array_equal(to_uint8(batch["image"]), expected[is_test])
    with pytest.raises(StopIteration):
        next(it)


def test_the_4px_digits_are_the_2x2_block_means_of_the_8px_ones():
    # The cascade's first stage must see the low-pass the super-resolution runs condition on:
    # each 4x4 pixel the rounded mean of its 2x2 block, by a loop over the blocks.
    four, eight = builders.digits_arrays(4)["test"], builders.digits_arrays(8)["test"]
    np.testing.assert_array_equal(four[1], eight[1])
    expected = np.zeros((len(eight[0]), 4, 4, 1))
    for i in range(4):
        for j in range(4):
            expected[:, i, j] = eight[0][:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].astype(float).mean(
                    axis=(1, 2))
    np.testing.assert_array_equal(four[0], np.round(expected).astype(np.uint8))


def test_controls_given_with_the_data_follow_their_images_through_shuffle_flip_and_exclusion(
        data_dir, mesh):
    # Row n of the controls is example n's in stored order: here 255 - image in channel 0 and
    # the label in channel 1, so every row shows whether it got its own example's control.
    images = data.load_split_uint8("digits", "train", data_dir, image_size=8)
    labels = np.asarray(builders.digits_arrays(8)["train"][1])
    controls = np.concatenate([255 - images, np.broadcast_to(
            labels[:, None, None, None] * 20, images.shape)], axis=-1).astype(np.uint8)
    it = digits_iterator(data_dir, mesh, global_batch_size=64, controls=controls,
                         exclude_labels=(3,))
    flipped = 0
    for batch in take(it, 3):
        got = to_uint8(batch["control"])
        np.testing.assert_array_equal(got[..., :1], 255 - to_uint8(batch["image"]))
        np.testing.assert_array_equal(got[..., 1], np.broadcast_to(
                batch["label"][:, None, None] * 20, got.shape[:3]))
        assert not np.any(batch["label"] == 3)
        stored = images[labels != 3]  # unflipped images of the batch's rows, found by content
        flipped += sum(not any(np.array_equal(x, y) for y in stored)
                       for x in to_uint8(batch["image"]))
    assert flipped > 0  # some rows were flipped, and their controls with them
    with pytest.raises(ValueError, match=r"controls of shape \[5, 8, 8, 2\] for digits/train: "
                                         r"use one per example, \[1437, 8, 8, C_c\]"):
        digits_iterator(data_dir, mesh, controls=controls[:5])


def test_batches_are_global_float_arrays_sharded_over_data(data_dir, mesh):
    batch = next(digits_iterator(data_dir, mesh))
    assert batch["image"].shape == (8, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["image"].sharding == parallel.data_sharding(mesh)
    image = np.asarray(batch["image"])
    assert image.min() >= -1.0 and image.max() <= 1.0
    np.testing.assert_allclose(image, to_uint8(image) / 127.5 - 1.0, atol=1e-6)


def test_same_seed_same_batches_other_seed_other_batches(data_dir, mesh):
    a = take(digits_iterator(data_dir, mesh, seed=3), 3)
    b = take(digits_iterator(data_dir, mesh, seed=3), 3)
    c = take(digits_iterator(data_dir, mesh, seed=4), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_restored_state_gives_the_same_next_batches(data_dir, mesh):
    it = digits_iterator(data_dir, mesh, seed=7)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 3)
    restored = digits_iterator(data_dir, mesh, seed=7)
    restored.set_state(state)
    for x, y in zip(expected, take(restored, 3)):
        np.testing.assert_array_equal(x["image"], y["image"])
    with pytest.raises(ValueError, match="seed"):
        digits_iterator(data_dir, mesh, seed=8).set_state(state)


def test_iterator_state_saves_in_an_orbax_checkpoint(data_dir, mesh, tmp_path):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    it = digits_iterator(data_dir, mesh, seed=1)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("step", "data")) as manager:
        manager.save(4, args=ocp.args.Composite(
            step=ocp.args.JsonSave({"step": 4}), data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 2)
    restored = digits_iterator(data_dir, mesh, seed=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("step", "data")) as manager:
        manager.restore(4, args=ocp.args.Composite(
            step=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(restored)))
    for x, y in zip(expected, take(restored, 2)):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_each_epoch_is_its_own_permutation_and_the_end_is_padded_with_a_mask(data_dir, mesh):
    stored = data.load_split_uint8("digits", "test", data_dir, image_size=8)
    it = digits_iterator(data_dir, mesh, split="test", global_batch_size=64, random_flip=False,
                         num_epochs=2, drop_remainder=False)
    batches = take(it, 12)  # 720 examples padded to 768
    with pytest.raises(StopIteration):
        next(it)
    images = to_uint8(np.concatenate([b["image"] for b in batches]))
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 720 and not mask[720:].any() and not images[720:].any()
    first, second = images[:360], images[360:720]
    key = lambda x: sorted(map(bytes, x))  # noqa: E731
    assert key(first) == key(stored) and key(second) == key(stored)  # each once per epoch
    assert not np.array_equal(first, stored) and not np.array_equal(first, second)


def test_flip_is_random_per_example(data_dir, mesh):
    plain = take(digits_iterator(data_dir, mesh, global_batch_size=64, random_flip=False), 2)
    flipped = take(digits_iterator(data_dir, mesh, global_batch_size=64, random_flip=True), 2)
    was_flipped = []
    for p, f in zip(plain, flipped):
        for x, y in zip(p["image"], f["image"]):
            mirror = x[:, ::-1]
            assert np.array_equal(y, x) or np.array_equal(y, mirror)
            if not np.array_equal(x, mirror):
                was_flipped.append(np.array_equal(y, mirror))
    assert 0.25 < np.mean(was_flipped) < 0.75, np.mean(was_flipped)


def test_mock_data_drives_the_cifar10_path(mesh, monkeypatch):
    monkeypatch.setattr(pipeline, "_is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=20):
        batch = take(data.make_input_iterator(
            "cifar10", "train", global_batch_size=8, seed=0, image_size=32, channels=3,
            random_flip=True, mesh=mesh, data_dir="/nonexistent"), 1)[0]
    assert batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def write_fake_cifar_archive(path, rng):
    """A cifar-10-binary.tar.gz with 3 records per batch file; returns {split: (x, y)}."""
    expected = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, 3, dtype=np.uint8)
            # The official layout: one label byte, then the R, G and B planes, row-major.
            raw = b"".join(bytes([y]) + x.transpose(2, 0, 1).tobytes()
                           for x, y in zip(images, labels))
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            split = expected["test" if name.startswith("test") else "train"]
            split[0].append(images)
            split[1].append(labels)
    return {k: (np.concatenate(x), np.concatenate(y)) for k, (x, y) in expected.items()}


def test_fake_cifar_archive_parses_and_prepares(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    archive = manual / builders.CIFAR10_ARCHIVE
    expected = write_fake_cifar_archive(archive, np.random.default_rng(0))
    with pytest.raises(ValueError, match=builders.CIFAR10_SHA256):
        builders.read_cifar10_archive(archive)  # the official checksum rejects the fake
    parsed = builders.read_cifar10_archive(archive, builders.sha256_of(archive))
    for split in ("train", "test"):
        np.testing.assert_array_equal(parsed[split][0], expected[split][0])
        np.testing.assert_array_equal(parsed[split][1], expected[split][1])
    monkeypatch.setattr(builders, "CIFAR10_SHA256", builders.sha256_of(archive))
    data.prepare_dataset("cifar10", tmp_path / "tfds", manual_dir=manual)
    test = data.load_split_uint8("cifar10", "test", tmp_path / "tfds")
    np.testing.assert_array_equal(test, expected["test"][0])
    assert data.num_examples("cifar10", "train", tmp_path / "tfds") == 15
    assert pipeline.SplitReader("cifar10", "train", tmp_path / "tfds", 32, 3)._fast


def test_missing_data_fails_fast_naming_the_file(tmp_path, mesh, monkeypatch):
    # Fast as in "before any work", counted: nothing prepared (or downloaded), nothing opened.
    calls = []
    for name in ("download_and_prepare", "as_data_source"):
        monkeypatch.setattr(tfds.core.DatasetBuilder, name,
                            lambda self, *args, _name=name, **kwargs: calls.append(_name))
    with pytest.raises(data.DataNotPreparedError) as error:
        data.make_input_iterator("cifar10", "train", global_batch_size=8, seed=0,
                                 image_size=32, channels=3, random_flip=True, mesh=mesh,
                                 data_dir=tmp_path)
    assert calls == []
    assert os.path.join(tmp_path, "downloads", "manual", "cifar-10-binary.tar.gz") in str(
        error.value)


def _folder_with_a_bad_image(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    png = (folder / "0.png").read_bytes()
    (folder / "sub" / "cut.png").write_bytes(png[:len(png) // 2])  # truncated
    (folder / "junk.jpg").write_bytes(b"not an image")
    return folder


def test_folder_with_a_corrupt_image_fails_naming_it_and_the_flag(tmp_path):
    folder = _folder_with_a_bad_image(tmp_path)
    with pytest.raises(builders.BadImageError, match=rf"^{folder}/junk.jpg cannot be decoded .*"
                                                     r"--skip_bad_images"):
        data.prepare_dataset("folder", tmp_path / "tfds", manual_dir=folder, image_size=32)


def test_skip_bad_images_leaves_them_out_counted_and_listed(tmp_path, caplog):
    folder = _folder_with_a_bad_image(tmp_path)
    with caplog.at_level("WARNING"):
        path = data.prepare_dataset("folder", tmp_path / "tfds", manual_dir=folder, image_size=32,
                                    skip_bad_images=True)
    images = data.load_split_uint8("folder", "train", tmp_path / "tfds", image_size=32)
    assert images.shape == (3, 32, 32, 3)
    listed = (Path(path) / builders.BAD_IMAGES_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [f"{folder}/junk.jpg",
                                                        f"{folder}/sub/cut.png"]
    assert "Left out 2 image(s) that do not decode" in caplog.text


def test_an_empty_folder_says_no_images_found(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(data.DataNotPreparedError, match=rf"^No images found in {tmp_path}/empty "):
        data.prepare_dataset("folder", tmp_path / "tfds", manual_dir=tmp_path / "empty",
                             image_size=32)


def test_shape_disagreeing_with_the_config_fails_naming_both(data_dir, mesh):
    with pytest.raises(ValueError, match=r"\(8, 8, 1\).*\(8, 8, 3\)"):
        digits_iterator(data_dir, mesh, channels=3)
    with pytest.raises(ValueError, match="image_size=28"):
        digits_iterator(data_dir, mesh, image_size=28)


def test_folder_of_images_is_center_cropped(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (30 + 10 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    for i, x in enumerate(sources):
        Image.fromarray(x).save(folder / f"{i}.png")
    data.prepare_dataset("folder", tmp_path / "tfds", manual_dir=folder, image_size=32)
    images = data.load_split_uint8("folder", "train", tmp_path / "tfds", image_size=32)
    assert images.shape == (3, 32, 32, 3)
    assert pipeline.SplitReader("folder", "train", tmp_path / "tfds", 32, 3)._fast
    for x, y in zip(sources, images):  # PNG is lossless: exactly the cropped source
        expected = builders.center_crop_resize(Image.fromarray(x), 32)
        np.testing.assert_array_equal(y, np.asarray(expected))


def test_images_of_another_size_are_center_cropped_and_converted():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    fitted = builders.fit_image(wide, 16, 3)
    np.testing.assert_array_equal(
        fitted, np.asarray(builders.center_crop_resize(Image.fromarray(wide), 16)))
    gray = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    rgb = builders.fit_image(gray, 16, 3)
    assert rgb.shape == (16, 16, 3) and (rgb == gray).all()
    square = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert builders.fit_image(square, 16, 3) is square



_PREPARE_WORKER = """
import os, sys, time
from absl import logging
from ddpm_jax.data import pipeline
data_dir, me, other = sys.argv[1:]
logging.set_verbosity(logging.INFO)
real = pipeline._is_prepared
looked = []
def is_prepared_then_wait(builder):
    # Both processes look before either prepares (the hosts of one run starting together).
    found = real(builder)
    if not looked:
        looked.append(True)
        open(os.path.join(data_dir, me), "w").close()
        while not os.path.exists(os.path.join(data_dir, other)):
            time.sleep(0.005)
    return found
pipeline._is_prepared = is_prepared_then_wait
print("PREPARED", pipeline.prepare_dataset("digits", data_dir, image_size=8))
"""


@pytest.mark.slow
def test_processes_preparing_one_data_dir_at_once_all_get_the_set(tmp_path):
    # TFDS renames its finished folder into place; a second process's rename then fails. Both
    # must come back with the prepared set, and no incomplete folder may be left behind.
    data_dir = str(tmp_path / "tfds")
    os.makedirs(data_dir)
    worker = tmp_path / "prepare.py"
    worker.write_text(_PREPARE_WORKER)
    procs = [subprocess.Popen([sys.executable, str(worker), data_dir, me, other],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    prepared = {line.split("PREPARED ", 1)[1] for out in outs for line in out.splitlines()
                if line.startswith("PREPARED ")}
    assert len(prepared) == 1, outs
    # The race really happened: one of the two lost the rename and used the winner's set.
    assert sum("by another process meanwhile" in out for out in outs) == 1, outs
    leftovers = [n for n in os.listdir(os.path.dirname(prepared.pop())) if "incomplete" in n]
    assert not leftovers
    assert data.num_examples("digits", "test", data_dir, image_size=8) == 360

_HOST_WORKER = """
import numpy as np
from ddpm_jax import data
data_dir, = args
assert mesh.size == 4  # 2 hosts x 2 CPU devices
try:
    data.make_input_iterator("digits", "train", global_batch_size=6, seed=5, image_size=8,
                             channels=1, random_flip=True, mesh=mesh, data_dir=data_dir)
except ValueError as e:
    assert "global_batch_size=6" in str(e) and "4 devices" in str(e), e
else:
    raise AssertionError("a batch of 6 over 4 devices was accepted")
it = data.make_input_iterator("digits", "train", global_batch_size=8, seed=5, image_size=8,
                              channels=1, random_flip=True, mesh=mesh, data_dir=data_dir)
rows = []
for _ in range(3):
    shards = sorted(next(it)["image"].addressable_shards, key=lambda s: s.index[0].start)
    rows.append(np.concatenate([np.asarray(s.data) for s in shards]))
np.save(out, np.stack(rows))
"""


@pytest.mark.slow
def test_each_of_two_hosts_reads_its_rows_of_the_same_global_batches(data_dir, mesh, tmp_path):
    # Two local processes on 127.0.0.1 with 2 CPU devices each; their rows, stacked, must be
    # the global batches that a single process reads.
    # The single-process reference first (it also prepares the set; preparing from both hosts
    # at once is its own test above).
    it = digits_iterator(data_dir, mesh, seed=5)
    expected = np.stack([np.asarray(next(it)["image"]) for _ in range(3)])
    outs = run_on_two_hosts(_HOST_WORKER, tmp_path, data_dir, timeout=120)
    np.testing.assert_array_equal(np.load(outs[0]), expected[:, :4])
    np.testing.assert_array_equal(np.load(outs[1]), expected[:, 4:])


@pytest.mark.slow
def test_batch_not_divisible_by_devices_fails_naming_both(data_dir):
    # 8 simulated devices need their own process: the device count is fixed at JAX start-up.
    code = textwrap.dedent(f"""
        from ddpm_jax import data, parallel
        from ddpm_jax.data import pipeline
        opened = []  # data sets opened before the check: the refusal should come first
        real_init = pipeline.SplitReader.__init__

        def counting_init(self, *args, **kwargs):
            opened.append(args)
            real_init(self, *args, **kwargs)

        pipeline.SplitReader.__init__ = counting_init
        try:
            data.make_input_iterator("digits", "train", global_batch_size=12, seed=0,
                                     image_size=16, channels=1, random_flip=False,
                                     mesh=parallel.make_mesh(), data_dir={data_dir!r})
        except ValueError as err:
            print("ERROR", err, "OPENED", len(opened))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ERROR" in out.stdout, out.stderr[-2000:]
    message = out.stdout.split("ERROR", 1)[1]
    assert "global_batch_size=12" in message and "8 devices" in message
    assert int(message.rsplit("OPENED", 1)[1]) == 0
