"""Datasets → tf.data → per-process NumPy batches of uint8 images.

Sources and augmentations are registries: ``@register_source("name")`` makes a function
``(input_config, process_index, process_count) -> Dataset`` the dataset ``name``, and
``register_augmentation("name", train=..., eval=...)`` the value of
``config.input.augment``. A new dataset or augmentation is one function here (or in a
module the config imports) and its registration; ``array_split`` and ``file_split``
build a source's splits from arrays or files.

Sources (``config.input.dataset``):
  - any TFDS image-classification dataset by name (``imagenet2012``, ``cifar10``,
    ``cifar100``, ``imagenette``, ...), read from ``config.input.data_dir`` (may be gs://);
  - ``"folder"``: ``data_dir/<class>/*.{jpg,png,...}``, or ``data_dir/train/<class>`` with
    ``data_dir/val`` (or ``valid``/``validation``/``test``) beside it;
  - ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10
    classes) upsampled to the configured size, fixed 80/20 split. Needs no download.

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

Determinism and resumption: the training stream is a pure function of (seed, step).
Every augmentation draws from stateless random ops keyed on (seed, position of the example
in the *global* stream), so no two examples of a run share a draw whatever the number of
processes. ``train_batches(..., start_step=s)`` skips the examples already consumed,
before any decoding, so a resumed run sees exactly the batches an uninterrupted run would.

Batches: {"image": (b, S, S, 3) uint8, "label": (b,) int32, "mask": (b,) float32}, b =
global batch / process count; images are normalised on the device (``normalise``), so a
quarter of float32's bytes cross to it. An epoch has floor(N / global batch) steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import re
import threading
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
# Files a streaming (TFDS) split reads at once, record by record.
INTERLEAVED_FILES = 16
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)
_STREAM_LOCK = threading.Lock()


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

    def __init__(self, train, eval, num_classes: int, process_index: int = 0,  # noqa: A002
                 process_count: int = 1):  # fmt: skip
        self._splits = dict(train=train, eval=eval)
        self.num_classes, self.process_index, self.process_count = (
            num_classes, process_index, process_count
        )  # fmt: skip

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
        return Dataset(**self._splits, num_classes=self.num_classes,
                       process_index=process_index, process_count=process_count)  # fmt: skip


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


# --- sources -----------------------------------------------------------------------

# name -> (input_config, process_index, process_count) -> Dataset. Any other name is TFDS's.
SOURCES: dict[str, Callable[..., Dataset]] = {}


def register_source(name: str):
    """Decorator: ``fn(input_config, process_index, process_count) -> Dataset`` becomes
    ``config.input.dataset = name``. ``fn`` gives each split random access to the whole
    split (``array_split``, ``file_split``) or streams this process's 1/process_count of
    it (``Split.stream``), with the whole split's size; it raises DatasetError with the
    fix when the data is missing."""

    def decorate(fn):
        SOURCES[name] = fn
        return fn

    return decorate


def load(input_config, *, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Opens config.input's dataset for one process of ``process_count``; raises
    DatasetError with a fix if it cannot."""
    if input_config.augment not in AUGMENTATIONS:
        raise DatasetError(
            f"config.input.augment={input_config.augment!r}: must be one of "
            f"{tuple(AUGMENTATIONS)} (register_augmentation adds one)."
        )
    source = SOURCES.get(input_config.dataset, _tfds)
    dataset = source(input_config, process_index, process_count)
    return dataset.for_process(process_index, process_count)


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
        train=array_split(images[train], labels[train], "the digits training split"),
        eval=array_split(images[test], labels[test], "the digits evaluation split"),
        num_classes=10,
    )


@dataclasses.dataclass(frozen=True)
class FolderTree:
    """Every file under a folder with its size, from one scan: ``files`` maps the path
    relative to the root ("cat/1.jpg") to bytes; ``dirs`` holds every directory's
    relative path ("cat", "train/cat"), the root excluded."""

    root: str
    files: dict[str, int]
    dirs: frozenset[str]

    def subfolders(self, folder: str = "") -> list[str]:
        """Names of ``folder``'s immediate subfolders, sorted."""
        prefix = f"{folder}/" if folder else ""
        return sorted(
            d[len(prefix) :]
            for d in self.dirs
            if d.startswith(prefix) and "/" not in d[len(prefix) :]
        )

    def files_under(self, folder: str) -> list[str]:
        """Relative paths of every file under ``folder`` (any depth), sorted."""
        return sorted(f for f in self.files if f.startswith(f"{folder}/"))

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root


def _with_parents(files, dirs=()) -> frozenset[str]:
    found = set(dirs)
    for f in files:
        parts = f.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(found)


def scan_folder(root: str) -> FolderTree | None:
    """The tree under ``root`` (a local path, gs:// or any URL tf.io.gfile reads), or
    None if it is not a directory. gs:// is one object listing (sizes included: a
    request per 1,000 objects, not one per file); a local folder is walked; any other
    URL is walked by tf.io.gfile with one size request per file."""
    if root.startswith("gs://"):
        listed = _list_gcs(root)
        if listed is not None:
            return FolderTree(root, listed, _with_parents(listed)) if listed else None
    if "://" not in root:
        if not os.path.isdir(root):
            return None
        files, dirs = {}, []
        for here, subdirs, names in os.walk(root, followlinks=True):
            rel = os.path.relpath(here, root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirs += [base + d for d in subdirs]
            for name in names:
                files[base + name] = os.path.getsize(os.path.join(here, name))
        return FolderTree(root, files, _with_parents(files, dirs))
    if not tf.io.gfile.isdir(root):
        return None
    files, dirs = {}, []
    for here, subdirs, names in tf.io.gfile.walk(root):
        rel = here[len(root.rstrip("/")) :].strip("/")
        base = f"{rel}/" if rel else ""
        dirs += [base + d.rstrip("/") for d in subdirs]
        for name in names:
            files[base + name] = tf.io.gfile.stat(f"{here.rstrip('/')}/{name}").length
    return FolderTree(root, files, _with_parents(files, dirs))


def _list_gcs(root: str) -> dict[str, int] | None:
    """{relative path: size} of every object under gs:// ``root`` in one listing, or
    None if google-cloud-storage cannot be used here (then tf.io.gfile walks it)."""
    try:
        from google.cloud import storage

        bucket, _, prefix = root[len("gs://") :].partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "unused")
        blobs = client.list_blobs(bucket, prefix=prefix)
        return {b.name[len(prefix) :]: int(b.size or 0) for b in blobs if not b.name.endswith("/")}
    except Exception as e:  # noqa: BLE001 - no credentials, no package: the slow way
        logging.getLogger("sasa_flax").warning(
            "listing %s with google-cloud-storage failed (%s: %s); walking it with "
            "tf.io.gfile, one request per file", root, type(e).__name__, e,
        )  # fmt: skip
        return None


@register_source("folder")
def _folder(input_config, process_index, process_count) -> Dataset:
    root = str(input_config.data_dir).rstrip("/") or str(input_config.data_dir)
    tree = scan_folder(root)
    if tree is None:
        raise DatasetError(
            f"config.input.data_dir={root!r} is not a directory; point it at a folder "
            "with one subfolder of images per class (local, or gs://bucket/path)."
        )
    top = set(tree.subfolders())
    eval_name = next((n for n in EVAL_FOLDERS if n in top), None)
    train_name = "train" if eval_name is not None and "train" in top else ""
    train_dir = tree.path(train_name)
    classes = tree.subfolders(train_name)
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

    def listing(split_name):
        files, labels = [], []
        for label, name in enumerate(classes):
            folder = f"{split_name}/{name}" if split_name else name
            for f in tree.files_under(folder):
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(label)
        return np.array(files, dtype=object), np.array(labels, np.int32)

    def images_of(split_name):
        files, labels = listing(split_name)
        if len(files) == 0:
            where = tree.path(split_name)
            raise DatasetError(
                f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {where}/<class>/."
            )
        return files, labels

    def checked(files, labels, which):
        # Checked from the scan's sizes when the split is built (make_setup builds both
        # before any training): an empty file fails now, not when an evaluation reads it.
        empty = [tree.path(f) for f in files if tree.files[f] == 0]
        if empty and input_config.corrupt_images == "fail":
            raise DatasetError(
                f"{len(empty)} empty (0-byte) image file(s) under {root}: "
                f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}. Replace or remove "
                "them, or set config.input.corrupt_images='skip' to skip them."
            )
        name = f"the {which} split of {root}"
        return file_split([tree.path(f) for f in files], labels, name)

    if eval_name is not None and not input_config.tuning_split:  # two folders, two splits
        return Dataset(
            lambda: checked(*images_of(train_name), "training"),
            lambda: checked(*images_of(eval_name), "evaluation"),
            len(classes),
        )

    @functools.cache
    def carved():  # the evaluation split is carved out of the training folder
        files, labels = images_of(train_name)
        eval_files = eval_labels = None
        if eval_name is None:  # the evaluation split: a fixed 10%
            order = np.random.default_rng(0).permutation(len(files))
            cut = len(files) - max(1, len(files) // 10)
            eval_files, eval_labels = files[order[cut:]], labels[order[cut:]]
            files, labels = files[order[:cut]], labels[order[:cut]]
        if input_config.tuning_split:  # the tuning split: 4% of what is left to train on
            kept, held = tuning_holdout(labels)
            eval_files, eval_labels = files[held], labels[held]
            files, labels = files[kept], labels[kept]
        return (
            checked(files, labels, "training"),
            checked(eval_files, eval_labels, "evaluation"),
        )

    return Dataset(lambda: carved()[0], lambda: carved()[1], len(classes))


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
    if _prepare(builder, input_config, process_index, process_count):
        builder = tfds.builder(name, data_dir=data_dir)  # process 0 built it meanwhile
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

    def split(split_name):
        mine = tfds.even_splits(split_name, n=process_count, drop_remainder=False)[process_index]
        described = f"split {split_name!r} of TFDS {name} (data_dir {builder.data_dir})"

        def stream(shuffle_seed=None):
            ds = builder.as_dataset(
                split=mine,
                shuffle_files=shuffle_seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(
                    shuffle_seed=shuffle_seed,
                    interleave_cycle_length=INTERLEAVED_FILES,
                    interleave_block_length=1,
                    add_tfds_id=True,
                ),
            )

            def example(position, ex):
                share = f" of process {process_index}'s share of split {split_name!r}"
                record = tf.strings.join(["record ", tf.strings.as_string(position), share])
                tfds_id = ex.get("tfds_id")  # mock data has none
                named = record if tfds_id is None else tf.strings.join(["TFDS record ", tfds_id])
                return ex["image"], tf.cast(ex["label"], tf.int32), named

            return ds.enumerate().map(example)

        return Split(
            size=_split_size(builder, split_name), encoded=True, name=described, stream=stream
        )

    return Dataset(
        lambda: split(train_name), lambda: split(eval_name), info.features["label"].num_classes
    )


def _prepare(builder, input_config, process_index, process_count) -> bool:
    """Builds the dataset if it is not there: process 0 alone, while the others wait for
    it; a failure is raised on every process with the same message. True if it was built."""
    message = _prepare_here(builder, input_config) if process_index == 0 else None
    if process_count > 1:
        from sasa_flax import distributed

        message = distributed.share_from_process_0(
            f"prepare/{builder.name}/{builder.data_dir}", message
        )
    if message and message != "built":
        raise DatasetError(message)
    return message == "built"


def _prepare_here(builder, input_config) -> str:
    """ "" if prepared already, "built" once built, else the error message."""
    try:
        builder.as_dataset(split="train")
        return ""
    except AssertionError:  # TFDS: "could not find data in ..."
        pass
    name = input_config.dataset
    if name == "imagenet2012" and not input_config.manual_dir:
        return (
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
        return "built"
    except Exception as e:  # noqa: BLE001 - report any download/build failure the same way
        return (
            f"{name} is not prepared in data_dir={builder.data_dir!r} and building it failed "
            f"({type(e).__name__}: {e}). Prepare it on a machine with internet access "
            f"(`tfds build {name} --data_dir=DIR`) and set config.input.data_dir=DIR."
        )


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
    only the crop of a JPEG, whatever its file name says)."""

    def crop_box(shape):
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
        return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])

    def jpeg_crop():
        box = crop_box(tf.image.extract_jpeg_shape(image))
        return tf.cast(tf.image.decode_and_crop_jpeg(image, box, channels=3), tf.float32)

    def any_crop():
        decoded = _decode(image, split)
        y, x, h, w = tf.unstack(crop_box(tf.shape(decoded)))
        return tf.cast(tf.image.crop_to_bounding_box(decoded, y, x, h, w), tf.float32)

    crop = tf.cond(tf.io.is_jpeg(image), jpeg_crop, any_crop) if split.encoded else any_crop()
    crop.set_shape([None, None, 3])
    return tf.image.resize(crop, (size, size), method="bicubic")


def _centre_crop(image, split: Split, size: int):
    """Resize the shorter side to size / 0.875, then the central size² (256 -> 224)."""
    image = tf.cast(_decode(image, split), tf.float32)
    shape = tf.shape(image)
    scale = (size / 0.875) / tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    new_hw = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, new_hw, method="bicubic")
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
    """``train(image, split, size, seed) -> (size, size, 3)`` float pixels, drawn from the
    stateless ``seed`` (a (2,) int64 tensor); ``eval(image, split, size)`` the
    deterministic evaluation view. ``image`` is as ``split`` stores it (``_decode``).
    The pipeline rounds and clips the result to uint8 (bicubic resizing rings past
    [0, 255] at sharp edges)."""

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


def _pixels(image):
    """Float pixels -> uint8 (H, W, 3), what crosses to the device."""
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    image.set_shape([None, None, 3])
    return image


def normalise(images, dtype=np.float32):
    """uint8 images -> (x - ImageNet mean) / std, in ``dtype``: run on the device (jnp or
    np arrays alike)."""
    return ((images.astype(np.float32) - MEAN_RGB) / STDDEV_RGB).astype(dtype)


def _train_preprocess(input_config, split: Split, seed: int):
    size = input_config.image_size

    def fn(image, label, example_id, position):
        del example_id
        # Keyed on the example's position in the global stream: no two examples of a
        # run, on any process, share a draw.
        key = tf.stack([tf.constant(seed, tf.int64), position])
        keys = tf.random.experimental.stateless_split(key, 2)
        image = AUGMENTATIONS[input_config.augment].train(image, split, size, keys[0])
        if input_config.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=keys[1])
        return {"image": _pixels(image), "label": label, "mask": tf.constant(1.0)}

    return fn


def _eval_preprocess(input_config, split: Split):
    size = input_config.image_size

    def fn(image, label, example_id):
        del example_id
        image = AUGMENTATIONS[input_config.augment].eval(image, split, size)
        return {"image": _pixels(image), "label": label, "mask": tf.constant(1.0)}

    return fn


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


# --- iterators ------------------------------------------------------------------------


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
    preprocess = _train_preprocess(input_config, split, seed)

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
    preprocess = _eval_preprocess(input_config, split)
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
