"""Where examples come from: the source registry and the built-in sources.

``@register_source("name")`` makes a function ``(input_config, process_index,
process_count) -> Dataset`` the value ``config.input.dataset = "name"``; any other name is
a TFDS dataset's. Built in:
  - any TFDS image-classification dataset by name (``imagenet2012``, ``cifar10``,
    ``cifar100``, ``imagenette``, ...), read from ``config.input.data_dir`` (may be gs://),
    prepared once (by process 0, the others waiting) if it is not there;
  - ``"folder"``: image files in class folders, local or gs:// (``folders``);
  - ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10
    classes) upsampled to the configured size, fixed 80/20 split. Needs no download.
"""

from __future__ import annotations

import numpy as np

# isort: off
from sasa_flax.quiet_tensorflow import tf  # first: TensorFlow's start-up lines silenced
import tensorflow_datasets as tfds

# isort: on
from sasa_flax.data.augment import AUGMENTATIONS
from sasa_flax.data.splits import Dataset, DatasetError, Split, array_split
from sasa_flax.paths import local_path_made_absolute
from sasa_flax.registries import Registry

# Files a streaming (TFDS) split reads at once, record by record.
INTERLEAVED_FILES = 16

# name -> (input_config, process_index, process_count) -> Dataset. Any other name is TFDS's.
SOURCES: Registry = Registry("dataset")


def register_source(name: str):
    """Decorator: ``fn(input_config, process_index, process_count) -> Dataset`` becomes
    ``config.input.dataset = name``. ``fn`` gives each split random access to the whole
    split (``array_split``, ``file_split``) or streams this process's 1/process_count of
    it (``Split.stream``), with the whole split's size; it raises DatasetError with the
    fix when the data is missing."""

    def decorate(fn):
        return SOURCES.add(name, fn)

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


def _tfds(input_config, process_index, process_count) -> Dataset:
    name = input_config.dataset
    data_dir = local_path_made_absolute(input_config.data_dir) or None
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
        from sasa_flax.run import distributed

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
        manual_dir = local_path_made_absolute(input_config.manual_dir) or None
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
