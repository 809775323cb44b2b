"""A tiny TFDS image-classification dataset (scikit-learn's digits as 16×16 RGB PNGs),
prepared offline into a data_dir (gs:// in the tests):

    python -m tests.gcs.tiny_tfds DATA_DIR
"""

import sys

import numpy as np
import tensorflow_datasets as tfds


class TinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 300), "test": self._generate_examples(300, 400)}

    def _generate_examples(self, lo, hi):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in range(lo, hi):
            image = (digits.images[i] * (255 / 16)).astype(np.uint8)
            image = np.repeat(np.repeat(image, 2, 0), 2, 1)[..., None].repeat(3, -1)
            yield i, {"image": image, "label": int(digits.target[i])}


if __name__ == "__main__":
    builder = TinyDigits(data_dir=sys.argv[1])
    builder.download_and_prepare()
    print("prepared", builder.data_dir)
