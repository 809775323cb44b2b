"""A workdir is one run: the lock, stale locks, and folder datasets' split names."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sasa_flax import config_lib, input_pipeline, train_lib, workdir_lock
from tests.helpers import tiny_config


def _write_lock(workdir, **holder):
    workdir.mkdir(parents=True, exist_ok=True)
    lock = dict(host=socket.gethostname(), pid=os.getppid(), started=time.time(),
                heartbeat=time.time(), token="x")  # fmt: skip
    lock.update(holder)
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(lock))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_trainer_refuses_at_once_naming_the_holder(tmp_path):
    _write_lock(tmp_path, pid=os.getppid())  # a live process: pytest's parent
    with pytest.raises(
        workdir_lock.WorkdirLocked,
        match=rf"in use by another trainer \(pid {os.getppid()} on {socket.gethostname()}, "
        r"started .*\).*another --workdir",
    ):
        train_lib.train_and_evaluate(tiny_config(), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_NAME]  # untouched


def test_a_stale_lock_is_taken_over_and_the_lock_released_at_exit(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid())
    with caplog.at_level("WARNING", logger="sasa_flax"):
        results = train_lib.train_and_evaluate(tiny_config(), str(tmp_path), stop_after_step=1)
    assert results["step"] == 1
    assert "taking over the stale lock" in caplog.text
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_another_hosts_lock_is_stale_only_without_a_recent_heartbeat(tmp_path):
    _write_lock(tmp_path, host="other-host", heartbeat=time.time() - 10)
    with pytest.raises(workdir_lock.WorkdirLocked, match="on other-host"):
        workdir_lock.hold(str(tmp_path)).__enter__()
    _write_lock(tmp_path, host="other-host", heartbeat=time.time() - 2 * workdir_lock.STALE_AFTER_S)
    with workdir_lock.hold(str(tmp_path)):
        holder = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def _folder(root, classes, images=3):
    import tensorflow as tf

    png = tf.io.encode_png(tf.zeros((4, 4, 3), tf.uint8)).numpy()
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(images):
            (root / name / f"{i}.png").write_bytes(png)


@pytest.mark.parametrize("eval_name", ["val", "valid", "validation", "test"])
def test_train_beside_an_eval_folder_is_two_splits_not_two_classes(tmp_path, eval_name):
    _folder(tmp_path / "train", ["cat", "dog"], images=5)
    _folder(tmp_path / eval_name, ["cat", "dog"], images=2)
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4)
    dataset = input_pipeline.load(config)
    assert (dataset.num_classes, dataset.train.size, dataset.eval.size) == (2, 10, 4)
    labels = np.concatenate([y for _, y in dataset.eval.make().batch(8).as_numpy_iterator()])
    assert sorted(labels) == [0, 0, 1, 1]


def test_a_class_folder_named_like_a_split_is_refused_with_the_fix(tmp_path):
    _folder(tmp_path, ["training", "valid_not", "train"])
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4)
    with pytest.raises(input_pipeline.DatasetError, match=r"named like splits: \['train'\]"):
        input_pipeline.load(config)
