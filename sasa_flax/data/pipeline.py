"""Splits -> tf.data -> per-process NumPy batches: epochs, order, batches, sharding.

Mixing. A split is read one of two ways (``Split``):
  - random access (arrays, folders): every epoch is a fresh permutation of the *whole*
    split, drawn from (seed, epoch) and dealt out batch by batch to the processes, so the
    stream is perfectly mixed however large the split is (ImageNet as a class-sorted folder
    tree: 1.28M files) and needs no shuffle buffer. All epochs are one tf.data pipeline,
    so an epoch boundary is not a pause.
  - streaming (TFDS record files): each process reads its own 1/P of the split, its files
    in an order drawn from (seed, epoch), 16 files interleaved record by record and
    decoded in parallel, through a ``config.input.shuffle_buffer`` shuffle. TFDS writes
    records in a random order when it prepares a dataset, so this is well mixed too. The
    next epoch's pipeline is built, and its buffer filled, while this one is read.

Determinism and resumption: the training stream is a pure function of (seed, step)
(augmentations draw from the example's global position, see ``augment``).
``train_batches(..., start_step=s)`` skips the examples already consumed, before any
decoding, so a resumed run sees exactly the batches an uninterrupted run would.

Batches: {"image": (b, S, S, 3) uint8, "label": (b,) int32, "mask": (b,) float32}, b =
global batch / process count; images are normalised on the device (``normalise``), so a
quarter of float32's bytes cross to it. An epoch has floor(N / global batch) steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import re
import threading
from collections.abc import Callable, Iterator

import numpy as np

# isort: off
from sasa_flax.quiet_tensorflow import tf  # first: TensorFlow's start-up lines silenced
import tensorflow_datasets as tfds

# isort: on
from sasa_flax.data.augment import eval_preprocess, train_preprocess
from sasa_flax.data.splits import Dataset, DatasetError, Split

DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)
_STREAM_LOCK = threading.Lock()


def _map_images(ds, fn, input_config):
    """``ds.map(fn)`` in order, in parallel. Under ``corrupt_images='skip'``, an element
    ``fn`` fails on (an image that does not decode) becomes a zero image with ``mask`` 0,
    so that batches, step counts and resumption stay exactly as they would be without it."""
    if input_config.corrupt_images == "fail":
        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    size = input_config.image_size

    def one(*element):
        decoded = tf.data.Dataset.from_tensors(element).map(fn).ignore_errors()
        placeholder = {
            "image": tf.zeros((size, size, 3), tf.uint8),
            "label": element[1],
            "mask": tf.constant(0.0),
        }
        return decoded.concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)

    # Each element yields exactly one output, so the deterministic interleave keeps order.
    return ds.interleave(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _first_undecodable(elements, fn, limit: int = 100_000) -> str | None:
    """The id of the first of ``elements`` (undecoded) that ``fn`` fails on, run eagerly,
    one by one: the error path only, to name the file."""
    for element in elements.take(limit):
        try:
            fn(*element)
        except DECODE_ERRORS:
            return element[2].numpy().decode(errors="replace")
    return None


def _as_numpy(
    ds, what: str, split: Split, elements, preprocess, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``ds`` (``elements`` mapped by ``preprocess`` and batched) as NumPy; a
    decode error becomes one DatasetError naming the example and the fix. The example is
    found by replaying ``elements`` from the failing batch, undecoded, one by one."""
    iterator = iter(tfds.as_numpy(ds))
    done = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DECODE_ERRORS as e:
            reason = (e.message or str(e)).strip().splitlines()[0]
            reason = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", reason)  # TF's op name
            bad = _first_undecodable(elements.skip(done * batch_size), preprocess)
            where = bad or f"an image of {split.name or 'the ' + what + ' split'}"
            raise DatasetError(
                f"an image of the {what} split could not be decoded ({reason}): {where} is "
                "corrupt or truncated. Set config.input.corrupt_images='skip' to skip such "
                "images (they are counted in the logs), or replace the file."
            ) from None
        done += 1
        yield batch


def steps_per_epoch(dataset: Dataset, global_batch_size: int) -> int:
    steps = dataset.train.size // global_batch_size
    if steps == 0:
        raise DatasetError(
            f"the training split has {dataset.train.size} examples, fewer than one global batch "
            f"(config.input.batch_size={global_batch_size}); lower the batch size."
        )
    return steps


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where this process's examples sit in the global stream."""

    steps: int  # per epoch
    global_batch: int
    local_batch: int
    process_index: int

    def positions(self, epoch):
        """(steps · local_batch,) int64: the global positions of this process's examples
        of ``epoch``, in the order it reads them."""
        j = tf.range(self.steps * self.local_batch, dtype=tf.int64)
        step, i = j // self.local_batch, j % self.local_batch
        first = tf.cast(epoch, tf.int64) * self.steps * self.global_batch
        return first + step * self.global_batch + self.process_index * self.local_batch + i


def _epoch_seed(seed: int, epoch):
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _random_access_epoch(split: Split, layout: _Layout, seed: int, epoch):
    """(index, position) of this process's examples of ``epoch``: a permutation of the
    whole split, cut into global batches, this process's slice of each."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(split.size, dtype=tf.int64), seed=_epoch_seed(seed, epoch)
    )
    per_step = tf.reshape(order[: layout.steps * layout.global_batch], [layout.steps, -1])
    start = layout.process_index * layout.local_batch
    mine = tf.reshape(per_step[:, start : start + layout.local_batch], [-1])
    return tf.data.Dataset.from_tensor_slices((mine, layout.positions(epoch)))


def _stream_epoch(split: Split, layout: _Layout, seed: int, epoch: int, shuffle_buffer: int):
    """(image, label, id, position) of this process's examples of ``epoch``: its files in
    an order drawn from (seed, epoch), through a shuffle buffer with the same seed."""
    epoch_seed = seed * 1_000_003 + epoch
    with _STREAM_LOCK:  # built on background threads; a source need not be thread-safe
        ds = split.stream(epoch_seed)
    share = math.ceil(split.size * layout.local_batch / layout.global_batch)
    ds = ds.shuffle(
        max(1, min(shuffle_buffer, share)), seed=epoch_seed, reshuffle_each_iteration=False
    )
    ds = ds.take(layout.steps * layout.local_batch)
    positions = tf.data.Dataset.from_tensor_slices(layout.positions(epoch))
    return tf.data.Dataset.zip(ds, positions).map(lambda example, position: (*example, position))


def _epochs_overlapped(make_epoch: Callable[[int], Iterator], first_epoch: int) -> Iterator:
    """The items of epochs first_epoch, first_epoch + 1, ...; epoch e + 1's iterator is
    made, and its first item fetched (which fills its shuffle buffer), on a background
    thread while epoch e is read, so that crossing an epoch does not wait for it."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-epoch")

    def start(epoch):
        iterator = make_epoch(epoch)
        return next(iterator, None), iterator

    try:
        upcoming = pool.submit(start, first_epoch)
        for epoch in range(first_epoch + 1, 2**62):
            first, iterator = upcoming.result()
            upcoming = pool.submit(start, epoch)
            if first is not None:
                yield first
                yield from iterator
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def train_batches(
    dataset: Dataset, input_config, *, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of this process (see the module docstring for their
    format and order), starting at global step ``start_step``."""
    split = dataset.train
    global_batch = input_config.batch_size
    layout = _Layout(
        steps=steps_per_epoch(dataset, global_batch),
        global_batch=global_batch,
        local_batch=global_batch // dataset.process_count,
        process_index=dataset.process_index,
    )
    first_epoch, step_in_epoch = divmod(start_step, layout.steps)
    skip = step_in_epoch * layout.local_batch  # before any decoding
    preprocess = train_preprocess(input_config, split, seed)

    def batches(elements):
        ds = _map_images(elements, preprocess, input_config)
        ds = ds.batch(layout.local_batch, drop_remainder=True).prefetch(2)
        return _as_numpy(ds, "training", split, elements, preprocess, layout.local_batch)

    if split.read is not None:  # one pipeline over every epoch: no pause at the boundary

        def read(index, position):
            return (*split.read(index), position)

        first = _random_access_epoch(split, layout, seed, first_epoch).skip(skip)
        later = tf.data.Dataset.range(first_epoch + 1, 2**62)
        later = later.flat_map(lambda epoch: _random_access_epoch(split, layout, seed, epoch))
        return batches(first.concatenate(later).map(read))

    def epoch_batches(epoch):
        elements = _stream_epoch(split, layout, seed, epoch, input_config.shuffle_buffer)
        if epoch == first_epoch:
            return batches(elements.skip(skip))
        return batches(elements)

    return _epochs_overlapped(epoch_batches, first_epoch)


def num_eval_batches(dataset: Dataset, eval_batch_size: int) -> int:
    """The same on every process: enough for the largest per-process shard."""
    local_batch = eval_batch_size // dataset.process_count
    return math.ceil(math.ceil(dataset.eval.size / dataset.process_count) / local_batch)


def _shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The [start, stop) of an n-element split that a process reads (as even_splits does)."""
    bounds = [round(i * n / process_count) for i in range(process_count + 1)]
    return bounds[process_index], bounds[process_index + 1]


def examples(split: Split, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """A process's share of ``split`` in stored order, undecoded: (image, label, id)."""
    if split.read is None:
        return split.stream(None)
    start, stop = _shard(split.size, process_index, process_count)
    return tf.data.Dataset.range(start, stop).map(split.read)


def eval_batches(dataset: Dataset, input_config) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once, over all processes: the last batch is padded and
    ``mask`` is 0 on padding (and on corrupt images skipped under
    ``corrupt_images='skip'``). Yields exactly ``num_eval_batches`` batches of
    eval_batch_size / process_count."""
    split = dataset.eval
    local_batch = input_config.eval_batch_size // dataset.process_count
    size = input_config.image_size
    elements = examples(split, dataset.process_index, dataset.process_count)
    preprocess = eval_preprocess(input_config, split)
    ds = _map_images(elements, preprocess, input_config).batch(local_batch).prefetch(2)
    count = 0
    for batch in _as_numpy(ds, "evaluation", split, elements, preprocess, local_batch):
        yield _pad_batch(batch, len(batch["label"]), local_batch)
        count += 1
    empty = {
        "image": np.zeros((0, size, size, 3), np.uint8),
        "label": np.zeros((0,), np.int32),
        "mask": np.zeros((0,), np.float32),
    }
    for _ in range(count, num_eval_batches(dataset, input_config.eval_batch_size)):
        yield _pad_batch(empty, 0, local_batch)


def _pad_batch(batch, n: int, local_batch: int) -> dict[str, np.ndarray]:
    pad = local_batch - n
    return {  # padding has mask 0, as have skipped corrupt images
        key: np.concatenate([value, np.zeros((pad, *value.shape[1:]), value.dtype)])
        for key, value in batch.items()
    }
