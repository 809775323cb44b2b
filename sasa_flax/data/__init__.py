"""Datasets -> tf.data -> per-process NumPy batches of uint8 images.

  splits.py    ``Split`` (random access or streamed) and ``Dataset`` (a source's two splits)
  sources.py   the source registry, ``load``, the digits and TFDS sources, the tuning split
  folders.py   the ``"folder"`` source (class folders, local or gs://)
  augment.py   the augmentation registry and the built-in ones; ``normalise``
  pipeline.py  epochs, order, batches and sharding over processes (read its docstring)

A new dataset is one function registered with ``@data.register_source("name")`` (in any
module the config imports); a new augmentation one ``data.register_augmentation`` call.
The names below are the pipeline's public API (``from sasa_flax import data``).
"""

from sasa_flax.data.augment import (
    AUGMENTATIONS,
    MEAN_RGB,
    STDDEV_RGB,
    Augmentation,
    normalise,
    register_augmentation,
)
from sasa_flax.data.folders import FolderTree, scan_folder  # registers "folder"
from sasa_flax.data.pipeline import (
    eval_batches,
    examples,
    num_eval_batches,
    steps_per_epoch,
    train_batches,
)
from sasa_flax.data.sources import (
    SOURCES,
    TUNING_FRACTION,
    load,
    register_source,
    tuning_holdout,
)
from sasa_flax.data.splits import Dataset, DatasetError, Split, array_split, file_split

__all__ = [
    "AUGMENTATIONS",
    "MEAN_RGB",
    "SOURCES",
    "STDDEV_RGB",
    "TUNING_FRACTION",
    "Augmentation",
    "Dataset",
    "DatasetError",
    "FolderTree",
    "Split",
    "array_split",
    "eval_batches",
    "examples",
    "file_split",
    "load",
    "normalise",
    "num_eval_batches",
    "register_augmentation",
    "register_source",
    "scan_folder",
    "steps_per_epoch",
    "train_batches",
    "tuning_holdout",
]
