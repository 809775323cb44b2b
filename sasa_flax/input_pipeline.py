"""Datasets → tf.data → per-process NumPy batches.

Sources and augmentations are registries: ``@register_source("name")`` makes a function
``(input_config, process_index, process_count) -> Dataset`` the dataset ``name``, and
``register_augmentation("name", train=..., eval=...)`` the value of
``config.input.augment``. A new dataset or augmentation is one function here (or in a
module the config imports) and its registration.

Sources (``config.input.dataset``):
  - any TFDS image-classification dataset by name (``imagenet2012``, ``cifar10``,
    ``cifar100``, ``imagenette``, ...), read from ``config.input.data_dir`` (may be gs://);
  - ``"folder"``: ``data_dir/<class>/*.{jpg,png,...}``, or ``data_dir/train/<class>`` with
    ``data_dir/val`` (or ``valid``/``validation``/``test``) beside it;
  - ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10
    classes) upsampled to the configured size, fixed 80/20 split. Needs no download.

Determinism and resumption: the training stream is a pure function of (seed, step).
Epoch e is shuffled with a seed derived from (seed, e); every augmentation draws from
stateless random ops keyed on (seed, e, example id). ``train_batches(..., start_step=s)``
skips the examples already consumed, before any decoding, so a resumed run sees exactly
the batches an uninterrupted run would.

Multi-process: each process reads its own 1/P of every split (``tfds.even_splits``) and
yields batches of global_batch / P; an epoch has floor(N / global_batch) steps on every
process, so processes never disagree on the number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Iterator

import numpy as np

# isort: off
from sasa_flax.quiet_tensorflow import tf  # first: TensorFlow's start-up lines silenced
import tensorflow_datasets as tfds

# isort: on
from sasa_flax.errors import UserError

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
# Folder names of a "folder" dataset's evaluation split, beside train/ (the first found).
EVAL_FOLDERS = ("val", "valid", "validation", "test")


class DatasetError(UserError):
    """The dataset cannot be read as configured; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split, read by this process: examples are (image, label) with image either
    encoded bytes (``encoded=True``) or uint8 (H, W, 3)."""

    make: object  # () -> tf.data.Dataset of (image, label), this process's shard, file order
    size: int  # examples in the whole split (all processes)
    encoded: bool  # images are encoded bytes
    jpeg: bool  # ... and JPEG, so that decode_and_crop_jpeg applies
    name: str = ""  # how an error names the split's source ("train[:96%] of imagenet2012")
    files: tuple[str, ...] = ()  # this process's files, in order, where the source has files


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    eval: Split
    num_classes: int


# --- sources -----------------------------------------------------------------------

# name -> (input_config, process_index, process_count) -> Dataset. Any other name is TFDS's.
SOURCES: dict[str, Callable[..., Dataset]] = {}


def register_source(name: str):
    """Decorator: ``fn(input_config, process_index, process_count) -> Dataset`` becomes
    ``config.input.dataset = name``. ``fn`` reads this process's 1/process_count of each
    split (``Split.make``) and reports the whole split's size; it raises DatasetError
    with the fix when the data is missing."""

    def decorate(fn):
        SOURCES[name] = fn
        return fn

    return decorate


def load(input_config, *, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Opens config.input's dataset; raises DatasetError with a fix if it cannot."""
    if input_config.augment not in AUGMENTATIONS:
        raise DatasetError(
            f"config.input.augment={input_config.augment!r}: must be one of "
            f"{tuple(AUGMENTATIONS)} (register_augmentation adds one)."
        )
    source = SOURCES.get(input_config.dataset, _tfds)
    return source(input_config, process_index, process_count)


TUNING_FRACTION = 0.04  # the paper's held-out share of the training set (Tables 3, 5)


def tuning_holdout(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices of a training split: a fixed random 4% (round(0.04·N),
    at least 1) drawn class by class, so that the held-out part has the training split's
    class mix (each class gets its share, apportioned by largest remainder).

    TFDS datasets use the slice ``train[96%:]`` instead: TFDS writes the records of a
    dataset in a shuffled order when it prepares it, so the last 4% is a random sample.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    total = max(1, int(round(TUNING_FRACTION * len(labels))))
    quotas = counts * total / len(labels)
    shares = np.floor(quotas).astype(int)
    by_remainder = np.argsort(-(quotas - shares), kind="stable")
    shares[by_remainder[: total - shares.sum()]] += 1
    rng = np.random.default_rng(0)
    held = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:n]
            for c, n in zip(classes, shares, strict=True)
        ]
    )
    held = np.sort(held)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _shard(n: int, process_index: int, process_count: int) -> slice:
    """The examples of an n-element split that this process reads (as even_splits does)."""
    bounds = [round(i * n / process_count) for i in range(process_count + 1)]
    return slice(bounds[process_index], bounds[process_index + 1])


@register_source("digits")
def _digits(input_config, process_index, process_count) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities -> uint8 RGB, upsampled to the model's resolution.
    images = (digits.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    size = input_config.image_size
    images = tf.image.resize(images, (size, size), method="bilinear").numpy()
    images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))  # the fixed split
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    if input_config.tuning_split:
        kept, held = tuning_holdout(labels[train])
        train, test = train[kept], train[held]
    return Dataset(
        train=_array_split(images[train], labels[train], process_index, process_count),
        eval=_array_split(images[test], labels[test], process_index, process_count),
        num_classes=10,
    )


def _array_split(images, labels, process_index, process_count) -> Split:
    part = _shard(len(labels), process_index, process_count)
    mine_images, mine_labels = images[part], labels[part]
    return Split(
        make=lambda: tf.data.Dataset.from_tensor_slices((mine_images, mine_labels)),
        size=len(labels),
        encoded=False,
        jpeg=False,
    )


@register_source("folder")
def _folder(input_config, process_index, process_count) -> Dataset:
    root = pathlib.Path(input_config.data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"config.input.data_dir={str(root)!r} is not a directory; point it at a folder "
            "with one subfolder of images per class."
        )
    eval_dir = next((root / n for n in EVAL_FOLDERS if (root / n).is_dir()), None)
    train_dir = root / "train" if eval_dir is not None and (root / "train").is_dir() else root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    split_like = sorted(set(classes) & {"train", *EVAL_FOLDERS})
    if split_like:
        raise DatasetError(
            f"{train_dir} has class folder(s) named like splits: {split_like}. Lay the data "
            "out as data_dir/<class>/<images>, or as data_dir/train/<class>/<images> beside "
            f"data_dir/<{'|'.join(EVAL_FOLDERS)}>/<class>/<images>."
        )
    if len(classes) < 2:
        raise DatasetError(
            f"{train_dir} has {len(classes)} class subfolder(s); a classifier needs at least "
            "two: data_dir/<class_name>/<image files>."
        )

    def listing(directory):
        files, labels = [], []
        for label, name in enumerate(classes):
            for f in sorted((directory / name).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(str(f))
                    labels.append(label)
        return np.array(files), np.array(labels, np.int32)

    files, labels = listing(train_dir)
    if len(files) == 0:
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {train_dir}/<class>/."
        )
    if eval_dir is not None:
        eval_files, eval_labels = listing(eval_dir)
    else:  # hold out a fixed 10%
        order = np.random.default_rng(0).permutation(len(files))
        cut = len(files) - max(1, len(files) // 10)
        files, labels, eval_files, eval_labels = (
            files[order[:cut]], labels[order[:cut]], files[order[cut:]], labels[order[cut:]]
        )  # fmt: skip
    if input_config.tuning_split:
        kept, held = tuning_holdout(labels)
        files, labels, eval_files, eval_labels = (
            files[kept], labels[kept], files[held], labels[held]
        )  # fmt: skip

    # Scanned once, both splits, before any training: an empty file fails now, not after
    # the last epoch when the evaluation reads it.
    empty = [f for f in (*files, *eval_files) if os.path.getsize(f) == 0]
    if empty and input_config.corrupt_images == "fail":
        raise DatasetError(
            f"{len(empty)} empty (0-byte) image file(s) under {root}: "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}. Replace or remove them, "
            "or set config.input.corrupt_images='skip' to skip them."
        )

    def split(files, labels):
        part = _shard(len(files), process_index, process_count)
        mine = (files[part], labels[part])

        def make():
            ds = tf.data.Dataset.from_tensor_slices(mine)
            return ds.map(lambda f, y: (tf.io.read_file(f), y))

        return Split(make=make, size=len(files), encoded=True, jpeg=False, files=tuple(mine[0]))

    return Dataset(split(files, labels), split(eval_files, eval_labels), len(classes))


def _tfds(input_config, process_index, process_count) -> Dataset:
    name = input_config.dataset
    data_dir = input_config.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(
            f"config.input.dataset={name!r} is not a TFDS dataset; use a name from "
            "https://www.tensorflow.org/datasets/catalog, 'folder' or 'digits'."
        ) from None
    _prepare(builder, input_config)
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise DatasetError(
            f"{name} has no 'image' and 'label' features; it is not image classification."
        )
    splits = info.splits or {"train": None, "validation": None}  # no metadata: mock data
    train_name = "train"
    eval_name = next((s for s in ("validation", "test") if s in splits), None)
    if input_config.tuning_split:
        train_name, eval_name = "train[:96%]", "train[96%:]"  # see tuning_holdout
    if eval_name is None:
        raise DatasetError(
            f"{name} has no validation or test split; set config.input.tuning_split=True."
        )
    jpeg = info.features["image"].encoding_format == "jpeg"  # None means PNG

    def split(split_name):
        mine = tfds.even_splits(split_name, n=process_count, drop_remainder=False)[process_index]

        def make():
            ds = builder.as_dataset(
                split=mine,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(interleave_cycle_length=1),
            )
            return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

        return Split(
            make=make, size=_split_size(builder, split_name), encoded=True, jpeg=jpeg,
            name=f"split {split_name!r} of TFDS {name} (data_dir {builder.data_dir})",
        )  # fmt: skip

    return Dataset(split(train_name), split(eval_name), info.features["label"].num_classes)


def _prepare(builder, input_config) -> None:
    """Builds the dataset once if it is not there; a clear error where that cannot work."""
    try:
        builder.as_dataset(split="train")
        return
    except AssertionError:  # TFDS: "could not find data in ..."
        pass
    name = input_config.dataset
    if name == "imagenet2012" and not input_config.manual_dir:
        raise DatasetError(
            f"imagenet2012 is not prepared in data_dir={builder.data_dir!r}. Download "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, then set "
            "config.input.manual_dir to their directory (it is built once), or set "
            "config.input.data_dir to where it is already prepared."
        )
    try:
        manual_dir = input_config.manual_dir or None
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as e:  # noqa: BLE001 - report any download/build failure the same way
        raise DatasetError(
            f"{name} is not prepared in data_dir={builder.data_dir!r} and building it failed "
            f"({type(e).__name__}: {e}). Prepare it on a machine with internet access "
            f"(`tfds build {name} --data_dir=DIR`) and set config.input.data_dir=DIR."
        ) from None


def _split_size(builder, split_name: str) -> int:
    """Examples in a split: from the metadata, else counted by tf.data (mock data)."""
    if builder.info.splits:
        return builder.info.splits[split_name].num_examples
    cardinality = int(builder.as_dataset(split=split_name).cardinality())
    if cardinality < 0:
        raise DatasetError(f"the size of split {split_name!r} of {builder.name} is unknown.")
    return cardinality


# --- preprocessing --------------------------------------------------------------------


def _decode(image, split: Split):
    if not split.encoded:
        return image
    return tf.io.decode_image(image, channels=3, expand_animations=False)


def _inception_crop(image, split: Split, size: int, seed):
    """Random crop of 8%-100% of the area, aspect 3/4-4/3, resized to size² (decoding
    only the crop for JPEGs)."""
    shape = tf.image.extract_jpeg_shape(image) if split.jpeg else tf.shape(_decode(image, split))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    if split.jpeg:
        crop = tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3)
    else:
        crop = tf.image.crop_to_bounding_box(_decode(image, split), y, x, h, w)
    # Bicubic rings outside [0, 255] at sharp edges; clip back to pixel values.
    return tf.clip_by_value(tf.image.resize(crop, (size, size), method="bicubic"), 0.0, 255.0)


def _centre_crop(image, split: Split, size: int):
    """Resize the shorter side to size / 0.875, then the central size² (256 -> 224)."""
    image = tf.cast(_decode(image, split), tf.float32)
    shape = tf.shape(image)
    scale = (size / 0.875) / tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    new_hw = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
    image = tf.clip_by_value(tf.image.resize(image, new_hw, method="bicubic"), 0.0, 255.0)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return image[top : top + size, left : left + size]


def _resize(image, split: Split, size: int):
    image = tf.cast(_decode(image, split), tf.float32)
    return tf.image.resize(image, (size, size), method="bilinear")


def _pad_crop(image, size: int, seed):
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(image, (size, size, 3), seed=seed)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """``train(image, split, size, seed) -> (size, size, 3)`` float pixels in [0, 255], drawn
    from the stateless ``seed`` (a (2,) int64 tensor); ``eval(image, split, size)`` the
    deterministic evaluation view. ``image`` is as ``split`` stores it (``_decode``)."""

    train: Callable
    eval: Callable


AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(name: str, *, train: Callable, eval: Callable) -> None:  # noqa: A002
    """Makes ``config.input.augment = name`` use ``train`` / ``eval`` (see Augmentation)."""
    AUGMENTATIONS[name] = Augmentation(train, eval)


# ImageNet's: a random-area crop (8%-100%) resized, then the central crop of a resize.
register_augmentation("inception", train=_inception_crop, eval=_centre_crop)
# Small images (CIFAR): resize, reflect-pad by 4 and crop at random; eval resizes.
register_augmentation(
    "pad",
    train=lambda image, split, size, seed: _pad_crop(_resize(image, split, size), size, seed),
    eval=_resize,
)


def _normalise(image):
    image = (tf.cast(image, tf.float32) - MEAN_RGB) / STDDEV_RGB
    image.set_shape([None, None, 3])
    return image


def _train_preprocess(input_config, split: Split, seed: int, epoch: int):
    size = input_config.image_size

    def fn(index, example):
        image, label = example
        key = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, index])
        keys = tf.random.experimental.stateless_split(key, 2)
        image = AUGMENTATIONS[input_config.augment].train(image, split, size, keys[0])
        if input_config.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=keys[1])
        return {"image": _normalise(image), "label": label, "mask": tf.constant(1.0)}

    return fn


def _eval_preprocess(input_config, split: Split):
    size = input_config.image_size

    def fn(image, label):
        image = AUGMENTATIONS[input_config.augment].eval(image, split, size)
        return {"image": _normalise(image), "label": label, "mask": tf.constant(1.0)}

    return fn


def _map_images(ds, fn, input_config, label_of):
    """``ds.map(fn)`` in order. Under ``corrupt_images='skip'``, an element ``fn`` fails on
    (an image that does not decode) becomes a zero image with ``mask`` 0, so that batches,
    step counts and resumption stay exactly as they would be without it."""
    if input_config.corrupt_images == "fail":
        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    size = input_config.image_size

    def one(*element):
        decoded = tf.data.Dataset.from_tensors(element).map(fn).ignore_errors()
        placeholder = {
            "image": tf.zeros((size, size, 3), tf.float32),
            "label": label_of(*element),
            "mask": tf.constant(0.0),
        }
        return decoded.concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)

    # Each element yields exactly one output, so the deterministic interleave keeps order.
    return ds.interleave(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _first_undecodable(files) -> str | None:
    """The first of ``files`` that TensorFlow cannot decode (only on the error path)."""
    for f in files:
        try:
            tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            return f
    return None


def _as_numpy(ds, what: str, split: Split) -> Iterator[dict[str, np.ndarray]]:
    """Batches as NumPy; a decode error becomes one DatasetError naming the file (or the
    split) and the fix."""
    iterator = iter(tfds.as_numpy(ds))
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            reason = (e.message or str(e)).strip().splitlines()[0]
            bad = _first_undecodable(split.files) if split.files else None
            where = bad or f"a file of {split.name or 'the ' + what + ' split'}"
            raise DatasetError(
                f"an image of the {what} split could not be decoded ({reason}): {where} is "
                "corrupt or truncated. Set config.input.corrupt_images='skip' to skip such "
                "images (they are counted in the logs), or replace the file."
            ) from None
        yield batch


# --- iterators ------------------------------------------------------------------------


def steps_per_epoch(dataset: Dataset, global_batch_size: int) -> int:
    steps = dataset.train.size // global_batch_size
    if steps == 0:
        raise DatasetError(
            f"the training split has {dataset.train.size} examples, fewer than one global batch "
            f"(config.input.batch_size={global_batch_size}); lower the batch size."
        )
    return steps


def train_batches(
    dataset: Dataset,
    input_config,
    *,
    seed: int,
    start_step: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless per-process training batches {"image": (b, S, S, 3) float32, "label": (b,)},
    b = global batch / process count, starting at global step ``start_step``."""
    global_batch = input_config.batch_size
    local_batch = global_batch // process_count
    steps = steps_per_epoch(dataset, global_batch)
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        ds = dataset.train.make().enumerate()
        ds = ds.shuffle(
            min(input_config.shuffle_buffer, dataset.train.size),
            seed=seed * 1_000_003 + epoch,
            reshuffle_each_iteration=False,
        )
        ds = ds.take(steps * local_batch).skip(step_in_epoch * local_batch)
        ds = _map_images(
            ds,
            _train_preprocess(input_config, dataset.train, seed, epoch),
            input_config,
            label_of=lambda index, example: example[1],
        )
        ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
        yield from _as_numpy(ds, "training", dataset.train)
        epoch, step_in_epoch = epoch + 1, 0


def num_eval_batches(dataset: Dataset, eval_batch_size: int, process_count: int = 1) -> int:
    """The same on every process: enough for the largest per-process shard."""
    local_batch = eval_batch_size // process_count
    return math.ceil(math.ceil(dataset.eval.size / process_count) / local_batch)


def eval_batches(
    dataset: Dataset, input_config, *, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once: the last batch is padded and ``mask`` is 0 on padding
    (and on corrupt images skipped under ``corrupt_images='skip'``).

    Yields exactly ``num_eval_batches`` batches of eval_batch_size / process_count.
    """
    local_batch = input_config.eval_batch_size // process_count
    size = input_config.image_size
    ds = _map_images(
        dataset.eval.make(),
        _eval_preprocess(input_config, dataset.eval),
        input_config,
        label_of=lambda image, label: label,
    )
    ds = ds.batch(local_batch).prefetch(2)
    count = 0
    for batch in _as_numpy(ds, "evaluation", dataset.eval):
        n = len(batch["label"])
        yield _pad_batch(batch, n, local_batch)
        count += 1
    empty = {
        "image": np.zeros((0, size, size, 3), np.float32),
        "label": np.zeros((0,), np.int32),
        "mask": np.zeros((0,), np.float32),
    }
    for _ in range(count, num_eval_batches(dataset, input_config.eval_batch_size, process_count)):
        yield _pad_batch(empty, 0, local_batch)


def _pad_batch(batch, n: int, local_batch: int) -> dict[str, np.ndarray]:
    pad = local_batch - n
    return {  # padding has mask 0, as have skipped corrupt images
        key: np.concatenate([value, np.zeros((pad, *value.shape[1:]), value.dtype)])
        for key, value in batch.items()
    }
