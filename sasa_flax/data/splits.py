"""A dataset's splits: how a source hands its examples to the pipeline.

A ``Split`` is read by random access to the whole split (``array_split``, ``file_split``:
arrays, folders) or streamed, each process its share (TFDS record files); a ``Dataset``
holds a source's two splits, each built when first used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sasa_flax.errors import UserError
from sasa_flax.quiet_tensorflow import tf


class DatasetError(UserError):
    """The dataset cannot be read as configured; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split. An example is ``(image, label, id)``: the image as encoded bytes
    (``encoded=True``) or uint8 (H, W, 3), an int32 label, and a string that names the
    example in error messages (its path, TFDS record id, or index).

    Exactly one of:
      - ``read(index)``: random access to example ``index`` (int64 scalar tensor) of the
        *whole* split. The pipeline permutes the split each epoch and deals it out to
        the processes (see the module docstring);
      - ``stream(shuffle_seed)``: this process's share of the split as a tf.data.Dataset,
        its files in an order drawn from ``shuffle_seed`` (None: stored order).
    """

    size: int  # examples in the whole split (all processes)
    encoded: bool  # images are encoded bytes (any format TensorFlow decodes)
    name: str = ""  # how an error names the split ("split 'train[:96%]' of TFDS imagenet2012")
    read: Callable | None = None
    stream: Callable | None = None

    def __post_init__(self):
        if (self.read is None) == (self.stream is None):
            raise ValueError("a Split has exactly one of read= and stream=")


class Dataset:
    """A source's two splits and its number of classes, for one process of
    ``process_count``. ``train`` and ``eval`` are each given as a ``Split`` or as a
    function of no arguments that builds one, called when the split is first used: so
    evaluating a checkpoint never lists, opens or sizes the training split."""

    def __init__(
        self,
        train,
        eval,
        num_classes: int,
        process_index: int = 0,  # noqa: A002
        process_count: int = 1,
    ):
        self._splits = dict(train=train, eval=eval)
        self.num_classes, self.process_index, self.process_count = (
            num_classes,
            process_index,
            process_count,
        )

    def _split(self, name: str) -> Split:
        split = self._splits[name]
        if not isinstance(split, Split):
            split = self._splits[name] = split()
        return split

    @property
    def train(self) -> Split:
        return self._split("train")

    @property
    def eval(self) -> Split:
        return self._split("eval")

    def for_process(self, process_index: int, process_count: int) -> Dataset:
        return Dataset(
            **self._splits,
            num_classes=self.num_classes,
            process_index=process_index,
            process_count=process_count,
        )


def array_split(images: np.ndarray, labels: np.ndarray, name: str = "") -> Split:
    """A random-access split of uint8 images (N, H, W, 3) held in memory."""
    images_t, labels_t = tf.constant(images), tf.constant(labels, tf.int32)

    def read(index):
        return images_t[index], labels_t[index], tf.strings.format("example {}", index)

    return Split(size=len(labels), encoded=False, name=name, read=read)


def file_split(files, labels, name: str = "") -> Split:
    """A random-access split of encoded image files (paths, local or gs://)."""
    files_t, labels_t = tf.constant(np.asarray(files, str)), tf.constant(labels, tf.int32)

    def read(index):
        return tf.io.read_file(files_t[index]), labels_t[index], files_t[index]

    return Split(size=len(files), encoded=True, name=name, read=read)
