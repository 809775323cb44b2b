"""A workdir is one run: the lock, stale locks, and folder datasets' split names."""

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sasa_flax import config_lib, data, trainer
from sasa_flax.run import Workdir, checkpoints, lock, restoring, saves
from sasa_flax.run.workdir import WorkdirError
from tests.helpers import damage_checkpoint, prepare_tfds, tiny_config, write_image_folder


def _write_lock(workdir, **holder):
    workdir.mkdir(parents=True, exist_ok=True)
    content = dict(
        host=socket.gethostname(),
        pid=os.getppid(),
        started=time.time(),
        heartbeat=time.time(),
        token="x",
    )
    content.update(holder)
    (workdir / Workdir.LOCK).write_text(json.dumps(content))


@pytest.mark.parametrize(
    "root, object_store, url",
    [
        ("/runs/a", False, "file:///runs/a/"),
        ("file:///runs/a", False, "file:///runs/a/"),
        ("gs://bucket/runs/a", True, "gs://bucket/runs/a/"),
        ("gs://bucket/runs/a/", True, "gs://bucket/runs/a/"),
        ("memory://a", True, "memory://a/"),
    ],
)
def test_a_workdir_joins_every_path_one_way_and_decides_object_stores_once(root, object_store, url):
    workdir = Workdir.of(root)
    root = root.removeprefix("file://")  # a local path, as the other
    assert Workdir.of(workdir) is workdir and str(workdir) == root
    assert workdir.on_object_store is object_store
    assert workdir.kvstore_url == url
    base = root.rstrip("/")
    assert workdir.join(Workdir.CHECKPOINTS) == f"{base}/checkpoints"
    if not root.startswith("memory://"):  # tensorstore's test store, not a filesystem
        assert str(workdir.checkpoints) == f"{base}/checkpoints"
        assert str(workdir.lock) == f"{base}/train.lock"
        assert str(workdir.eval_events) == f"{base}/eval"
        assert str(workdir.profile) == f"{base}/profile"
    assert Workdir.eval_results_file(7) == "eval_results_step_7.json"
    assert Workdir.eval_results_file(7, "image_size=64") == "eval_results_step_7_image_size=64.json"


def test_a_local_workdir_is_absolute_however_it_was_typed(tmp_path, monkeypatch):
    """orbax refuses relative paths, and the shell expands no ``~`` after ``--workdir=``:
    every way of typing one folder is that folder's absolute path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    absolute = str(tmp_path / "runs" / "x")
    for typed in ("runs/x", "./runs/x", "runs/x/", "~/runs/x", "runs/../runs/x", absolute):
        assert Workdir.of(typed).root == absolute, typed
    assert Workdir("gs://bucket/runs/x").root == "gs://bucket/runs/x"


def test_relative_and_home_workdirs_train_resume_and_finish_one_run(tmp_path, monkeypatch):
    """A new run typed relative saves (it used to fail at its first save); the same run
    typed another way resumes it and finds it finished, setting nothing aside."""
    config, devices = tiny_config(num_steps=2, checkpoint_every_steps=1), jax.devices()[:1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    stopped = trainer.train_and_evaluate(config, "runs/x", devices=devices, stop_after_step=1)
    assert stopped["step"] == 1
    run = tmp_path / "runs" / "x"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
    finished = trainer.train_and_evaluate(config, "./runs/x", devices=devices)  # resumes
    assert finished["step"] == 2 and "already_finished" not in finished
    again = trainer.train_and_evaluate(config, "~/runs/x", devices=devices)
    assert again["already_finished"] and again["top1"] == finished["top1"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    assert not (run / Workdir.DAMAGED).exists()
    starts = json.loads((run / Workdir.RUN_RECORD).read_text())["starts"]
    assert [s["start_step"] for s in starts] == [0, 1]


def test_a_workdir_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    for command in (trainer.train_and_evaluate, trainer.evaluate_checkpoint):
        with pytest.raises(WorkdirError, match=r"run is a file, not a directory"):
            command(tiny_config(), str(tmp_path / "run"))


def _small_checkpoint(tmp_path):
    """(manager, abstract items) of a one-step checkpoint of a small tree."""
    workdir = Workdir(str(tmp_path))
    mngr = checkpoints.manager(Workdir.of(workdir))
    model = dict(w=jax.random.normal(jax.random.key(0), (64, 64)))
    train = dict(step=np.int32(1))
    saving = saves.Saves(mngr, workdir, model, train)
    saving.start(1, model=model, train=train, meta=dict(step=1))
    saving.finish()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (model, train))
    return checkpoints.manager(Workdir.of(workdir), read_only=True), dict(
        zip(("model", "train"), abstract, strict=True)
    )


@pytest.mark.parametrize("how", ["truncated", "missing_meta", "unparsable_metadata"])
def test_damage_is_found_in_the_bytes_and_set_aside(tmp_path, how):
    mngr, abstract = _small_checkpoint(tmp_path)
    damage_checkpoint(tmp_path / "checkpoints" / "1", how)
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint step 1 is damaged"):
        checkpoints.restore_verified(mngr, 1, **abstract)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint .* verifies"):
        restoring.newest_good(mngr, Workdir(tmp_path), set_bad_aside=True, **abstract)
    assert len(list((tmp_path / Workdir.DAMAGED).iterdir())) == 1  # moved, not deleted


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Checkpoint path should be absolute. Got runs/x/checkpoints/1/model"),
        PermissionError(13, "Permission denied"),
        ModuleNotFoundError("No module named 'tensorstore'"),
    ],
    ids=["path", "permission", "module"],
)
def test_a_read_that_fails_outside_the_bytes_sets_nothing_aside(tmp_path, monkeypatch, error):
    """The relative-workdir disaster: every healthy checkpoint was moved aside because
    the reader failed. Damage is decided by the bytes; a reader's failure ends the run
    naming it, with every checkpoint where it was."""
    mngr, abstract = _small_checkpoint(tmp_path)

    def failing_restore(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints, "restore", failing_restore)
    with pytest.raises(checkpoints.CheckpointUnreadable, match="Nothing was set aside"):
        restoring.newest_good(mngr, Workdir(tmp_path), set_bad_aside=True, **abstract)
    assert not (tmp_path / Workdir.DAMAGED).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    assert checkpoints.restore_verified(mngr, 1, **abstract)["meta"]["step"] == 1


@pytest.mark.parametrize(
    "message, damaged",
    [
        (
            'FAILED_PRECONDITION: Error reading "w/0.0" in OCDBT database: '
            "ZSTD_decompressStream() failed: Data corruption detected",
            True,
        ),
        ("DATA_LOSS: Error decoding manifest", True),
        ("FAILED_PRECONDITION: HTTP response code 412 with body 'precondition'", False),
        ("UNAVAILABLE: connection reset by peer", False),
    ],
)
def test_the_storage_layers_words_decide_not_its_status_code(tmp_path, message, damaged):
    """A corrupt compressed chunk and GCS's 412 share tensorstore's FAILED_PRECONDITION:
    the report about the bytes read decides."""
    mngr, _ = _small_checkpoint(tmp_path)
    verdict = checkpoints.read_failure(mngr, 1, ValueError(message))
    kind = checkpoints.CheckpointError if damaged else checkpoints.CheckpointUnreadable
    assert type(verdict) is kind, verdict


def test_a_workdir_reads_back_what_it_wrote(tmp_path):
    workdir = Workdir(str(tmp_path / "run"))
    assert not workdir.exists()
    workdir.ensure_writable()
    assert workdir.run_record() == {} and workdir.eval_results() == {}
    assert workdir.checkpoint_steps() == []
    workdir.write_run_record(dict(total_steps=9))
    workdir.write_eval_results(9, dict(top1=50.0))
    workdir.write_eval_results(9, dict(top1=40.0), setting="image_size=64")  # not the run's
    (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()
    assert workdir.run_record() == dict(total_steps=9)
    assert workdir.eval_results() == {9: dict(step=9, top1=50.0)}
    assert workdir.checkpoint_steps() == [3]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_trainer_refuses_at_once_naming_the_holder(tmp_path):
    _write_lock(tmp_path, pid=os.getppid())  # a live process: pytest's parent
    with pytest.raises(
        lock.WorkdirLocked,
        match=rf"in use by another trainer \(pid {os.getppid()} on {socket.gethostname()}, "
        r"started .*\).*another --workdir",
    ):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [Workdir.LOCK]  # untouched


def test_a_stale_lock_is_taken_over_and_the_lock_released_at_exit(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid())
    with caplog.at_level("WARNING", logger="sasa_flax"):
        results = trainer.train_and_evaluate(tiny_config(), str(tmp_path), stop_after_step=1)
    assert results["step"] == 1
    assert "taking over the stale lock" in caplog.text
    assert not (tmp_path / Workdir.LOCK).exists()


def test_another_hosts_lock_is_stale_only_without_a_recent_heartbeat(tmp_path):
    _write_lock(tmp_path, host="other-host", heartbeat=time.time() - 10)
    with pytest.raises(lock.WorkdirLocked, match="on other-host"):
        lock.hold(Workdir(tmp_path)).__enter__()
    _write_lock(tmp_path, host="other-host", heartbeat=time.time() - 2 * lock.STALE_AFTER_S)
    with lock.hold(Workdir(tmp_path)):
        holder = json.loads((tmp_path / Workdir.LOCK).read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / Workdir.LOCK).exists()


@pytest.mark.parametrize("eval_name", ["val", "valid", "validation", "test"])
def test_train_beside_an_eval_folder_is_two_splits_not_two_classes(tmp_path, eval_name):
    write_image_folder(tmp_path / "train", dict.fromkeys(["cat", "dog"], 5))
    write_image_folder(tmp_path / eval_name, dict.fromkeys(["cat", "dog"], 2))
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4)
    dataset = data.load(config)
    assert (dataset.num_classes, dataset.train.size, dataset.eval.size) == (2, 10, 4)
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in data.eval_batches(dataset, config)])
    assert sorted(labels) == [0, 0, 1, 1]


def test_what_a_folder_dataset_leaves_out_is_said_in_one_line_each(tmp_path, caplog):
    """Non-image files, a class the evaluation folder lacks, one it has beyond training:
    each named once; images in subfolders of a class folder belong to that class."""
    write_image_folder(tmp_path / "train", dict.fromkeys(["cat", "dog", "owl"], 3))
    write_image_folder(tmp_path / "train" / "owl" / "night", dict(more=2))  # owl, recursively
    write_image_folder(tmp_path / "val", dict.fromkeys(["cat", "dog", "yak"], 1))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("about the data")
    (tmp_path / "train" / ".cache").mkdir()
    (tmp_path / "train" / ".cache" / "index.bin").write_bytes(b"hidden, said elsewhere")
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4)
    with caplog.at_level("WARNING", logger="sasa_flax"):
        dataset = data.load(config)
    assert (dataset.num_classes, dataset.train.size, dataset.eval.size) == (3, 11, 2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "ignored 2 file(s) that are not images" in lines[0]
    assert "README.md" in lines[0] and "train/cat/notes.txt" in lines[0]
    assert "index.bin" not in lines[0]
    assert f"{tmp_path}/val has no folder for 1 class(es)" in lines[1] and "owl" in lines[1]
    assert "class folder(s) that" in lines[2] and "yak" in lines[2]


def test_a_class_folder_named_like_a_split_is_refused_with_the_fix(tmp_path):
    write_image_folder(tmp_path, dict.fromkeys(["training", "valid_not", "train"], 3))
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4)
    with pytest.raises(data.DatasetError, match=r"named like splits: \['train'\]"):
        data.load(config)


def test_an_empty_eval_image_is_reported_at_setup_naming_the_file(tmp_path):
    """Before any training step (make_setup builds both splits), not at the evaluation."""
    write_image_folder(tmp_path / "train", dict.fromkeys(["cat", "dog"], 4))
    write_image_folder(tmp_path / "val", dict.fromkeys(["cat", "dog"], 1))
    (tmp_path / "val" / "dog" / "empty.png").write_bytes(b"")
    config = config_lib.load_config("tests/tiny_config.py:batch=4")
    config.input.update(dataset="folder", data_dir=str(tmp_path), eval_batch_size=4)
    config.model.num_classes = 2
    with pytest.raises(data.DatasetError, match=r"1 empty .*val/dog/empty\.png"):
        trainer.make_setup(config, devices=jax.devices()[:1])
    config.input.corrupt_images = "skip"
    assert data.load(config.input).eval.size == 3  # skipped later, and counted


def test_an_undecodable_training_image_is_named_by_path(tmp_path):
    write_image_folder(tmp_path, dict.fromkeys(["cat", "dog"], 4))
    (tmp_path / "dog" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    config = config_lib.base_config().input
    config.update(
        dataset="folder", data_dir=str(tmp_path), image_size=8, batch_size=8, augment="pad"
    )
    dataset = data.load(config)
    with pytest.raises(data.DatasetError, match=r"dog/garbage\.png is corrupt"):
        list(itertools.islice(data.train_batches(dataset, config, seed=0), 3))


def test_an_undecodable_tfds_image_is_named_by_its_record(tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def twelve_pngs_the_8th_garbage():  # raw bytes: TFDS cannot refuse them
        png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
        return ({"image": b"\x89PNG garbage" if i == 7 else png, "label": i % 2} for i in range(12))

    features = {
        "image": tfds.features.Tensor(shape=(), dtype=tf.string),
        "label": tfds.features.ClassLabel(num_classes=2),
    }
    splits = dict.fromkeys(("train", "validation"), twelve_pngs_the_8th_garbage)
    prepare_tfds(tmp_path, "WithACorruptImage", features, splits)
    config = config_lib.base_config().input
    config.update(
        dataset="with_a_corrupt_image",
        data_dir=str(tmp_path),
        image_size=8,
        batch_size=4,
        augment="pad",
    )
    dataset = data.load(config)
    record = r"TFDS record with_a_corrupt_image-{}\.tfrecord-00000-of-00001__\d+ is corrupt"
    with pytest.raises(data.DatasetError, match=record.format("train")) as raised:
        list(itertools.islice(data.train_batches(dataset, config, seed=0), 6))
    assert "function_node" not in str(raised.value)  # TensorFlow's op name is left out
    with pytest.raises(data.DatasetError, match=record.format("validation")):
        list(data.eval_batches(dataset, config))


@pytest.mark.slow
def test_a_corrupt_image_mid_run_ends_in_one_line_with_the_checkpoints_intact(tmp_path):
    from tests.helpers import train

    write_image_folder(tmp_path / "data" / "train", dict.fromkeys([f"c{i}" for i in range(10)], 8))
    write_image_folder(tmp_path / "data" / "val", dict.fromkeys([f"c{i}" for i in range(10)], 1))
    (tmp_path / "data" / "train" / "c3" / "bad.png").write_bytes(b"\x89PNG" + bytes(60))
    run = train(
        tmp_path / "run",
        "steps=30,checkpoint_every=1,batch=8",
        "--config.input.dataset=folder",
        f"--config.input.data_dir={tmp_path / 'data'}",
    )
    assert run.finish() == 1, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "c3/bad.png is corrupt" in errors[0]
    assert "Traceback" not in run.output and "cannot schedule new futures" not in run.output
    assert "rendezvous" not in run.output  # TensorFlow's C++ lines before the one error
    mngr = checkpoints.manager(Workdir(tmp_path / "run"), read_only=True)
    steps = sorted(mngr.all_steps())
    assert steps, run.output  # the bad image is in a later batch than the first
    for step in steps:  # every listed checkpoint is complete
        assert (tmp_path / "run" / "checkpoints" / str(step) / "meta").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_the_rerun_resumes(small_disk):
    """A real full disk mid-save: one line naming the step, the cause and the space a
    checkpoint needs; nothing half-written left; the rerun resumes."""
    from tests.helpers import train

    workdir = small_disk / "run"
    run = train(workdir, "steps=200,checkpoint_every=1")
    run.wait_for(r"step 3/200")
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:  # fill it to the last byte
        while True:
            f.write(bytes(1 << 16))
            f.flush()
    assert run.finish() == 1, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.output[-3000:]
    assert "could not be written" in errors[0] and "no space left on the device" in errors[0]
    assert "a checkpoint needs about" in errors[0] and "free there now" in errors[0]
    assert "Traceback" not in run.output and "cannot schedule new futures" not in run.output
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    steps = sorted(checkpoints.manager(Workdir(workdir), read_only=True).all_steps())
    assert steps  # the newest complete checkpoint is listed, and intact:
    assert (workdir / "checkpoints" / str(steps[-1]) / "meta").exists()
    filler.unlink()
    rerun = train(workdir, "steps=200,checkpoint_every=1")
    rerun.wait_for(rf"resumed from step {steps[-1]} ")
    rerun.popen.kill()


@pytest.mark.slow
def test_the_same_command_twice_the_second_refuses_in_one_line(tmp_path):
    from tests.helpers import train

    first = train(tmp_path, "steps=200,checkpoint_every=5", "--config.input.batch_size=256")
    first.wait_for(r"step 2/200")
    second = train(tmp_path, "steps=200,checkpoint_every=5", "--config.input.batch_size=256")
    assert second.finish() == 1, second.output
    assert f"in use by another trainer (pid {first.popen.pid} on" in second.output
    assert "Traceback" not in second.output
    first.popen.terminate()  # SIGTERM: the first stops cleanly, unharmed by the second
    assert first.finish() == 0, first.output
    assert not (tmp_path / Workdir.LOCK).exists()


@pytest.mark.slow
def test_eval_py_in_another_setting_refuses_or_writes_apart(tmp_path):
    from tests.helpers import Process, environment, train

    trained = train(tmp_path, "steps=2")
    assert trained.finish() == 0, trained.output
    own = (tmp_path / "eval_results_step_2.json").read_text()

    def eval_py(*flags):
        args = ["eval.py", "--config", "tests/tiny_config.py:steps=2", "--workdir", str(tmp_path)]
        return Process([*args, *flags], environment(1))

    refused = eval_py("--config.input.image_size=24")
    assert refused.finish() == 1, refused.output
    assert "config.input.image_size 16 -> 24" in refused.output
    assert "Traceback" not in refused.output
    other = eval_py("--config.input.image_size=24", "--other_setting")
    assert other.finish() == 0, other.output
    assert "setting: image_size=24" in other.output
    assert (tmp_path / "eval_results_step_2_image_size=24.json").exists()
    assert (tmp_path / "eval_results_step_2.json").read_text() == own
    for run in (trained, refused, other):  # quiet logs: no TensorFlow or orbax start-up noise
        assert "oneDNN" not in run.output and "absl::InitializeLog" not in run.output
        assert "read only" not in run.output
