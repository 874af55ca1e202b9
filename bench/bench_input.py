"""Input throughput (images/s) of make_input_iterator.

    python bench/bench_input.py                      # offline digits, 32x32, batch 128
    python bench/bench_input.py --dataset=cifar10 --image_size=32 --data_dir=~/tensorflow_datasets

Times the full pipeline (read, shuffle, flip, batch, device transfer, scaling to [-1, 1]),
waiting for each batch to be on the device.
"""

import tempfile
import time

import jax
from absl import app, flags

from ddpm_jax import data, parallel

_DATASET = flags.DEFINE_string("dataset", "digits", "Data set name (digits needs no files).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image size (digits: 8, 16 or 32).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 200, "Timed batches (after 10 warm-up).")
_NUM_THREADS = flags.DEFINE_integer("num_threads", None, "Reader threads (default min(8, CPUs)).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (digits: a temporary one).")


def main(argv: list[str]) -> None:
    del argv
    name, size = _DATASET.value, _IMAGE_SIZE.value
    data_dir = _DATA_DIR.value or (tempfile.mkdtemp() if name == "digits" else None)
    data.prepare_dataset(name, data_dir, image_size=size)
    iterator = data.make_input_iterator(
        name, "train", global_batch_size=_BATCH_SIZE.value, seed=0, image_size=size,
        channels=1 if name == "digits" else 3, random_flip=True, mesh=parallel.make_mesh(),
        data_dir=data_dir, num_threads=_NUM_THREADS.value)
    for _ in range(10):
        jax.block_until_ready(next(iterator))
    start = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
        jax.block_until_ready(next(iterator))
    seconds = time.perf_counter() - start
    images = _NUM_BATCHES.value * _BATCH_SIZE.value
    print(f"{name} {size}x{size}, batch {_BATCH_SIZE.value}, {jax.device_count()} "
          f"{jax.default_backend()} device(s): {images / seconds:,.0f} images/s "
          f"({1e3 * seconds / _NUM_BATCHES.value:.2f} ms/batch)")


if __name__ == "__main__":
    app.run(main)
