"""The grain input pipeline over prepared TFDS array_record files (no TensorFlow).

Order is a pure function of (seed, epoch, step): each epoch is a seeded global permutation of
the split; global batch b holds stream positions [b * B, (b + 1) * B); the host whose devices
own rows [r, r + B_local) of the global array reads exactly those positions; flips are drawn
from (seed, b) for all B rows. So batches do not depend on the number of hosts or threads.
grain runs the batch reads in threads, prefetches, and holds the iterator state (the number
of batches consumed).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.sharding import Mesh
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from ddpm_jax import parallel
from ddpm_jax.images import to_model_range
from ddpm_jax.data import builders

Array = jax.Array

NAMES = ("digits", "cifar10", "celebahq", "lsun_church", "lsun_bedroom", "lsun_cat", "folder")
_LSUN_EXPORT = ("LSUN ships LMDB databases: export them to image files once with the "
                "official tool (github.com/fyu/lsun: python3 data.py export "
                "<category>_train_lmdb --out_dir <folder> --flat).")


class DataNotPreparedError(FileNotFoundError):
    """A data set is not prepared in data_dir and its source files are missing."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(data_dir))


def tfds_name(name: str, image_size: int | None = None) -> str:
    """The TFDS builder name of a config's data set name, e.g. "digits", 16 -> "ddpm_digits/16".

    "tfds:NAME" passes any TFDS data set prepared as array_record (e.g. "tfds:celeb_a_hq/256").
    """
    if name.startswith("tfds:"):
        return name[len("tfds:"):]
    if name == "digits":
        return f"ddpm_digits/{image_size or 16}"
    if name == "cifar10":
        return "ddpm_cifar10"
    if name in ("celebahq", "lsun_church", "lsun_bedroom", "lsun_cat"):
        return f"ddpm_images/{name}"
    if name == "folder":
        if image_size not in builders.FOLDER_SIZES:
            raise ValueError(f"folder needs image_size in {builders.FOLDER_SIZES}, "
                             f"got {image_size}.")
        return f"ddpm_images/folder_{image_size}"
    raise ValueError(f"Unknown data set {name!r}: use one of {NAMES} or 'tfds:<tfds name>'.")


def _builder(name: str, data_dir: str, image_size: int | None) -> tfds.core.DatasetBuilder:
    if name == "digits" and image_size not in (None, *builders.DIGITS_SIZES):
        raise ValueError(f"digits is built at sizes {builders.DIGITS_SIZES}; the config asks "
                         f"image_size={image_size}. Set image_size to one of them.")
    return tfds.builder(tfds_name(name, image_size), data_dir=data_dir,
                        file_format="array_record")


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Looking for the folder first keeps TFDS from logging a warning per missing folder.
    return os.path.isdir(builder.data_dir) and builder.is_prepared()


def _missing_message(name: str, builder: tfds.core.DatasetBuilder, data_dir: str,
                     manual_dir: str) -> str:
    where = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else (
        builder.name)
    head = f"Data set {name!r} is not prepared in {builder.data_dir} ({where}). "
    if name.startswith("tfds:"):
        return head + (
            "Prepare it once on a machine with TensorFlow (pip install tensorflow-cpu): "
            f"tfds build {builder.name} --data_dir={data_dir} --file_format=array_record "
            "(copy that folder here if built elsewhere); reading needs no TensorFlow.")
    prepare = f"then run: python -m ddpm_jax.data {name} --data_dir={data_dir}"
    if name == "folder":
        size = builder.builder_config.resolution
        prepare += f" --image_size={size} --manual_dir=<your folder of images>"
    if name == "cifar10":
        return head + (
            f"Place {builders.CIFAR10_ARCHIVE} at "
            f"{os.path.join(manual_dir, builders.CIFAR10_ARCHIVE)} (download "
            f"{builders.CIFAR10_URL}, sha256 {builders.CIFAR10_SHA256}), {prepare}.")
    sources = [os.path.join(manual_dir, s) if s else manual_dir
               for s in builder.builder_config.sources]
    extra = " " + _LSUN_EXPORT if name.startswith("lsun") else ""
    return head + (f"Place the images (a folder, or a tar of PNG/JPEG/WebP files) at "
                   f"{' or '.join(sources)}, {prepare}.{extra}")


def _has_source(name: str, builder: tfds.core.DatasetBuilder, manual_dir: str) -> bool:
    if name == "digits":
        return True
    if name == "cifar10":
        return os.path.isfile(os.path.join(manual_dir, builders.CIFAR10_ARCHIVE))
    if isinstance(builder.builder_config, builders.ImagesConfig):
        return builders.find_source(manual_dir, builder.builder_config) is not None
    return False


def prepare_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                    manual_dir: str | os.PathLike | None = None,
                    image_size: int | None = None, skip_bad_images: bool = False) -> str:
    """Prepares a data set as array_record in data_dir (a no-op when already there).

    Image sets (folder, CelebA-HQ, LSUN): the first image that does not decode raises
    builders.BadImageError naming it, unless skip_bad_images: then those images are left out,
    counted in a warning and listed in builders.BAD_IMAGES_FILE beside the prepared files.

    manual_dir holds the source files (default data_dir/downloads/manual; for "folder", the
    folder of images). Raises DataNotPreparedError, naming the file to place, when it lacks
    them. Safe to call from several processes at once on a shared data_dir (one prepares, the
    others use its result). Returns the prepared directory.
    """
    data_dir = default_data_dir(data_dir)
    builder = _builder(name, data_dir, image_size)
    if _is_prepared(builder):
        return os.fspath(builder.data_dir)
    manual_dir = os.path.expanduser(os.fspath(
        manual_dir or os.path.join(data_dir, "downloads", "manual")))
    if not _has_source(name, builder, manual_dir):
        if name == "folder" and os.path.isdir(manual_dir):
            raise DataNotPreparedError(
                    f"No images found in {manual_dir} (searched recursively for "
                    f"{', '.join(builders.IMAGE_SUFFIXES)} files): point --manual_dir at the "
                    "folder that holds the images.")
        raise DataNotPreparedError(_missing_message(name, builder, data_dir, manual_dir))
    logging.info("Preparing %s from %s into %s.", name, manual_dir, builder.data_dir)
    builder.skip_bad_images = skip_bad_images
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except FileExistsError:
        # TFDS writes into a private incomplete.* folder and renames it at the end; when several
        # processes (the hosts of one run, on a shared data dir) prepare at once, every rename
        # but the first fails. The set is then prepared, by the winner: use it.
        builder = _builder(name, data_dir, image_size)
        if not _is_prepared(builder):
            raise
        logging.info("%s was prepared in %s by another process meanwhile; using it.", name,
                     builder.data_dir)
        return os.fspath(builder.data_dir)
    bad = getattr(builder, "bad_images", [])
    if bad:
        listing = os.path.join(os.fspath(builder.data_dir), builders.BAD_IMAGES_FILE)
        with open(listing, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in bad))
        logging.warning("Left out %d image(s) that do not decode (--skip_bad_images), listed in "
                        "%s; the first: %s", len(bad), listing, bad[0])
    return os.fspath(builder.data_dir)


def _prepared_builder(name: str, data_dir: str | os.PathLike | None,
                      image_size: int | None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared data set; digits are prepared on first use."""
    data_dir = default_data_dir(data_dir)
    builder = _builder(name, data_dir, image_size)
    if not _is_prepared(builder):
        if name != "digits":
            manual_dir = os.path.join(data_dir, "downloads", "manual")
            raise DataNotPreparedError(_missing_message(name, builder, data_dir, manual_dir))
        prepare_dataset(name, data_dir, image_size=image_size)
        builder = _builder(name, data_dir, image_size)
    if builder.info.file_format not in (None, tfds.core.FileFormat.ARRAY_RECORD):
        raise ValueError(
            f"{builder.data_dir} holds {builder.info.file_format.value} files; reading without "
            "TensorFlow needs array_record. Rebuild with --file_format=array_record.")
    return builder


class SplitReader:
    """Random access to (image uint8 [H, W, C], label) of a prepared split.

    Reads raw records in batches and parses them directly (several times faster than TFDS's
    per-record deserializer); checked once against TFDS on the first record, and TFDS's own
    reading is used instead wherever the fast path does not reproduce it (e.g. under
    tfds.testing.mock_data, whose batched read is broken in tensorflow-datasets 4.9.10).
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None,
                 image_size: int | None, channels: int | None):
        builder = _prepared_builder(name, data_dir, image_size)
        splits = builder.info.splits
        if splits and split not in splits:
            raise ValueError(f"{name} has splits {sorted(splits)}, not {split!r}.")
        self.stored_shape = tuple(builder.info.features["image"].shape)
        builders.check_stored_shape(name, self.stored_shape, image_size, channels)
        self._raw_size = -1 if None in self.stored_shape else math.prod(self.stored_shape)
        self._decoded = builder.as_data_source(split)
        self._raw = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._fast = len(self._decoded) > 0 and self._fast_path_agrees()

    def __len__(self) -> int:
        return len(self._decoded)

    def _parse(self, record: bytes) -> tuple[np.ndarray, int]:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        image = feature["image"]
        if image.WhichOneof("kind") == "int64_list":
            pixels = np.asarray(image.int64_list.value, np.uint8).reshape(self.stored_shape)
        elif len(data := image.bytes_list.value[0]) == self._raw_size:
            pixels = np.frombuffer(data, np.uint8).reshape(self.stored_shape)
        else:  # an encoded image (PNG, JPEG, ...)
            with Image.open(io.BytesIO(data)) as pil:
                pixels = np.asarray(pil)
            pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        label = feature["label"].int64_list.value[0] if "label" in feature else 0
        return pixels, int(label)

    def _fast_path_agrees(self) -> bool:
        expected = self._decoded[0]
        try:
            image, label = self._parse(self._raw.__getitems__([0])[0])
        except Exception:  # pylint: disable=broad-except
            return False
        return (np.array_equal(image, expected["image"])
                and label == int(expected.get("label", 0)))

    def stored_index(self, indices: np.ndarray) -> np.ndarray:
        """The examples' positions in the split's stored order (here: the indices themselves)."""
        return np.asarray(indices, np.int64)

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """(image, label) of each index, in order."""
        if self._fast:  # one batched read: several times faster than a read per record
            return [self._parse(r) for r in self._raw.__getitems__([int(i) for i in indices])]
        examples = [self._decoded[i] for i in indices]
        return [(ex["image"], int(ex.get("label", 0))) for ex in examples]


class _WithoutLabels:
    """A SplitReader's examples whose label is not in `exclude`, in stored order."""

    def __init__(self, reader: SplitReader, exclude: tuple[int, ...]):
        self._reader = reader
        self.stored_shape = reader.stored_shape
        labels = np.concatenate([
                [label for _, label in reader.read(range(s, min(s + 1024, len(reader))))]
                for s in range(0, len(reader), 1024)] or [np.zeros(0, np.int64)])
        self._keep = np.flatnonzero(~np.isin(labels, exclude))

    def __len__(self) -> int:
        return len(self._keep)

    def stored_index(self, indices: np.ndarray) -> np.ndarray:
        """The kept examples' positions in the split's stored order."""
        return self._keep[np.asarray(indices, np.int64)]

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """(image, label) of each kept index, in order."""
        return self._reader.read(self.stored_index(indices))


def num_examples(name: str, split: str, data_dir: str | os.PathLike | None = None,
                 image_size: int | None = None) -> int:
    """Number of examples in a prepared split."""
    return len(SplitReader(name, split, data_dir, image_size, None))


def load_split_uint8(name: str, split: str, data_dir: str | os.PathLike | None = None,
                     image_size: int | None = None, channels: int | None = None,
                     max_examples: int | None = None) -> np.ndarray:
    """A whole split (or its first max_examples) as uint8 [N, H, W, C], in stored order."""
    reader = SplitReader(name, split, data_dir, image_size, channels)
    size, chans = image_size or reader.stored_shape[0], channels or reader.stored_shape[2]
    count = len(reader) if max_examples is None else min(max_examples, len(reader))
    images = np.empty((count, size, size, chans), np.uint8)
    for start in range(0, count, 1024):
        for i, (image, _) in enumerate(reader.read(range(start, min(start + 1024, count)))):
            images[start + i] = builders.fit_image(image, size, chans)
    return images


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _BatchReader:
    """Global batch index -> this host's rows of that batch, as numpy arrays.

    Global batch b holds stream positions [b * B, (b + 1) * B); position p is example
    permutation(seed, epoch)[p % N] of epoch p // N. Flips come from (seed, b) for all B rows,
    so rows do not depend on which host reads them.
    """

    reader: SplitReader
    total: int | None  # positions in num_epochs epochs; None: endless
    shuffle_seed: int | None  # None: stored order
    flip_seed: int | None  # None: no flips
    global_batch: int
    first_row: int
    local_batch: int
    image_size: int
    channels: int
    with_mask: bool  # add "mask" [B_local] bool: False on padding past the last example
    controls: np.ndarray | None = None  # uint8 [N_stored, H, W, C_c]: add "control", row by row

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        positions = batch_index * self.global_batch + self.first_row + np.arange(
            self.local_batch)
        mask = positions < (self.total if self.total is not None else np.inf)
        epoch, index = np.divmod(positions[mask], len(self.reader))
        if self.shuffle_seed is not None:
            for e in np.unique(epoch):  # a batch spans at most a few epochs
                permutation = _epoch_permutation(self.shuffle_seed, int(e), len(self.reader))
                index[epoch == e] = permutation[index[epoch == e]]
        shape = (self.local_batch, self.image_size, self.image_size, self.channels)
        images, labels = np.zeros(shape, np.uint8), np.zeros(self.local_batch, np.int32)
        for row, (image, label) in zip(np.flatnonzero(mask), self.reader.read(index)):
            images[row], labels[row] = builders.fit_image(image, self.image_size, self.channels), label
        batch = {"image": images, "label": labels}
        if self.controls is not None:  # each row's own control, by its stored position
            controls = np.zeros((self.local_batch, *self.controls.shape[1:]), np.uint8)
            controls[mask] = self.controls[self.reader.stored_index(index)]
            batch["control"] = controls
        if self.flip_seed is not None:
            rows = slice(self.first_row, self.first_row + self.local_batch)
            flip = np.random.default_rng([self.flip_seed, batch_index]).random(
                self.global_batch)[rows] < 0.5
            for name in ("image", "control"):  # a row's control flips with its image
                if name in batch:
                    batch[name][flip] = batch[name][flip, :, ::-1]
        return {**batch, "mask": mask} if self.with_mask else batch


# (x - 127.5) / 127.5 maps 0 and 255 to exactly -1 and 1 even when XLA multiplies by the
# reciprocal, which x / 127.5 - 1 does not.
_to_unit_range = jax.jit(to_model_range)


class InputIterator(grain.DatasetIterator):
    """Yields {"image": [B,H,W,C] float32 in [-1, 1], "label": [B] int32} global arrays (and
    "control" [B,H,W,C_c] float32 in [-1, 1] when the pipeline reads given controls).

    With drop_remainder=False a "mask" [B] bool marks real rows (padding is zeros). Its state
    (get_state / set_state, a JSON-able dict) is the number of global batches consumed plus the
    settings it was made with; set_state refuses a state from other settings.
    """

    def __init__(self, parent: grain.DatasetIterator, mesh: Mesh, settings: dict[str, Any]):
        super().__init__(parent)
        self._mesh = mesh
        self._settings = settings

    def __next__(self) -> dict[str, Array]:
        batch = parallel.host_local_to_global(next(self._parent), self._mesh)
        batch["image"] = _to_unit_range(batch["image"])
        if "control" in batch:
            batch["control"] = _to_unit_range(batch["control"])
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"settings": dict(self._settings), "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["settings"] != self._settings:
            raise ValueError(f"Iterator state was saved with {state['settings']} but this "
                             f"iterator has {self._settings}; restore with the same settings.")
        self._parent.set_state(state["grain"])


def iterator_from_batches(read_batch: Callable[[int], dict[str, np.ndarray]], mesh: Mesh,
                          settings: dict[str, Any], *, num_threads: int = 1,
                          prefetch_batches: int = 4) -> InputIterator:
    """An endless InputIterator over read_batch(global batch index) -> this host's rows (numpy,
    "image" uint8 [B_local, H, W, C] plus any [B_local] columns): batches from memory (e.g.
    fine-tuning's few images) with the same checkpointable position as a data set's."""
    ds = grain.MapDataset.range(sys.maxsize).map(read_batch)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return InputIterator(iter(ds.to_iter_dataset(read)), mesh, settings)


def make_input_iterator(
    name: str, split: str, *, global_batch_size: int, seed: int, image_size: int,
    channels: int, random_flip: bool, mesh: Mesh, data_dir: str | os.PathLike | None = None,
    shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
    num_threads: int | None = None, prefetch_batches: int = 4,
    exclude_labels: Sequence[int] = (),
    controls: np.ndarray | None = None,
) -> InputIterator:
    """The input pipeline for training (defaults) and evaluation (num_epochs=1, no shuffle).

    global_batch_size: rows per step over all hosts, split evenly over mesh devices; each host
    reads only its rows. num_epochs=None repeats forever. drop_remainder=False pads the last
    batch and adds "mask". Labels are 0 for data sets without labels. num_threads: batches
    read in parallel (default min(8, CPUs)); prefetch_batches: batches read ahead.
    exclude_labels: classes left out of the split (every label is read once to find them; the
    rest keep their stored order), e.g. to hold a class out for fine-tuning experiments.
    controls: uint8 [N, H, W, C_c], row n the control image of example n of the split in its
    stored order (N: the split's size before exclude_labels): each batch then holds
    "control" [B, H, W, C_c] in [-1, 1], flipped with its image.
    """
    if global_batch_size <= 0 or global_batch_size % mesh.size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh; use a multiple of {mesh.size}.")
    reader = SplitReader(name, split, data_dir, image_size, channels)
    if controls is not None and (len(controls) != len(reader)
                                 or controls.shape[1:3] != (image_size, image_size)):
        raise ValueError(f"controls of shape {list(controls.shape)} for {name}/{split}: use one "
                         f"per example, [{len(reader)}, {image_size}, {image_size}, C_c].")
    if exclude_labels:
        reader = _WithoutLabels(reader, tuple(int(c) for c in exclude_labels))
    if len(reader) == 0:
        raise ValueError(f"{name}/{split} is empty" + (
                f" without the labels {tuple(exclude_labels)}" if exclude_labels else "") + ".")
    first_row, local_batch = parallel.local_rows(mesh, global_batch_size)
    total = None if num_epochs is None else len(reader) * num_epochs
    if total is None:
        num_batches = sys.maxsize
    elif drop_remainder:
        num_batches = total // global_batch_size
        if num_batches == 0:
            raise ValueError(f"{name}/{split} has {total} examples over {num_epochs} epochs, "
                             f"fewer than global_batch_size={global_batch_size}; use "
                             "drop_remainder=False.")
    else:
        num_batches = -(-total // global_batch_size)
    shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    read_batch = _BatchReader(
        reader, total, shuffle_seed if shuffle else None, flip_seed if random_flip else None,
        global_batch_size, first_row, local_batch, image_size, channels,
        with_mask=not drop_remainder, controls=controls)
    ds = grain.MapDataset.range(num_batches).map(read_batch)
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    settings = dict(name=name, split=split, seed=seed, global_batch_size=global_batch_size,
                    image_size=image_size, channels=channels, random_flip=random_flip,
                    shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder)
    if exclude_labels:  # only then: iterator states saved before the option stay valid
        settings["exclude_labels"] = [int(c) for c in exclude_labels]
    return InputIterator(iter(ds.to_iter_dataset(read)), mesh, settings)
