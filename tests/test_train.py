"""Training and evaluation end to end on 8 fake CPU devices, with real (digits) data."""

import json
import logging
import logging.handlers
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from sasa_flax import trainer
from sasa_flax.models import resnet
from sasa_flax.run import Workdir, checkpoints, saves
from sasa_flax.trainer import memory
from sasa_flax.trainer.progress import ProgressLog
from sasa_flax.trainer.setup import learning_rate_schedule
from tests.helpers import final_params, tiny_config


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    """One uninterrupted 6-step run on 8 devices, shared by several tests."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    config = tiny_config()
    workdir = str(tmp_path_factory.mktemp("run8"))
    results = trainer.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_end_to_end_trains_evaluates_and_checkpoints(eight_device_run):
    config, workdir, results = eight_device_run
    assert results["step"] == 6
    losses = [loss for _, loss in results["train_log"]]
    assert len(losses) == 6 and np.isfinite(losses).all()  # learning: test_digits_are_learned
    assert results["num_examples"] == 360  # the whole digits test split, exactly once
    # Percentages of whole hits over those 360 images, top-5 counting every top-1 hit.
    for metric in ("top1", "top5"):
        hits = results[metric] * 360 / 100
        assert hits == pytest.approx(round(hits), abs=1e-6)
    assert results["top5"] >= results["top1"]
    mngr = checkpoints.manager(Workdir.of(workdir), read_only=True)
    assert mngr.latest_step() == 6
    saved = json.loads((pathlib.Path(workdir) / "eval_results_step_6.json").read_text())
    assert saved == {"step": 6, **{k: v for k, v in results.items() if k in saved and k != "step"}}
    assert {"top1", "top5", "loss", "num_examples"} <= set(saved)


@pytest.mark.slow
def test_digits_are_learned(tmp_path):
    """Images, labels and the on-device normalisation fit together: 60 steps of the tiny
    model reach well above chance (10%) on the held-out digits (41% when written)."""
    config = tiny_config(num_steps=60, base_learning_rate=1.6, log_every_steps=20)
    results = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])
    assert results["top1"] > 30.0, results


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_parameters(eight_device_run, tmp_path):
    config, workdir8, _ = eight_device_run
    workdir1 = str(tmp_path / "run1")
    trainer.train_and_evaluate(config, workdir1, devices=jax.devices()[:1])
    _, params8 = final_params(config, workdir8, jax.devices())
    _, params1 = final_params(config, workdir1, jax.devices()[:1])
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_restart_from_the_workdir_continues_exactly(eight_device_run, tmp_path):
    config, uninterrupted, _ = eight_device_run
    workdir = str(tmp_path / "interrupted")
    stopped = trainer.train_and_evaluate(config, workdir, stop_after_step=3)
    assert stopped["step"] == 3 and "top1" not in stopped
    resumed = trainer.train_and_evaluate(config, workdir)
    assert resumed["step"] == 6
    assert [s for s, _ in resumed["train_log"]] == [4, 5, 6]  # steps 1-3 were not redone
    starts = json.loads((pathlib.Path(workdir) / "run.json").read_text())["starts"]
    assert [start["start_step"] for start in starts] == [0, 3]  # the history of restarts
    _, params_a = final_params(config, uninterrupted, jax.devices())
    _, params_b = final_params(config, workdir, jax.devices())
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_reproduces_the_train_time_evaluation(eight_device_run):
    config, workdir, results = eight_device_run
    handler = logging.handlers.BufferingHandler(capacity=1000)
    logging.getLogger("sasa_flax").addHandler(handler)
    try:
        again = trainer.evaluate_checkpoint(config, workdir)
    finally:
        logging.getLogger("sasa_flax").removeHandler(handler)
    plans = [r.getMessage() for r in handler.buffer if r.getMessage().startswith("attention on")]
    # As train.py logs it: every attention layer's shape, window and implementation.
    assert len(plans) == 1 and " k=" in plans[0] and " layer" in plans[0], plans
    assert again["step"] == 6 and again["num_examples"] == 360
    assert again["top1"] == pytest.approx(results["top1"], abs=1e-9)
    assert again["loss"] == pytest.approx(results["loss"], rel=1e-5)


def test_eval_of_an_earlier_step_and_of_a_missing_one(eight_device_run):
    config, workdir, _ = eight_device_run
    steps = sorted(checkpoints.manager(Workdir.of(workdir), read_only=True).all_steps())
    assert trainer.evaluate_checkpoint(config, workdir, step=steps[0])["step"] == steps[0]
    with pytest.raises(
        checkpoints.CheckpointError, match=r"no checkpoint of step 5.*available steps"
    ):
        trainer.evaluate_checkpoint(config, workdir, step=5)


def test_eval_on_an_empty_workdir_says_so(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint in .*train first"):
        trainer.evaluate_checkpoint(tiny_config(), str(tmp_path))


def test_batch_not_divisible_by_the_devices_is_refused_before_compiling(tmp_path):
    config = tiny_config()
    config.input.batch_size = 36
    with pytest.raises(
        trainer.TrainError, match=r"config.input.batch_size=36 is not divisible by the 8 devices"
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written


def test_weight_decay_applies_to_kernels_only():
    params = {"conv": {"kernel": 1.0}, "bn": {"scale": 1.0, "bias": 1.0}, "attn": {"rel_row": 1.0}}
    mask = resnet.ResNet.decay_mask(params)
    assert mask == {
        "conv": {"kernel": True},
        "bn": {"scale": False, "bias": False},
        "attn": {"rel_row": False},
    }


def test_learning_rate_schedule_warms_up_then_decays():
    config = tiny_config()
    config.input.batch_size = 512
    config.train.update(base_learning_rate=0.1, warmup_epochs=2.0)
    schedule = learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(20)) == pytest.approx(0.2)  # 0.1 × 512 / 256 at the end of warm-up
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_eval_py_on_an_empty_workdir_prints_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--config",
            "configs/digits.py",
            "--workdir",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode != 0
    assert "error: no checkpoint in" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "none").exists()  # nothing written


def test_eval_of_another_setting_is_refused_or_written_apart(eight_device_run):
    config, workdir, _ = eight_device_run
    own_file = pathlib.Path(workdir) / "eval_results_step_6.json"
    own = own_file.read_text()
    other = tiny_config()
    other.input.image_size = 24
    with pytest.raises(
        trainer.TrainError, match=r"config\.input\.image_size 16 -> 24.*--other_setting"
    ):
        trainer.evaluate_checkpoint(other, workdir)
    again = trainer.evaluate_checkpoint(other, workdir, other_setting=True)
    assert again["setting"] == "image_size=24" and again["num_examples"] == 360
    assert (pathlib.Path(workdir) / "eval_results_step_6_image_size=24.json").exists()
    assert own_file.read_text() == own  # the run's own results are never overwritten


def test_eval_of_another_dataset_is_refused_before_any_data_is_opened(
    eight_device_run, monkeypatch
):
    """A CIFAR-10 config on a digits run: refused from the run record, before the dataset
    (offline: minutes of download retries) is opened."""
    from sasa_flax import data

    config, workdir, _ = eight_device_run
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("opened the dataset"))
    other = tiny_config()
    other.input.dataset = "cifar10"
    with pytest.raises(trainer.TrainError, match=r"config\.input\.dataset 'digits' -> 'cifar10'"):
        trainer.evaluate_checkpoint(other, workdir)


def test_eval_on_a_read_only_workdir_says_so_first_and_still_gives_the_accuracy(
    eight_device_run, monkeypatch, caplog
):
    config, workdir, results = eight_device_run
    files = sorted(p.name for p in pathlib.Path(workdir).rglob("*"))
    monkeypatch.setattr(Workdir, "writable", lambda self: False)
    with caplog.at_level(logging.WARNING, logger="sasa_flax"):
        again = trainer.evaluate_checkpoint(config, workdir)
    assert not again["written"] and again["top1"] == pytest.approx(results["top1"])
    assert "is not writable" in caplog.text
    assert sorted(p.name for p in pathlib.Path(workdir).rglob("*")) == files


def test_writable_tells_a_workdir_files_cannot_be_made_in(tmp_path):
    assert Workdir(str(tmp_path)).writable()
    assert not Workdir("/proc").writable()  # not even root creates files there
    assert not list(tmp_path.iterdir())  # the probe is removed


@pytest.mark.slow
def test_a_checkpoint_of_8_devices_resumes_on_4_then_on_1_and_ends_where_8_do(
    eight_device_run, tmp_path
):
    """A preempted slice often comes back as another shape: orbax reshards the state onto
    the new mesh and the data stream continues at the same global position."""
    config, uninterrupted, _ = eight_device_run
    workdir, devices = str(tmp_path / "moved"), jax.devices()
    trainer.train_and_evaluate(config, workdir, devices=devices[:8], stop_after_step=2)
    trainer.train_and_evaluate(config, workdir, devices=devices[:4], stop_after_step=4)
    resumed = trainer.train_and_evaluate(config, workdir, devices=devices[:1])
    assert [s for s, _ in resumed["train_log"]] == [5, 6]
    starts = json.loads((pathlib.Path(workdir) / "run.json").read_text())["starts"]
    assert [(s["start_step"], s["devices"]) for s in starts] == [(0, 8), (2, 4), (4, 1)]
    _, expected = final_params(config, uninterrupted, devices)
    _, params = final_params(config, workdir, devices[:1])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)  # as 1 vs 8 devices


def test_a_refused_resume_leaves_the_run_record_as_it_was(eight_device_run):
    config, workdir, _ = eight_device_run
    record = (pathlib.Path(workdir) / "run.json").read_bytes()
    changed = tiny_config(seed=config.train.seed + 1)
    with pytest.raises(trainer.TrainError, match=r"config.train.seed 0 -> 1"):
        trainer.train_and_evaluate(changed, workdir)
    assert (pathlib.Path(workdir) / "run.json").read_bytes() == record


def test_a_shape_free_model_change_is_refused_on_resume_and_named_at_eval(eight_device_run):
    """Options that keep every parameter shape (scale_queries, padding, BatchNorm's)
    restore into any checkpoint of the run: resuming or evaluating with one changed would
    go on as another model, or write another model's accuracy over the run's own."""
    config, workdir, _ = eight_device_run
    run = pathlib.Path(workdir)
    record, own = (run / "run.json").read_bytes(), (run / "eval_results_step_6.json").read_text()
    changed = tiny_config()
    changed.model.scale_queries = False
    changed.model.bn_epsilon = 1e-3
    with pytest.raises(
        trainer.TrainError,
        match=r"trained as another model: config\.model\.bn_epsilon 1e-05 -> 0\.001, "
        r"config\.model\.scale_queries True -> False",
    ):
        trainer.train_and_evaluate(changed, workdir)  # not "already finished" either
    assert (run / "run.json").read_bytes() == record
    with pytest.raises(trainer.TrainError, match=r"scale_queries True -> False.*--other_setting"):
        trainer.evaluate_checkpoint(changed, workdir)
    assert (run / "eval_results_step_6.json").read_text() == own
    assert not list(run.glob("eval_results_step_6_*scale_queries*"))


def test_how_a_model_is_computed_is_not_what_it_is():
    """``attention_impl`` chooses among exact implementations: a run may resume, and be
    evaluated, with another (on another platform); every other model field counts."""
    from sasa_flax.trainer import resume

    config = tiny_config()
    fields = resume.model_fields(config)
    assert "model.attention_impl" not in fields
    assert set(fields) == {f"model.{k}" for k in config.model if k != "attention_impl"}
    assert set(fields) <= set(resume.eval_fields(config))
    other = tiny_config()
    other.model.attention_impl = "patches"
    assert resume.same_run(dict(config=json.loads(config.to_json_best_effort())), other)


def test_a_save_that_fails_mid_run_stops_the_run_at_the_next_step(monkeypatch, tmp_path, caplog):
    """A checkpoint write that fails in the background (a full disk) stops the run at the
    next step with one error naming it, not one save interval later; nothing of the
    failed save is left, and the run resumes from the newest complete checkpoint."""
    import errno
    import time

    import orbax.checkpoint as ocp

    original = ocp.StandardCheckpointHandler.async_save

    class NoSpace:  # a write that fails in the background, as a full disk's does
        def result(self, timeout=None):
            time.sleep(0.05)
            raise OSError(errno.ENOSPC, "No space left on device")

    async def failing_at_step_1(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        failing = f"{tmp_path}/checkpoints/1." in str(directory)
        return [*(futures or []), NoSpace()] if failing else futures

    # The first step is saved (orbax saves when no checkpoint exists), the next at 50.
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_at_step_1)
    config = tiny_config(num_steps=60, checkpoint_every_steps=50)
    with (
        caplog.at_level(logging.INFO, logger="sasa_flax"),
        pytest.raises(saves.SaveFailed) as failed,
    ):
        trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    message = str(failed.value)
    assert "checkpoint of step 1 could not be written" in message
    assert "no space left on the device" in message and "needs about" in message
    assert "no checkpoint of this run is complete yet" in message
    logged = [int(m) for m in re.findall(r"step (\d+)/60", caplog.text)]
    assert max(logged) < 50  # stopped long before the next save was due
    assert not list((tmp_path / "checkpoints").iterdir())  # nothing half-written kept
    monkeypatch.undo()
    resumed = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert resumed["step"] == 60


@pytest.fixture
def device_reads_guarded(monkeypatch):
    """jax.transfer_guard's device-to-host half as on TPU and GPU. On the CPU a device
    array already lies in host memory, so jax lets reads of it through under the guard;
    here any read of an array's value inside a guarded region raises, as it does there."""
    from jax._src import array, config

    value = array.ArrayImpl._value

    def guarded(self):
        if config.transfer_guard_device_to_host.value in ("disallow", "disallow_explicit"):
            raise RuntimeError("Disallowed device-to-host transfer (emulated on CPU)")
        return value.fget(self)

    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))


def test_the_training_loop_reads_nothing_from_the_devices_per_step(device_reads_guarded, tmp_path):
    """The per-step path runs under jax.transfer_guard("disallow") (host-to-device is
    caught by jax on every platform, device-to-host here as on accelerators): a whole
    run with its log lines, evaluation and checkpoints passes..."""
    config = tiny_config(num_steps=3, eval_every_steps=2)
    assert trainer.train_and_evaluate(config, str(tmp_path))["step"] == 3


def test_a_host_read_per_step_fails_instead_of_stalling_the_loop(
    device_reads_guarded, monkeypatch, tmp_path
):
    """... and one per-step read added to it fails the run."""
    add = ProgressLog.add

    def add_and_read(self, done, metrics):
        float(metrics["loss"])  # a per-step sync, as a careless metric would add
        add(self, done, metrics)

    monkeypatch.setattr(ProgressLog, "add", add_and_read)
    with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path), stop_after_step=1)


def test_an_eval_batch_too_large_for_the_device_is_evaluated_in_chunks(caplog):
    """compile_eval_step sizes the eval step from its compiled program: given a device with
    less memory than the whole per-device batch needs, it evaluates in chunks, says so,
    and the sums are the same as in one go."""
    config = tiny_config()
    config.input.eval_batch_size = 32
    setup = trainer.model_setup(
        config, jax.devices()[:4], dataset=None, steps_per_epoch=10, total_steps=10
    )
    abstract = trainer.abstract_state(setup)
    whole, chunks = trainer.compile_eval_step(setup, abstract, memory_bytes=2**40)
    assert chunks == 1
    need = memory.peak_bytes(whole.memory_analysis())
    # At INFO whatever ran before (alone, nothing had set the level: the line went unseen).
    with caplog.at_level(logging.INFO, logger="sasa_flax"):  # room for about half
        small, chunks = trainer.compile_eval_step(setup, abstract, memory_bytes=int(need / 1.5))
    assert chunks > 1 and memory.peak_bytes(small.memory_analysis()) < need / 1.5 * memory.HEADROOM
    said = [r.getMessage() for r in caplog.records if "chunks" in r.getMessage()]
    assert len(said) == 1 and f"in {chunks} chunks of {8 // chunks}" in said[0], said

    state = trainer.init_state(setup, abstract)
    rng = np.random.default_rng(0)
    size = config.input.image_size
    batch = trainer.global_batch(
        setup,
        dict(
            image=rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8),
            label=rng.integers(0, config.model.num_classes, 32).astype(np.int32),
            mask=(np.arange(32) < 29).astype(np.float32),  # a padded last batch
        ),
    )
    once = jax.device_get(whole(state.params, state.model_state, batch))
    small_sums = jax.device_get(small(state.params, state.model_state, batch))
    for key in once:
        np.testing.assert_allclose(small_sums[key], once[key], rtol=1e-5)


def test_the_loop_keeps_at_most_two_steps_in_flight(tmp_path, monkeypatch):
    """Dispatch is asynchronous: unchecked, the loop ran tens of steps ahead of the
    devices, and a SIGTERM at step 8 stopped after step 35. Here each step is given
    about 0.1 s more device work (matrix products on its outputs, which the CPU runs
    asynchronously, as a TPU runs every step) while dispatch returns at once: every step
    is still dispatched with at most STEPS_IN_FLIGHT earlier steps unfinished (all of
    them without the wait), so a stop request is acted on within that many steps of the
    devices."""
    import jax.numpy as jnp

    from sasa_flax.trainer import loop

    factor = jnp.ones((600, 600)) / 600

    @jax.jit
    def late(x):  # x, after about 0.1 s of device work
        work = jax.lax.fori_loop(0, 40, lambda i, a: a @ factor, factor)
        return x & (jnp.sum(work) > 0)

    unfinished_at_dispatch, outputs = [], []
    compile_train_step = loop.compile_train_step

    def slowed(*args, **kwargs):
        compiled = compile_train_step(*args, **kwargs)

        def step(state, batch):
            unfinished_at_dispatch.append(sum(not x.is_ready() for x in outputs))
            state, metrics = compiled(state, batch)
            metrics = dict(metrics, finite=late(metrics["finite"]))
            outputs.append(metrics["finite"])
            return state, metrics

        return step

    monkeypatch.setattr(loop, "compile_train_step", slowed)
    config = tiny_config(num_steps=20, log_every_steps=1000, checkpoint_every_steps=1000)
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert len(unfinished_at_dispatch) == 20 and loop.STEPS_IN_FLIGHT <= 2
    assert max(unfinished_at_dispatch) <= loop.STEPS_IN_FLIGHT, unfinished_at_dispatch


def test_a_finished_run_says_so_and_does_nothing_more(eight_device_run, monkeypatch, caplog):
    """Rerunning a finished run (a sweep run twice) returns its final evaluation without
    restoring, compiling or writing anything; a longer schedule goes the usual way."""
    from sasa_flax.trainer import loop

    config, workdir, results = eight_device_run
    before = sorted((p.name, p.stat().st_mtime_ns) for p in pathlib.Path(workdir).rglob("*"))
    monkeypatch.setattr(loop, "compile_train_step", lambda *a, **k: pytest.fail("compiled"))
    with caplog.at_level(logging.INFO, logger="sasa_flax"):
        again = trainer.train_and_evaluate(config, workdir)
    assert again["already_finished"] and again["top1"] == results["top1"]
    assert again["step"] == 6
    assert any("already finished at step 6" in r.getMessage() for r in caplog.records)
    after = sorted((p.name, p.stat().st_mtime_ns) for p in pathlib.Path(workdir).rglob("*"))
    assert after == before  # nothing written, not even the run record
    monkeypatch.undo()
    longer = tiny_config(num_steps=8)
    with pytest.raises(trainer.TrainError, match="num_steps"):  # refused as before
        trainer.train_and_evaluate(longer, workdir)


@pytest.mark.slow  # a rare path (config.train.profile_steps): 18 s of the default selection
def test_a_profile_is_written_when_asked_and_never_otherwise(tmp_path):
    """config.train.profile_steps: a jax.profiler trace of the chosen steps in
    <workdir>/profile; none when 0. It opens as the docs say: ``tensorboard --logdir
    <workdir>`` lists the run in its profile tab (the xprof plugin of requirements.txt),
    and its trace viewer's events include the train step."""
    devices = jax.devices()[:1]
    config = tiny_config(profile_steps=2, profile_start_step=2)
    trainer.train_and_evaluate(config, str(tmp_path / "asked"), devices=devices)
    traces = list((tmp_path / "asked" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    trainer.train_and_evaluate(tiny_config(), str(tmp_path / "not"), devices=devices)
    assert not (tmp_path / "not" / "profile").exists()

    runs = _tensorboard_profile_runs(tmp_path / "asked")
    assert runs == [traces[0].parent.name], runs  # the run's one trace, by its timestamp
    from xprof.convert import raw_to_tool_data

    events, _ = raw_to_tool_data.xspace_to_tool_data([str(traces[0])], "trace_viewer", {})
    names = {event.get("name", "") for event in json.loads(events)["traceEvents"]}
    assert any("train_step" in name for name in names), sorted(names)[:50]


def _tensorboard_profile_runs(logdir) -> list[str]:
    """What ``tensorboard --logdir <logdir>`` serves its profile tab: the plugin enabled,
    and the runs it lists (TensorBoard's own WSGI app, no server)."""
    import gzip

    from tensorboard import default, program
    from tensorboard.backend import application
    from werkzeug.test import Client

    board = program.TensorBoard(default.get_plugins())
    board.configure(argv=[None, "--logdir", str(logdir), "--load_fast", "false"])
    provider, multiplexer = board._make_data_provider()
    client = Client(
        application.TensorBoardWSGIApp(
            board.flags, board.plugin_loaders, provider, board.assets_zip_provider, multiplexer
        )
    )
    plugins = json.loads(client.get("/data/plugins_listing").get_data())
    assert plugins.get("profile", {}).get("enabled"), sorted(plugins)
    response = client.get("/data/plugin/profile/runs")
    body = response.get_data()
    if response.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return [run.rsplit("/", 1)[-1] for run in json.loads(body)]
