"""The input pipeline: TFDS (mock data), folders of images, digits; sharding, resumption."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sasa_flax import config_lib
from sasa_flax import input_pipeline as ip


def input_config(**fields):
    config = config_lib.base_config().input
    config.update(**fields)
    return config


def unnormalise(images):
    return images * ip.STDDEV_RGB + ip.MEAN_RGB


@pytest.mark.parametrize("augment", ["inception", "pad"])
def test_imagenet_on_mock_data(augment):
    config = input_config(
        dataset="imagenet2012", image_size=64, batch_size=8, eval_batch_size=8,
        shuffle_buffer=32, augment=augment,
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=20):
        dataset = ip.load(config)
        assert dataset.num_classes == 1000 and dataset.train.jpeg
        batch = next(ip.train_batches(dataset, config, seed=0))
        evals = list(ip.eval_batches(dataset, config))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and np.all((batch["label"] >= 0) & (batch["label"] < 1000))
    pixels = unnormalise(batch["image"])  # normalised with the ImageNet mean / std
    assert pixels.min() >= -1.0 and pixels.max() <= 256.0 and pixels.std() > 10
    assert len(evals) == 3 and [int(e["mask"].sum()) for e in evals] == [8, 8, 4]
    assert all(e["image"].shape == (8, 64, 64, 3) for e in evals)


def test_tuning_split_holds_out_four_percent_of_train():
    digits = ip.load(input_config(dataset="digits", image_size=8, tuning_split=True))
    assert digits.eval.size == round(0.04 * 1437) and digits.train.size == 1437 - digits.eval.size


def test_digits_split_and_normalisation():
    config = input_config(
        dataset="digits", image_size=32, batch_size=64, augment="pad", random_flip=False
    )
    dataset = ip.load(config)
    assert (dataset.train.size, dataset.eval.size, dataset.num_classes) == (1437, 360, 10)
    batch = next(ip.train_batches(dataset, config, seed=0))
    assert batch["image"].shape == (64, 32, 32, 3)
    pixels = unnormalise(batch["image"])
    assert pixels.min() > -1.0 and pixels.max() < 256.0


def test_resuming_mid_epoch_gives_the_same_batches():
    config = input_config(dataset="digits", image_size=16, batch_size=200, augment="pad")
    dataset = ip.load(config)  # 7 steps per epoch: step 9 is in the second epoch
    stream = ip.train_batches(dataset, config, seed=3)
    uninterrupted = [next(stream) for _ in range(11)]
    resumed = ip.train_batches(dataset, config, seed=3, start_step=9)
    for expected in uninterrupted[9:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    # epochs are reshuffled, and a different seed gives a different order
    assert not np.array_equal(uninterrupted[0]["label"], uninterrupted[7]["label"])
    other = next(ip.train_batches(dataset, config, seed=4))
    assert not np.array_equal(other["label"], uninterrupted[0]["label"])


def test_processes_read_disjoint_shards_that_cover_the_split():
    config = input_config(dataset="digits", image_size=8, eval_batch_size=50)
    labels, sizes = [], []
    for index in range(3):
        dataset = ip.load(config, process_index=index, process_count=3)
        batches = list(ip.eval_batches(dataset, config, process_count=3))
        assert len(batches) == ip.num_eval_batches(dataset, 50, 3)  # same count everywhere
        sizes.append(int(sum(b["mask"].sum() for b in batches)))
        labels.append(np.concatenate([b["label"][b["mask"] > 0] for b in batches]))
    assert sum(sizes) == 360  # every eval example exactly once over the processes
    everything = np.concatenate(labels)
    single = ip.load(config)
    expected = np.concatenate([b["label"][b["mask"] > 0] for b in ip.eval_batches(single, config)])
    np.testing.assert_array_equal(everything, expected)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=(20, 24)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
            (root / name / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(encode(image).numpy())
    (root / "notes.txt").write_text("not an image")


def test_folder_dataset(tmp_path):
    write_image_folder(tmp_path)
    config = input_config(
        dataset="folder", data_dir=str(tmp_path), image_size=16, batch_size=4, eval_batch_size=4
    )
    dataset = ip.load(config)
    assert dataset.num_classes == 3 and dataset.train.size + dataset.eval.size == 15
    batch = next(ip.train_batches(dataset, config, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"]) <= {0, 1, 2}
    assert sum(int(b["mask"].sum()) for b in ip.eval_batches(dataset, config)) == dataset.eval.size


def test_folder_with_train_and_val_subfolders(tmp_path):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2)
    dataset = ip.load(input_config(dataset="folder", data_dir=str(tmp_path)))
    assert (dataset.train.size, dataset.eval.size) == (15, 6)


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "at least two"),  # empty folder
        (lambda p: (p / "only").mkdir(), "at least two"),
        (lambda p: [(p / c).mkdir() for c in "ab"], "no images"),
    ],
)
def test_folder_errors(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(ip.DatasetError, match=match):
        ip.load(input_config(dataset="folder", data_dir=str(tmp_path)))


def test_unknown_tfds_name_and_unprepared_imagenet(tmp_path):
    with pytest.raises(ip.DatasetError, match="not a TFDS dataset"):
        ip.load(input_config(dataset="imagenet2013"))
    with pytest.raises(ip.DatasetError, match="manual_dir"):
        ip.load(input_config(dataset="imagenet2012", data_dir=str(tmp_path)))


def write_corrupt_images(root):
    """A truncated JPEG and a file of garbage among the good ones of class 'cat'."""
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))


@pytest.mark.parametrize("augment", ["inception", "pad"])
def test_corrupt_images_fail_with_the_fix_or_are_skipped_and_counted(tmp_path, augment):
    for split in ("train", "val"):
        write_image_folder(tmp_path / split, per_class=3)
        write_corrupt_images(tmp_path / split)
    config = input_config(
        dataset="folder", data_dir=str(tmp_path), image_size=16, batch_size=11,
        eval_batch_size=4, augment=augment,
    )  # fmt: skip
    dataset = ip.load(config)
    assert (dataset.train.size, dataset.eval.size) == (11, 11)
    with pytest.raises(ip.DatasetError, match="could not be decoded.*corrupt_images='skip'"):
        next(ip.train_batches(dataset, config, seed=0))
    with pytest.raises(ip.DatasetError, match="evaluation split could not be decoded"):
        list(ip.eval_batches(dataset, config))

    config.corrupt_images = "skip"
    batch = next(ip.train_batches(dataset, config, seed=0))  # one batch: the whole epoch
    assert batch["image"].shape == (11, 16, 16, 3)
    assert batch["mask"].sum() == 9  # the two bad images are kept in place, with weight 0
    assert np.all(batch["image"][batch["mask"] == 0] == 0)
    evals = list(ip.eval_batches(dataset, config))
    assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 9
