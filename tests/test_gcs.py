"""gs:// as Cloud TPU users run it: the real commands on gs:// workdirs and data, against
the loopback GCS emulator (tests/gcs, the ``gcs`` fixture). The commands run as
subprocesses that cannot import the test-only packages, so they also prove that
requirements.txt is all gs:// needs. Slow: each test trains; CI runs them."""

import json
import os
import re
import signal

import pytest

from sasa_flax import data
from tests import helpers
from tests.gcs import HERE

pytestmark = pytest.mark.slow

BLOCKER = str(HERE / "no_test_packages")


def _env(gcs, devices=1):
    path = os.pathsep.join(p for p in (BLOCKER, os.environ.get("PYTHONPATH")) if p)
    return helpers.environment(devices, **gcs.env, PYTHONPATH=path)


def _run(gcs, *args) -> helpers.Process:
    return helpers.Process(list(args), _env(gcs))


def _train(gcs, workdir, config_arg, *flags) -> helpers.Process:
    args = ["train.py", "--config", f"tests/tiny_config.py:{config_arg}", "--workdir", workdir]
    return _run(gcs, *args, *flags)


def _bucket(gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs.endpoint},
    )
    return client.bucket("bucket")


def _key(url: str) -> str:
    return url.removeprefix("gs://bucket/")


def _read_json(gcs, url: str) -> dict:
    return json.loads(_bucket(gcs).blob(_key(url)).download_as_bytes())


def _checksums(gcs, workdir: str, step: int) -> dict:
    """The checksum of every array of checkpoint ``step``, as its save recorded them:
    equal checksums are equal bits."""
    return _read_json(gcs, f"{workdir}/checkpoints/{step}/meta/metadata")["checksums"]


def _names(gcs, url: str) -> list[str]:
    prefix = _key(url).rstrip("/") + "/"
    return [b.name[len(prefix) :] for b in _bucket(gcs).list_blobs(prefix=prefix)]


def test_the_gs_commands_run_without_the_test_only_packages(gcs):
    """The blocker works (so the runs below prove the README's install is enough), and
    what gs:// needs is in requirements.txt and in the package's [train] extra."""
    blocked = _run(gcs, "-c", "import gcp_storage_emulator")
    assert blocked.finish() == 1 and "test-only package" in blocked.output
    root = helpers.ROOT
    assert "google-cloud-storage==" in (root / "requirements.txt").read_text()
    assert '"google-cloud-storage>=' in (root / "pyproject.toml").read_text()


def test_train_preempt_resume_exactly_then_eval_report_visualize_on_gcs(gcs, tmp_path):
    steps, config_arg = 12, "steps=12,checkpoint_every=1000"
    straight, resumed = gcs.prefix("straight"), gcs.prefix("resumed")
    run = _train(gcs, straight, config_arg)
    assert run.finish(300) == 0, run.output

    first = _train(gcs, resumed, config_arg)
    first.wait_for(rf"step 3/{steps}", timeout=300)
    first.popen.send_signal(signal.SIGTERM)
    assert first.finish(300) == 0, first.output
    stopped = int(first.wait_for(r"stopped by SIGTERM after step (\d+)", timeout=1)[1])
    assert 3 <= stopped < steps
    second = _train(gcs, resumed, config_arg)
    assert second.finish(300) == 0, second.output
    assert f"resumed from step {stopped} of {resumed}" in second.output
    assert _checksums(gcs, resumed, steps) == _checksums(gcs, straight, steps)  # bit-exact
    record = _read_json(gcs, f"{resumed}/run.json")
    assert [s["start_step"] for s in record["starts"]] == [0, stopped]
    assert "train.lock" not in _names(gcs, resumed)  # released at exit

    spec = f"--config=tests/tiny_config.py:{config_arg}"
    evaluation = _run(gcs, "eval.py", spec, f"--workdir={resumed}")
    assert evaluation.finish(300) == 0, evaluation.output
    assert f"step {steps}: top-1" in evaluation.output
    report = _run(gcs, "-m", "sasa_flax.report", "--results", "--json", resumed)
    assert report.finish(300) == 0, report.output
    (row,) = json.loads(report.output[report.output.index("[") :])
    assert row["workdir"] == resumed and row["steps_done"] == steps and row["top1"] is not None
    pictures = _run(
        gcs,
        "-m",
        "sasa_flax.visualize",
        spec,
        f"--workdir={resumed}",
        f"--out={tmp_path}",
        "--images=1",
        "--queries=0.5,0.5",
    )
    assert pictures.finish(300) == 0, pictures.output
    assert (tmp_path / "index.html").exists()


def _png(rng) -> bytes:
    import io

    import matplotlib.image

    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, rng.random((16, 16, 3)), format="png")
    return buffer.getvalue()


def test_a_folder_dataset_on_gcs_is_listed_once_and_trains(gcs, tmp_path, monkeypatch, rng):
    root = gcs.prefix("folder")
    bucket = _bucket(gcs)
    for split, per_class in (("train", 8), ("val", 2)):
        for label in ("a", "b", "c"):
            for i in range(per_class):
                blob = bucket.blob(f"{_key(root)}/{split}/{label}/{i}.png")
                blob.upload_from_string(_png(rng))
    bucket.blob(f"{_key(root)}/train/a/empty.png").upload_from_string(b"")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    gcs.clear_requests()
    tree = data.scan_folder(root)
    reads = [r for r in gcs.requests() if r[0] == "GET"]
    assert len(tree.files) == 31 and len(reads) <= 2, reads  # a listing, not one per file
    assert tree.subfolders() == ["train", "val"] and tree.subfolders("train") == ["a", "b", "c"]
    assert tree.files["train/a/empty.png"] == 0 and tree.files["train/a/0.png"] > 0

    flags = [
        f"--config.input.data_dir={root}",
        "--config.input.dataset=folder",
        "--config.model.num_classes=3",
        "--config.input.batch_size=8",
        "--config.input.eval_batch_size=6",
    ]
    refused = _train(gcs, gcs.prefix("run"), "steps=2", *flags)
    assert refused.finish(300) == 1 and "1 empty (0-byte) image file(s)" in refused.output
    bucket.blob(f"{_key(root)}/train/a/empty.png").delete()
    run = _train(gcs, gcs.prefix("run"), "steps=2", *flags)
    assert run.finish(300) == 0, run.output
    assert "(6 examples, step 2)" in run.output  # the val folder: 3 classes × 2


def test_a_tfds_dataset_prepared_into_gcs_trains(gcs):
    data_dir = gcs.prefix("tfds")
    prepare = _run(gcs, "-m", "tests.gcs.tiny_tfds", data_dir)
    assert prepare.finish(300) == 0, prepare.output
    flags = [f"--config.input.data_dir={data_dir}", "--config.input.dataset=tiny_digits"]
    run = _train(gcs, gcs.prefix("run"), "steps=2", *flags)
    assert run.finish(300) == 0, run.output
    assert "(100 examples, step 2)" in run.output


def _largest_array(gcs, step_url: str) -> str:
    blobs = _bucket(gcs).list_blobs(prefix=f"{_key(step_url)}/model/")
    return max((b for b in blobs if "/d/" in b.name), key=lambda b: b.size).name


def test_a_damaged_checkpoint_on_gcs_is_recorded_skipped_and_redone_exactly(gcs):
    config_arg = "steps=6,checkpoint_every=2"
    workdir = gcs.prefix("damaged")
    first = _train(gcs, workdir, config_arg)
    assert first.finish(300) == 0, first.output
    expected = _checksums(gcs, workdir, 6)
    blob = _bucket(gcs).blob(_largest_array(gcs, f"{workdir}/checkpoints/6"))
    data = bytearray(blob.download_as_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    blob.upload_from_string(bytes(data))

    rerun = _train(gcs, workdir, config_arg)
    assert rerun.finish(300) == 0, rerun.output
    # Zeroed bytes of a compressed chunk either decode to other values (a checksum
    # mismatch) or fail to decode (unreadable), depending on where they fall: both are
    # damage, and either way it is named once.
    found = re.findall(r"checkpoint step 6 is damaged: (\d+ array|the storage layer)", rerun.output)
    assert len(found) == 1, rerun.output
    assert "recorded as damaged in" in rerun.output and "resumed from step 4" in rerun.output
    (record,) = [n for n in _names(gcs, f"{workdir}/damaged_checkpoints") if n.endswith(".json")]
    entry = _read_json(gcs, f"{workdir}/damaged_checkpoints/{record}")
    assert entry["step"] == 6 and entry["replaced"]
    assert ("checksum" if found[0] != "the storage layer" else "undecodable") in entry["reason"]
    assert _checksums(gcs, workdir, 6) == expected  # redone, bit for bit
    evaluation = _run(
        gcs, "eval.py", f"--config=tests/tiny_config.py:{config_arg}", f"--workdir={workdir}"
    )
    assert evaluation.finish(300) == 0 and "step 6: top-1" in evaluation.output


def test_a_server_error_mid_save_ends_in_one_line_and_keeps_the_newest_checkpoint(gcs):
    """A 412 (not retried) on every upload of step 4's checkpoint: the run ends at once
    with one line and exit status 1, and the newest complete checkpoint is intact."""
    workdir = gcs.prefix("fault412")
    gcs.fail_uploads(f"{_key(workdir)}/checkpoints/4/", status=412, count=10**6)
    try:
        run = _train(gcs, workdir, "steps=6,checkpoint_every=2")
        assert run.finish(300) == 1, run.output
    finally:
        gcs.clear_faults()
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "412" in errors[0] and "Traceback" not in run.output, run.output
    evaluation = _run(
        gcs,
        "eval.py",
        "--config=tests/tiny_config.py:steps=6,checkpoint_every=2",
        f"--workdir={workdir}",
    )
    assert evaluation.finish(300) == 0, evaluation.output
    assert "step 2: top-1" in evaluation.output  # the newest complete checkpoint, intact


def test_transient_server_errors_mid_save_are_retried_and_the_run_completes(gcs):
    """A few 503s (what GCS answers under load) on step 4's uploads: tensorstore retries
    them, and every checkpoint is complete and verifies."""
    workdir = gcs.prefix("fault503")
    gcs.fail_uploads(f"{_key(workdir)}/checkpoints/4/", status=503, count=3)
    try:
        run = _train(gcs, workdir, "steps=6,checkpoint_every=2")
        assert run.finish(300) == 0, run.output
    finally:
        gcs.clear_faults()
    assert "final test top-1" in run.output
    evaluation = _run(
        gcs,
        "eval.py",
        "--config=tests/tiny_config.py:steps=6,checkpoint_every=2",
        f"--workdir={workdir}",
        "--step=4",
    )
    assert evaluation.finish(300) == 0 and "step 4: top-1" in evaluation.output


def _train_scalars(path) -> dict[int, float]:
    import tensorflow as tf

    return {
        event.step: float(tf.make_ndarray(value.tensor))
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
        if value.tag == "train/loss"
    }


def test_tensorboard_events_on_gcs_are_uploaded_at_flushes_not_every_few_lines(gcs, tmp_path):
    """On gs:// each flush uploads the whole events file again: 20 log lines (7 scalars
    each) are queued and uploaded at the run's explicit flushes, not every 10 events (TF's
    default, 8 uploads here), and every line reaches the file."""
    workdir = gcs.prefix("events")
    gcs.clear_requests()
    run = _train(gcs, workdir, "steps=20,checkpoint_every=1000")
    assert run.finish(300) == 0, run.output
    uploads = [r for r in gcs.requests() if r[0] == "UPLOAD" and "tfevents" in r[1]]
    assert 1 <= len(uploads) <= 3, uploads
    (name,) = {r[1] for r in uploads}
    local = tmp_path / "events"
    local.write_bytes(_bucket(gcs).blob(name).download_as_bytes())
    assert sorted(_train_scalars(local)) == list(range(1, 21))


def test_a_profile_on_gcs_is_traced_locally_and_uploaded(gcs):
    workdir = gcs.prefix("profiled")
    run = _train(
        gcs,
        workdir,
        "steps=4",
        "--config.train.profile_steps=2",
        "--config.train.profile_start_step=1",
    )
    assert run.finish(300) == 0, run.output
    traces = [
        b
        for b in _bucket(gcs).list_blobs(prefix=f"{_key(workdir)}/profile/")
        if b.name.endswith(".xplane.pb")
    ]
    assert len(traces) == 1 and traces[0].size > 0, run.output
    assert "profiled steps 2-3 into gs://" in run.output
