"""The input pipeline: TFDS (mock data), folders of images, digits; sharding, resumption."""

import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sasa_flax import config_lib, data
from sasa_flax.data import augment, sources
from sasa_flax.run import distributed
from tests import helpers


def input_config(**fields):
    config = config_lib.base_config().input
    config.update(**fields)
    return config


@pytest.mark.parametrize("augment", ["inception", "pad"])
def test_imagenet_on_mock_data(augment):
    config = input_config(
        dataset="imagenet2012",
        image_size=64,
        batch_size=8,
        eval_batch_size=8,
        shuffle_buffer=32,
        augment=augment,
    )
    with tfds.testing.mock_data(num_examples=20):
        dataset = data.load(config)
        assert dataset.num_classes == 1000 and dataset.train.stream is not None
        batch = next(data.train_batches(dataset, config, seed=0))
        evals = list(data.eval_batches(dataset, config))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and np.all((batch["label"] >= 0) & (batch["label"] < 1000))
    assert batch["image"].std() > 10  # real pixels (normalised later, on the device)
    assert len(evals) == 3 and [int(e["mask"].sum()) for e in evals] == [8, 8, 4]
    assert all(e["image"].shape == (8, 64, 64, 3) for e in evals)


def test_tuning_split_holds_out_four_percent_of_train():
    digits = data.load(input_config(dataset="digits", image_size=8, tuning_split=True))
    assert digits.eval.size == round(0.04 * 1437) and digits.train.size == 1437 - digits.eval.size


def test_digits_split_and_normalisation():
    config = input_config(
        dataset="digits", image_size=32, batch_size=64, augment="pad", random_flip=False
    )
    dataset = data.load(config)
    assert (dataset.train.size, dataset.eval.size, dataset.num_classes) == (1437, 360, 10)
    batch = next(data.train_batches(dataset, config, seed=0))
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8
    normalised = data.normalise(batch["image"])  # what the train step does on the device
    np.testing.assert_allclose(
        normalised * data.STDDEV_RGB + data.MEAN_RGB, batch["image"], atol=1e-3
    )


def assert_resumes_exactly(dataset, config, seed, start_step, steps):
    """Batches ``start_step`` .. ``steps`` - 1 of a stream resumed at ``start_step`` are the
    uninterrupted stream's; returns the uninterrupted batches."""
    stream = data.train_batches(dataset, config, seed=seed)
    uninterrupted = [next(stream) for _ in range(steps)]
    resumed = data.train_batches(dataset, config, seed=seed, start_step=start_step)
    for expected in uninterrupted[start_step:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    return uninterrupted


def test_resuming_mid_epoch_gives_the_same_batches():
    config = input_config(dataset="digits", image_size=16, batch_size=200, augment="pad")
    dataset = data.load(config)  # 7 steps per epoch: step 9 is in the second epoch
    uninterrupted = assert_resumes_exactly(dataset, config, seed=3, start_step=9, steps=11)
    # epochs are reshuffled, and a different seed gives a different order
    assert not np.array_equal(uninterrupted[0]["label"], uninterrupted[7]["label"])
    other = next(data.train_batches(dataset, config, seed=4))
    assert not np.array_equal(other["label"], uninterrupted[0]["label"])


def test_tfds_resumes_exactly_across_epochs_with_shuffled_files():
    config = input_config(
        dataset="imagenet2012", image_size=8, batch_size=8, shuffle_buffer=4, augment="pad"
    )
    with tfds.testing.mock_data(num_examples=24):  # 3 steps per epoch
        assert_resumes_exactly(data.load(config), config, seed=5, start_step=4, steps=7)


def test_processes_read_disjoint_shards_that_cover_the_split():
    config = input_config(dataset="digits", image_size=8, eval_batch_size=50)
    labels, sizes = [], []
    for index in range(3):
        dataset = data.load(config, process_index=index, process_count=3)
        batches = list(data.eval_batches(dataset, config))
        assert len(batches) == data.num_eval_batches(dataset, 50)  # same count everywhere
        sizes.append(int(sum(b["mask"].sum() for b in batches)))
        labels.append(np.concatenate([b["label"][b["mask"] > 0] for b in batches]))
    assert sum(sizes) == 360  # every eval example exactly once over the processes
    everything = np.concatenate(labels)
    single = data.load(config)
    expected = np.concatenate(
        [b["label"][b["mask"] > 0] for b in data.eval_batches(single, config)]
    )
    np.testing.assert_array_equal(everything, expected)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=(20, 24)):
    """Random PNGs and JPEGs (``helpers.write_image_folder``) and a stray text file."""
    helpers.write_image_folder(root, dict.fromkeys(classes, per_class), size, seed=0)
    (root / "notes.txt").write_text("not an image")


def test_folder_dataset(tmp_path):
    write_image_folder(tmp_path)
    config = input_config(
        dataset="folder", data_dir=str(tmp_path), image_size=16, batch_size=4, eval_batch_size=4
    )
    dataset = data.load(config)
    assert dataset.num_classes == 3 and dataset.train.size + dataset.eval.size == 15
    batch = next(data.train_batches(dataset, config, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"]) <= {0, 1, 2}
    assert (
        sum(int(b["mask"].sum()) for b in data.eval_batches(dataset, config)) == dataset.eval.size
    )


def test_hidden_and_archive_folders_are_not_classes(tmp_path, caplog):
    write_image_folder(tmp_path)
    for stray in ("__MACOSX", ".ipynb_checkpoints"):  # with images in them, as zips leave
        write_image_folder(tmp_path / stray, classes=("cat",), per_class=1)
    with caplog.at_level("INFO", logger="sasa_flax"):
        dataset = data.load(input_config(dataset="folder", data_dir=str(tmp_path)))
    assert dataset.num_classes == 3 and dataset.train.size + dataset.eval.size == 15
    assert any("skipped .ipynb_checkpoints, __MACOSX" in r.getMessage() for r in caplog.records)


def test_folder_with_train_and_val_subfolders(tmp_path):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2)
    dataset = data.load(input_config(dataset="folder", data_dir=str(tmp_path)))
    assert (dataset.train.size, dataset.eval.size) == (15, 6)


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "at least two"),  # empty folder
        (lambda p: (p / "only").mkdir(), "at least two"),
        (lambda p: [(p / c).mkdir() for c in "ab"], "no images"),
        # an empty class folder beside real ones: named, not trained as a class never seen
        (lambda p: write_image_folder(p) or (p / "empty").mkdir(), r"without images.*: empty\."),
    ],
)
def test_folder_errors(tmp_path, setup, match):
    """Raised by load, or by the split when it is built (make_setup builds both)."""
    setup(tmp_path)
    with pytest.raises(data.DatasetError, match=match):
        dataset = data.load(input_config(dataset="folder", data_dir=str(tmp_path)))
        dataset.train  # noqa: B018


def test_evaluating_never_builds_the_training_split(tmp_path, monkeypatch):
    """eval.py's setup opens the evaluation split only: the training folder's images are
    never listed, nor a TFDS training split sized."""
    from sasa_flax import trainer

    for split, count in (("train", 12), ("val", 4)):
        helpers.write_image_folder(tmp_path / split, dict.fromkeys("ab", count // 2), (8, 8))
    listed = []
    files_under = data.FolderTree.files_under
    monkeypatch.setattr(
        data.FolderTree,
        "files_under",
        lambda self, folder: listed.append(folder) or files_under(self, folder),
    )
    config = config_lib.load_config("tests/tiny_config.py:batch=4")
    config.input.update(dataset="folder", data_dir=str(tmp_path), eval_batch_size=4)
    config.model.num_classes = 2
    setup = trainer.make_eval_setup(config, devices=jax.devices()[:1])
    assert setup.dataset.eval.size == 4 and all(f.startswith("val/") for f in listed)
    listed.clear()
    assert trainer.make_setup(config, devices=jax.devices()[:1]).dataset.train.size == 12
    assert any(f.startswith("train/") for f in listed)


def test_unknown_tfds_name_and_unprepared_imagenet(tmp_path):
    with pytest.raises(data.DatasetError, match="not a TFDS dataset"):
        data.load(input_config(dataset="imagenet2013"))
    with pytest.raises(data.DatasetError, match="manual_dir"):
        data.load(input_config(dataset="imagenet2012", data_dir=str(tmp_path)))


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
        dataset="folder",
        data_dir=str(tmp_path),
        image_size=16,
        batch_size=11,
        eval_batch_size=4,
        augment=augment,
    )
    dataset = data.load(config)
    assert (dataset.train.size, dataset.eval.size) == (11, 11)
    with pytest.raises(data.DatasetError, match="could not be decoded.*corrupt_images='skip'"):
        next(data.train_batches(dataset, config, seed=0))
    with pytest.raises(data.DatasetError, match="evaluation split could not be decoded"):
        list(data.eval_batches(dataset, config))

    config.corrupt_images = "skip"
    batch = next(data.train_batches(dataset, config, seed=0))  # one batch: the whole epoch
    assert batch["image"].shape == (11, 16, 16, 3)
    assert batch["mask"].sum() == 9  # the two bad images are kept in place, with weight 0
    assert np.all(batch["image"][batch["mask"] == 0] == 0)
    evals = list(data.eval_batches(dataset, config))
    assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 9


# --- mixing, keys and epochs (issue 16) ------------------------------------------------


def test_a_class_sorted_folder_many_times_the_buffer_is_well_mixed(tmp_path):
    """ImageNet as a class-folder tree is 1.28M files sorted by class against a 16k
    buffer; here 600 files against a buffer of 8. Every batch must still mix the classes."""
    write_image_folder(tmp_path, classes=[f"c{i}" for i in range(10)], per_class=60, size=(8, 8))
    config = input_config(
        dataset="folder",
        data_dir=str(tmp_path),
        image_size=8,
        batch_size=40,
        augment="pad",
        shuffle_buffer=8,
    )
    dataset = data.load(config)
    stream = data.train_batches(dataset, config, seed=0)
    steps = data.steps_per_epoch(dataset, 40)
    epoch = [next(stream)["label"] for _ in range(steps)]
    # A uniform draw of 40 from 10 classes misses a class with probability ~1.5%.
    assert min(len(np.unique(labels)) for labels in epoch) >= 7
    assert np.bincount(np.concatenate(epoch), minlength=10).min() >= 40  # of about 54 each
    second = [next(stream)["label"] for _ in range(steps)]
    assert not np.array_equal(np.concatenate(epoch), np.concatenate(second))


def _key_probe(image, split, size, seed):
    """An 'augmentation' whose output is a function of its random key only."""
    del image, split
    return tf.random.stateless_uniform((size, size, 3), seed, 0, 255)


def test_training_images_keep_their_labels(monkeypatch):
    """Through the shuffled, multi-epoch training path every image arrives with its own
    label: with an augmentation that only resizes, each training image is one of the
    split's, under that image's label."""
    resize = augment._resize
    unaugmented = data.Augmentation(
        lambda image, split, size, _: resize(image, split, size), resize
    )
    monkeypatch.setitem(data.AUGMENTATIONS, "none", unaugmented)
    config = input_config(
        dataset="digits", image_size=8, batch_size=500, augment="none", random_flip=False
    )
    dataset = data.load(config)
    label_of = {}
    for image, label, _ in data.examples(dataset.train).as_numpy_iterator():
        resized = tf.cast(tf.round(tf.image.resize(image, (8, 8))), tf.uint8).numpy()
        label_of.setdefault(resized.tobytes(), set()).add(int(label))
    stream = data.train_batches(dataset, config, seed=0, start_step=1)  # crosses an epoch
    for batch in (next(stream) for _ in range(3)):
        for image, label in zip(batch["image"], batch["label"], strict=True):
            assert int(label) in label_of[image.tobytes()]


@pytest.mark.parametrize("processes", [2, 3])
def test_global_batches_and_keys_do_not_depend_on_the_process_count(monkeypatch, processes):
    monkeypatch.setitem(
        data.AUGMENTATIONS, "key_probe", data.Augmentation(_key_probe, augment._resize)
    )
    config = input_config(dataset="digits", image_size=8, batch_size=60, augment="key_probe")
    single = data.train_batches(
        data.load(config), config, seed=1, start_step=22
    )  # epoch 0 ends at 23
    shards = [
        data.train_batches(
            data.load(config, process_index=i, process_count=processes),
            config,
            seed=1,
            start_step=22,
        )
        for i in range(processes)
    ]
    seen = set()
    for _ in range(3):
        expected = next(single)
        parts = [next(shard) for shard in shards]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
        # No two examples of the run share an augmentation draw: every image is distinct.
        seen.update(image.tobytes() for image in expected["image"])
    assert len(seen) == 3 * 60


def test_tfds_processes_never_share_an_augmentation_key(monkeypatch):
    monkeypatch.setitem(
        data.AUGMENTATIONS, "key_probe", data.Augmentation(_key_probe, augment._resize)
    )
    config = input_config(
        dataset="imagenet2012", image_size=8, batch_size=8, shuffle_buffer=4, augment="key_probe"
    )
    with tfds.testing.mock_data(num_examples=24):
        shards = [
            data.train_batches(data.load(config, process_index=i, process_count=2), config, seed=0)
            for i in range(2)
        ]
        images = [next(shard)["image"] for _ in range(4) for shard in shards]
    assert len({image.tobytes() for batch in images for image in batch}) == 4 * 8


def test_only_process_0_prepares_and_every_process_reports_its_failure(monkeypatch):
    class Builder:
        name, data_dir, built = "toy", "/data", 0

        def as_dataset(self, split):
            raise AssertionError("not prepared")

        def download_and_prepare(self, download_config):
            self.built += 1
            raise OSError("no internet")

    config = input_config(dataset="toy")
    shared = {}

    def share(key, message):  # process 0's message, handed to everyone (as distributed's)
        shared.setdefault(key, message)
        return shared[key]

    monkeypatch.setattr(distributed, "share_from_process_0", share)

    errors = []
    builders = [Builder(), Builder()]
    for index, builder in enumerate(builders):
        with pytest.raises(data.DatasetError) as raised:
            sources._prepare(builder, config, index, 2)
        errors.append(str(raised.value))
    assert [b.built for b in builders] == [1, 0]  # process 1 waited, it did not build
    assert errors[0] == errors[1] and "building it failed (OSError: no internet)" in errors[0]


def test_the_next_epochs_shuffle_buffer_fills_before_the_loop_reaches_it(monkeypatch):
    """A streamed split (TFDS) refills its shuffle buffer every epoch. That must happen in
    the background while the previous epoch is read, not when the loop crosses the
    boundary (a stall of seconds on ImageNet). Checked without timing anything: the
    records read from epoch 1's stream before the loop asks for its first batch."""
    import collections

    reads = collections.Counter()  # shuffle seed (= epoch, for seed 0) -> records read

    def source(input_config, process_index, process_count):
        def stream(shuffle_seed=None):
            def record(i):
                tf.py_function(lambda: reads.update([shuffle_seed]), [], [])
                return tf.zeros((8, 8, 3), tf.uint8), tf.cast(i % 2, tf.int32), "x"

            return tf.data.Dataset.range(240).map(record)

        split = data.Split(size=240, encoded=False, name="streamed", stream=stream)
        return data.Dataset(split, split, num_classes=2)

    monkeypatch.setitem(data.SOURCES, "streamed", source)
    config = input_config(
        dataset="streamed", image_size=8, batch_size=4, augment="pad", shuffle_buffer=200
    )
    dataset = data.load(config)
    stream = data.train_batches(dataset, config, seed=0)
    for _ in range(data.steps_per_epoch(dataset, 4)):  # all of epoch 0
        next(stream)
    deadline = time.monotonic() + 60  # only a broken overlap waits this long
    while reads[1] < 200 + 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reads[1] >= 200 + 4, reads  # epoch 1's buffer, and its first batch, are ready
    assert reads[2] == 0  # one epoch ahead, not more
    next(stream)  # epoch 1's first batch


def test_scan_folder_reads_local_folders_and_gfile_urls(tmp_path):
    (tmp_path / "x" / "deep").mkdir(parents=True)
    (tmp_path / "x" / "deep" / "1.png").write_bytes(b"abc")
    (tmp_path / "y").mkdir()
    for root in (str(tmp_path), f"file://{tmp_path}"):
        tree = data.scan_folder(root)
        assert tree.subfolders() == ["x", "y"], root
        assert tree.files_under("x") == ["x/deep/1.png"] and tree.files["x/deep/1.png"] == 3
    assert data.scan_folder(str(tmp_path / "missing")) is None


def test_the_global_batches_are_the_same_on_any_number_of_processes():
    """Random-access splits: the global stream does not depend on how many processes read
    it, so a run resumed on another topology continues the same data order."""
    config = config_lib.load_config("tests/tiny_config.py").input
    one = next(data.train_batches(data.load(config), config, seed=0, start_step=7))
    halves = [
        next(
            data.train_batches(
                data.load(config, process_index=i, process_count=2), config, seed=0, start_step=7
            )
        )
        for i in range(2)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), one[key])
