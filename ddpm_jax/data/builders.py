"""TFDS builders that prepare array_record files without TensorFlow.

- `ddpm_digits/{8,16,32}`: scikit-learn's 1,797 handwritten digits (ships with the package,
  so it works offline); every fifth example (index % 5 == 0) is the test split.
- `ddpm_cifar10`: CIFAR-10 read from the official `cifar-10-binary.tar.gz` (sha256 checked).
- `ddpm_images/<config>`: CelebA-HQ, LSUN and any folder or tar of images, center-cropped
  and resized to a square.

Images are stored as raw uint8 tensors (digits, CIFAR-10) or as PNG / JPEG bytes encoded with
PIL (the rest): both paths avoid TFDS's TensorFlow image encoder. Examples keep the order of the
source (`disable_shuffling`), so every host that prepares its own copy gets the same indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
_CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                  "test": ["test_batch.bin"]}
_CIFAR10_RECORD = 1 + 32 * 32 * 3  # label byte, then R, G, B planes of 32x32

DIGITS_SIZES = (4, 8, 16, 32)
FOLDER_SIZES = (32, 64, 128, 256)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BAD_IMAGES_FILE = "bad_images.txt"  # beside the prepared files: the images left out, one a line


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_cifar10_archive(
    path: str | os.PathLike, sha256: str | None = CIFAR10_SHA256
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses the official binary archive: {split: (images [N,32,32,3] uint8, labels [N] int64)}.

    sha256: the expected checksum (None skips the check); a mismatch raises ValueError.
    """
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise ValueError(
            f"{path} has sha256 {actual}, expected {sha256}: the file is damaged or is not "
            f"the official CIFAR-10 binary archive. Download it again from {CIFAR10_URL}."
        )
    out = {}
    with tarfile.open(path, "r:*") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for split, names in _CIFAR10_FILES.items():
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"{path} lacks {missing}; is it cifar-10-binary.tar.gz?")
            raw = b"".join(tar.extractfile(members[n]).read() for n in names)
            records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR10_RECORD)
            images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            out[split] = (np.ascontiguousarray(images), records[:, 0].astype(np.int64))
    return out


def digits_arrays(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits: {split: (images [N,size,size,1] uint8, labels [N] int64)}.

    The 0..16 ink counts map to round(v * 255 / 16); sizes above 8 are bicubic upsamplings;
    size 4 is the rounded mean of each 2x2 block of the 8x8 image (the low-pass that the
    super-resolution runs condition on: the first stage of a 4x4 -> 8x8 cascade).
    """
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    if size not in DIGITS_SIZES:
        raise ValueError(f"digits image_size={size} is not one of {DIGITS_SIZES}.")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if size == 4:
        blocks = images.astype(np.float64).reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
        images = np.round(blocks).astype(np.uint8)
    elif size != 8:
        images = np.stack([
            np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BICUBIC))
            for x in images])
    images = images[..., None]
    is_test = np.arange(len(images)) % 5 == 0
    return {"train": (images[~is_test], digits.target[~is_test].astype(np.int64)),
            "test": (images[is_test], digits.target[is_test].astype(np.int64))}


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Scales the short side to `size` (bicubic), then crops the central size x size square."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))



class DataShapeError(ValueError):
    """The config asks for images of another shape than the data set stores (one line)."""


def check_stored_shape(name: str, stored: tuple, image_size: int | None,
                       channels: int | None) -> None:
    """DataShapeError (one line) when the config's (size, size, channels) is not the stored
    shape (None: any)."""
    wanted = (image_size, image_size, channels)
    for have, want in zip(stored, wanted):
        if have is not None and want is not None and have != want:
            raise DataShapeError(
                f"{name} stores images of shape {stored} (H, W, C) but the config asks for "
                f"{wanted}: set --config.data.image_size={stored[0]} and "
                f"--config.data.channels={stored[2]} (or those fields of the config file), or "
                "pick a data set of the wanted size.")


def fit_image(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Center-crops and resizes an image of another size; converts gray <-> RGB."""
    if image.shape == (image_size, image_size, channels):
        return image
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    pil = center_crop_resize(pil.convert("L" if channels == 1 else "RGB"), image_size)
    return np.asarray(pil).reshape(image_size, image_size, channels)


def iter_image_files(source: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes) of every image in a folder (recursive, sorted) or a tar archive."""
    source = os.fspath(source)
    if os.path.isdir(source):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(source)
                       for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        for path in paths:
            with open(path, "rb") as f:
                yield os.path.relpath(path, source), f.read()
        return
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                yield member.name, tar.extractfile(member).read()


class BadImageError(ValueError):
    """An image of a folder or tar that does not decode."""


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Finds its own folder from __file__: TFDS's importlib.resources look-up fails when
    ddpm_jax is imported as a namespace package (as some editable installs do)."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)


class DdpmDigits(_LocalBuilder):
    """scikit-learn's 8x8 handwritten digits as uint8 images, optionally upsampled."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(s), description=f"{s}x{s} digits")
                       for s in DIGITS_SIZES]
    DEFAULT_CONFIG_NAME = "16"

    def _info(self) -> tfds.core.DatasetInfo:
        size = int(self.builder_config.name)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        arrays = digits_arrays(int(self.builder_config.name))
        return {split: self._generate_examples(*xy) for split, xy in arrays.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": label}


class DdpmCifar10(_LocalBuilder):
    """CIFAR-10 (50,000 train / 10,000 test) from the official binary archive."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {CIFAR10_ARCHIVE} (from {CIFAR10_URL}, sha256 {CIFAR10_SHA256}) in manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            disable_shuffling=True,
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager):
        # A module-level lookup at call time, so tests can substitute the checksum.
        arrays = read_cifar10_archive(dl_manager.manual_dir / CIFAR10_ARCHIVE, CIFAR10_SHA256)
        return {split: self._generate_examples(*xy) for split, xy in arrays.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": label}


@dataclasses.dataclass(eq=False)
class ImagesConfig(tfds.core.BuilderConfig):
    """Square RGB images from a folder or tar in manual_dir.

    sources: candidate names inside manual_dir, the first that exists is read ("" is manual_dir
    itself); encoding: "png" (lossless) or "jpeg" (quality 95, for the large LSUN sets).
    """

    resolution: int = 256
    sources: tuple[str, ...] = ("",)
    encoding: str = "png"


_IMAGE_CONFIGS = [
    ImagesConfig(name="celebahq", resolution=256,
                 sources=("data256x256.tar", "celebahq256", "celebahq")),
    ImagesConfig(name="lsun_church", resolution=256, encoding="jpeg",
                 sources=("church_outdoor_train", "lsun_church")),
    ImagesConfig(name="lsun_bedroom", resolution=256, encoding="jpeg",
                 sources=("bedroom_train", "lsun_bedroom")),
    ImagesConfig(name="lsun_cat", resolution=256, encoding="jpeg", sources=("cat", "lsun_cat")),
] + [ImagesConfig(name=f"folder_{s}", resolution=s) for s in FOLDER_SIZES]


def find_source(manual_dir: str | os.PathLike, config: ImagesConfig) -> str | None:
    """The first of config.sources that exists in manual_dir, or None."""
    for name in config.sources:
        path = os.path.join(manual_dir, name) if name else os.fspath(manual_dir)
        if os.path.exists(path) and (name or any(True for _ in iter_image_files(path))):
            return path
    return None


class DdpmImages(_LocalBuilder):
    """CelebA-HQ, LSUN or a user's images, center-cropped to a square (train split only)."""

    BUILDER_CONFIGS = _IMAGE_CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the images (a folder or a tar) in manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.resolution
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3),
                                             encoding_format=self.builder_config.encoding)}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        source = find_source(dl_manager.manual_dir, self.builder_config)
        if source is None:
            raise FileNotFoundError(
                f"None of {self.builder_config.sources} with images in {dl_manager.manual_dir}.")
        return {"train": self._generate_examples(source)}

    # Set by the caller before download_and_prepare: leave out the images that do not decode
    # (listed in bad_images) instead of failing at the first one.
    skip_bad_images = False

    def _generate_examples(self, source):
        config = self.builder_config
        self.bad_images = []
        for i, (name, data) in enumerate(iter_image_files(source)):
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                image = image.convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                path = os.path.join(source, name) if os.path.isdir(source) else f"{source}:{name}"
                if not self.skip_bad_images:
                    raise BadImageError(
                            f"{path} cannot be decoded ({type(e).__name__}: {e}): remove or "
                            "replace it, or pass --skip_bad_images to leave out every image that "
                            "does not decode (they are listed beside the prepared data).") from None
                self.bad_images.append(f"{path}\t{type(e).__name__}: {e}")
                continue
            image = center_crop_resize(image, config.resolution)
            buffer = io.BytesIO()
            image.save(buffer, format=config.encoding.upper(),
                       **({"quality": 95} if config.encoding == "jpeg" else {}))
            yield i, {"image": buffer.getvalue()}
