"""A tiny TFDS image-classification dataset (scikit-learn's digits as 16×16 RGB PNGs),
prepared offline into a data_dir (gs:// in the tests):

    python -m tests.gcs.tiny_tfds DATA_DIR
"""

import sys

import numpy as np
import tensorflow_datasets as tfds

from tests.helpers import prepare_tfds


def digits(lo: int, hi: int):
    def examples():
        from sklearn.datasets import load_digits

        loaded = load_digits()
        for i in range(lo, hi):
            image = (loaded.images[i] * (255 / 16)).astype(np.uint8)
            image = np.repeat(np.repeat(image, 2, 0), 2, 1)[..., None].repeat(3, -1)
            yield {"image": image, "label": int(loaded.target[i])}

    return examples


if __name__ == "__main__":
    features = {
        "image": tfds.features.Image(shape=(16, 16, 3)),
        "label": tfds.features.ClassLabel(num_classes=10),
    }
    name = prepare_tfds(
        sys.argv[1], "TinyDigits", features, {"train": digits(0, 300), "test": digits(300, 400)}
    )
    print("prepared", name)
