"""TFDS builders and the grain input pipeline.

Data sets (config names): "digits" (scikit-learn's, offline, sizes 8/16/32), "cifar10",
"celebahq", "lsun_church", "lsun_bedroom", "lsun_cat" (256x256), "folder" (your images), and
"tfds:<name>" for any TFDS data set prepared as array_record. Reading needs no TensorFlow.

Checkpointing: the iterator is a `grain.DatasetIterator`; save it in the same orbax checkpoint
as the train state with `grain.checkpoint.CheckpointSave(iterator)` and restore it with
`grain.checkpoint.CheckpointRestore(iterator)` (one JSON file per process).
"""

from ddpm_jax.data import builders  # registers the ddpm_* TFDS builders
from ddpm_jax.data.builders import DataShapeError
from ddpm_jax.data.pipeline import (
    NAMES,
    DataNotPreparedError,
    InputIterator,
    default_data_dir,
    load_split_uint8,
    make_input_iterator,
    num_examples,
    prepare_dataset,
    tfds_name,
)

__all__ = [
    "NAMES", "DataNotPreparedError", "DataShapeError", "InputIterator", "builders",
    "default_data_dir",
    "load_split_uint8", "make_input_iterator", "num_examples", "prepare_dataset", "tfds_name",
]
