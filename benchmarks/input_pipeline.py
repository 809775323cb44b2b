r"""The training input pipeline alone, against a bare tf.data loop, on ImageNet-like JPEGs.

    python -m benchmarks.input_pipeline                    # 2,000 images, batch 128, 224²
    python -m benchmarks.input_pipeline --images 8000 --json
    python -m benchmarks.input_pipeline --before cf81ece   # also time an older pipeline

Generates JPEGs of ImageNet's typical size (500×375, quality 90, smooth content plus
noise: about ImageNet's bytes per image) in 10 classes, written twice: as a class-folder
dataset and as a TFDS dataset (TFRecord files, 8 shards). Then times, one after another
in this process, after one warm-up batch each:

- ``pipeline/folder`` and ``pipeline/tfds``: ``data.train_batches``, the
  trainer's own stream (Inception crop with ``decode_and_crop_jpeg``, resize to 224,
  flip, uint8 out), including its bookkeeping: per-epoch permutation, stateless keys,
  decode-error handling, NumPy conversion;
- ``bare``: the same ops on the same files in a plain ``tf.data`` loop (file names
  shuffled, read, cropped, resized, flipped, batched), none of the bookkeeping: the limit
  for this machine;
- ``before/...`` (``--before REV``): the pipeline of git revision REV, loaded from git.

Both pipelines get a shuffle buffer in ImageNet's proportion (16,384 of 1.28M records).

Rows are timed in turn, ``--repeats`` rounds, the best of each kept (the VM is noisy).
It prints images/s and images/s per CPU core, and the ratios to ``bare``. ``--json``
prints ``{"pipeline_images_per_s_per_core": ..., "bare_images_per_s_per_core": ...}``
(the folder source's pipeline) plus every row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

# isort: off
from sasa_flax.quiet_tensorflow import tf
import tensorflow_datasets as tfds

# isort: on
from sasa_flax import config_lib, data

CLASSES = 10


def write_jpegs(root: pathlib.Path, count: int) -> list[tuple[str, int]]:
    """``count`` 500×375 JPEGs (quality 90) in root/c<k>/; returns (path, label)."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (count, 12, 16, 3)).astype(np.float32)
    examples = []
    for i in range(count):
        label = i % CLASSES
        smooth = tf.image.resize(coarse[i][None], (375, 500), method="bicubic")[0]
        noise = rng.normal(0, 12, (375, 500, 3))
        image = np.clip(smooth.numpy() + noise, 0, 255).astype(np.uint8)
        path = root / f"c{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
        examples.append((str(path), label))
    return examples


class SyntheticJpegs(tfds.core.GeneratorBasedBuilder):
    """The generated JPEGs as a TFDS dataset (bytes stored as they are)."""

    VERSION = tfds.core.Version("1.0.0")
    examples: list[tuple[str, int]] = []

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(self.examples),
            "validation": self._generate_examples(self.examples[:10]),
        }

    def _generate_examples(self, examples):
        for i, (path, label) in enumerate(examples):
            yield i, {"image": path, "label": label}


def input_config(args, **fields):
    config = config_lib.base_config().input
    # The shuffle buffer in ImageNet's proportion (16,384 of 1.28M records): the default
    # 16k buffer would hold all of a few thousand images, and refilling it for the next
    # epoch would be most of the work timed, which on ImageNet it is not.
    buffer = max(64, round(args.images * config.shuffle_buffer / 1_281_167))
    config.update(
        image_size=224,
        batch_size=args.batch,
        augment="inception",
        random_flip=True,
        shuffle_buffer=buffer,
        **fields,
    )
    return config


def time_batches(batches, count: int, batch: int) -> float:
    """Images/s over ``count`` batches after one warm-up batch."""
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start)


def bare_loop(files, labels, args):
    """The same operations as the pipeline, in plain tf.data."""
    size = args.batch

    def preprocess(image, label, index):
        seed = tf.stack([tf.constant(0, tf.int64), index])
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            seed=seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        box = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = tf.image.decode_and_crop_jpeg(image, box, channels=3)
        image = tf.image.resize(image, (224, 224), method="bicubic")
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
        image = tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)
        return {"image": image, "label": label}

    ds = tf.data.Dataset.from_tensor_slices((files, labels)).shuffle(len(files), seed=0)
    # Reading is its own stage: with reads inside the parallel decode map, tf.data's
    # autotuner gave this machine about 20% fewer images/s.
    ds = ds.repeat().enumerate().map(lambda i, fl: (tf.io.read_file(fl[0]), fl[1], i))
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return iter(tfds.as_numpy(ds.batch(size, drop_remainder=True).prefetch(2)))


def load_revision(revision: str):
    """The single-file pipeline (sasa_flax/input_pipeline.py, before it became the
    sasa_flax/data package) as it was at a git revision, as a module."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:sasa_flax/input_pipeline.py"],
        check=False,
        capture_output=True,
        text=True,
    )
    if shown.returncode != 0:
        sys.exit(
            f"--before {revision}: it has no sasa_flax/input_pipeline.py (the pipeline became "
            "the sasa_flax/data package later); give a revision from before that."
        )
    source = shown.stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "input_pipeline_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("input_pipeline_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10, help="timed, after one warm-up")
    parser.add_argument("--before", default="", help="a git revision to time as well")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best is kept")
    parser.add_argument("--workdir", default="", help="where the data goes (default: temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="sasa-input-"))
    folder = root / "folder"
    if not folder.exists():
        SyntheticJpegs.examples = write_jpegs(folder, args.images)
    else:
        SyntheticJpegs.examples = [
            (str(p), int(p.parent.name[1:])) for p in sorted(folder.glob("c*/*.jpg"))
        ]
    builder = SyntheticJpegs(data_dir=str(root / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(max_examples_per_split=None)
    )
    files = np.array([p for p, _ in SyntheticJpegs.examples])
    labels = np.array([y for _, y in SyntheticJpegs.examples], np.int32)
    mean_bytes = np.mean([os.path.getsize(f) for f in files[:200]])

    sources = {
        "folder": input_config(args, dataset="folder", data_dir=str(folder)),
        "tfds": input_config(args, dataset="synthetic_jpegs", data_dir=str(root / "tfds")),
    }
    before = load_revision(args.before) if args.before else None

    def stream(module, config):
        return module.train_batches(module.load(config), config, seed=0)

    makers = {"bare": lambda: bare_loop(files, labels, args)}
    for name, config in sources.items():
        makers[f"pipeline/{name}"] = lambda config=config: stream(data, config)
        if before is not None:
            makers[f"before/{name}"] = lambda config=config: stream(before, config)
    rows = {}
    for _ in range(args.repeats):  # interleaved, best of: this VM is noisy
        for name, make in makers.items():
            rate = time_batches(make(), args.batches, args.batch)
            rows[name] = max(rows.get(name, 0.0), rate)

    if args.json:
        per_core = {k: v / cores for k, v in rows.items()}
        print(
            json.dumps(
                {
                    "pipeline_images_per_s_per_core": per_core["pipeline/folder"],
                    "bare_images_per_s_per_core": per_core["bare"],
                    "cores": cores,
                    "images_per_s_per_core": per_core,
                },
                indent=1,
            )
        )
        return
    print(
        f"{len(files)} JPEGs 500×375 q90 ({mean_bytes / 1e3:.0f} kB each), batch {args.batch} "
        f"at 224², inception crop + flip; {cores} CPU cores; tensorflow {tf.__version__}"
    )
    print("\n| pipeline | images/s | per core | ÷ bare |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.0f} | {rate / cores:.0f} | {rate / rows['bare']:.2f} |")
    for source in sources:
        if f"before/{source}" in rows:
            gain = rows[f"pipeline/{source}"] / rows[f"before/{source}"]
            print(f"\n{source}: this pipeline ÷ {args.before}'s = {gain:.2f}")


if __name__ == "__main__":
    sys.exit(main())
