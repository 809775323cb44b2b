"""Augmentations: encoded or uint8 images -> uint8 (size, size, 3), what crosses to the
device; ``normalise`` runs there.

``register_augmentation("name", train=..., eval=...)`` makes ``config.input.augment =
"name"``. Every training draw is stateless, keyed on (seed, the example's position in the
global stream), so no two examples of a run share a draw whatever the number of processes,
and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sasa_flax.data.splits import Split
from sasa_flax.quiet_tensorflow import tf
from sasa_flax.registries import Registry

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255


def decode(image, split: Split):
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
        decoded = decode(image, split)
        y, x, h, w = tf.unstack(crop_box(tf.shape(decoded)))
        return tf.cast(tf.image.crop_to_bounding_box(decoded, y, x, h, w), tf.float32)

    crop = tf.cond(tf.io.is_jpeg(image), jpeg_crop, any_crop) if split.encoded else any_crop()
    crop.set_shape([None, None, 3])
    return tf.image.resize(crop, (size, size), method="bicubic")


def _centre_crop(image, split: Split, size: int):
    """Resize the shorter side to size / 0.875, then the central size² (256 -> 224)."""
    image = tf.cast(decode(image, split), tf.float32)
    shape = tf.shape(image)
    scale = (size / 0.875) / tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    new_hw = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, new_hw, method="bicubic")
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return image[top : top + size, left : left + size]


def _resize(image, split: Split, size: int):
    image = tf.cast(decode(image, split), tf.float32)
    return tf.image.resize(image, (size, size), method="bilinear")


def _pad_crop(image, size: int, seed):
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(image, (size, size, 3), seed=seed)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """``train(image, split, size, seed) -> (size, size, 3)`` float pixels, drawn from the
    stateless ``seed`` (a (2,) int64 tensor); ``eval(image, split, size)`` the
    deterministic evaluation view. ``image`` is as ``split`` stores it (``decode``).
    The pipeline rounds and clips the result to uint8 (bicubic resizing rings past
    [0, 255] at sharp edges)."""

    train: Callable
    eval: Callable


AUGMENTATIONS: Registry = Registry("augmentation", defined_by=lambda a: a.train)


def register_augmentation(name: str, *, train: Callable, eval: Callable) -> None:  # noqa: A002
    """Makes ``config.input.augment = name`` use ``train`` / ``eval`` (see Augmentation)."""
    AUGMENTATIONS.add(name, Augmentation(train, eval))


# ImageNet's: a random-area crop (8%-100%) resized, then the central crop of a resize.
register_augmentation("inception", train=_inception_crop, eval=_centre_crop)
# Small images (CIFAR): resize, reflect-pad by 4 and crop at random; eval resizes.
register_augmentation(
    "pad",
    train=lambda image, split, size, seed: _pad_crop(_resize(image, split, size), size, seed),
    eval=_resize,
)


def pixels(image):
    """Float pixels -> uint8 (H, W, 3), what crosses to the device."""
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    image.set_shape([None, None, 3])
    return image


def normalise(images, dtype=np.float32):
    """uint8 images -> (x - ImageNet mean) / std, in ``dtype``: run on the device (jnp or
    np arrays alike)."""
    return ((images.astype(np.float32) - MEAN_RGB) / STDDEV_RGB).astype(dtype)


def train_preprocess(input_config, split: Split, seed: int):
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
        return {"image": pixels(image), "label": label, "mask": tf.constant(1.0)}

    return fn


def eval_preprocess(input_config, split: Split):
    size = input_config.image_size

    def fn(image, label, example_id):
        del example_id
        image = AUGMENTATIONS[input_config.augment].eval(image, split, size)
        return {"image": pixels(image), "label": label, "mask": tf.constant(1.0)}

    return fn
