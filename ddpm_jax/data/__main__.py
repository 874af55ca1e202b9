"""Prepares a data set once: python -m ddpm_jax.data cifar10 --data_dir=~/tensorflow_datasets"""

from absl import app, flags, logging

from ddpm_jax.data import builders, pipeline

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Source files (default data_dir/downloads/manual; for folder: the images).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Size for digits (8/16/32) and folder.")
_SKIP_BAD = flags.DEFINE_boolean(
    "skip_bad_images", False, "Image sets (folder, celebahq, lsun_*): leave out the images that "
    f"do not decode, listed in {builders.BAD_IMAGES_FILE} beside the prepared data (default: "
    "stop at the first, naming it).")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(f"Name one data set of {pipeline.NAMES}.")
    try:
        path = pipeline.prepare_dataset(argv[1], _DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                                        image_size=_IMAGE_SIZE.value,
                                        skip_bad_images=_SKIP_BAD.value)
    except (pipeline.DataNotPreparedError, builders.BadImageError) as e:
        raise app.UsageError(str(e)) from None
    logging.info("Prepared %s in %s.", argv[1], path)


if __name__ == "__main__":
    app.run(main)
