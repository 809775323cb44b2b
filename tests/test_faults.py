"""Preemption, crashes and bad steps: real signals to real train.py processes, real kills
in the middle of checkpoint writes, and exact resumption checked to the bit.

Every test here is in the slow selection (real processes, several trainings each) except
the unwritable-workdir check; the default selection's training path is tests/test_train.py.
"""

import pathlib
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest

from sasa_flax import config_lib, data, trainer
from sasa_flax.run import Workdir, checkpoints
from sasa_flax.run.workdir import WorkdirError
from tests import helpers
from tests.helpers import final_params, tiny_config

STEPS = 24

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The parameters that the interrupted runs must reproduce: the same 24 steps in one
    train.py process that nothing stops (a process, not this one: XLA's CPU numerics
    depend on how many host devices the platform was started with)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = helpers.train(workdir, f"steps={STEPS}")
    assert run.finish() == 0, run.output
    return final_params(tiny_config(num_steps=STEPS), str(workdir), jax.devices()[:1])[1]


def assert_same_final_parameters(workdir, expected):
    step, params = final_params(tiny_config(num_steps=STEPS), str(workdir), jax.devices()[:1])
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def complete_steps(workdir) -> list[int]:
    return sorted(checkpoints.manager(Workdir(workdir), read_only=True).all_steps())


@slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_checkpoints_exits_0_and_the_rerun_resumes_exactly(
    signum, uninterrupted, tmp_path, rng
):
    config_arg = f"steps={STEPS},checkpoint_every=1000"  # no periodic checkpoint in the way
    run = helpers.train(tmp_path, config_arg)
    at = int(rng.integers(2, STEPS // 2))
    run.wait_for(rf"step {at}/{STEPS}")
    run.popen.send_signal(signum)
    assert run.finish() == 0, run.output
    stopped = int(run.wait_for(rf"stopped by {signum.name} after step (\d+)", timeout=1)[1])
    assert at <= stopped < STEPS
    assert complete_steps(tmp_path)[-1] == stopped  # written at the signal, and durable
    rerun = helpers.train(tmp_path, config_arg)
    assert rerun.finish() == 0, rerun.output
    assert f"resumed from step {stopped} " in rerun.output
    assert_same_final_parameters(tmp_path, uninterrupted)


@slow
def test_a_stop_is_acted_on_within_two_steps_of_the_devices(tmp_path):
    """End to end, a real train.py: SIGTERM right after a log line (a host read: the
    devices had finished that step) stops within STEPS_IN_FLIGHT steps of it. That the
    loop's wait is what bounds it is shown where the device can be made slow on purpose
    (test_train.py::test_the_loop_keeps_at_most_two_steps_in_flight)."""
    from sasa_flax.trainer.loop import STEPS_IN_FLIGHT

    # configs/digits.py (its 32² model runs behind the host on CPU), a log line at step 20.
    flags = ["--config.train.num_steps=200", "--config.train.log_every_steps=20"]
    run = helpers.Process(
        ["train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path), *flags],
        helpers.environment(),
    )
    run.wait_for(r"step 20/200")
    run.popen.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.output
    stopped = int(run.wait_for(r"stopped by SIGTERM after step (\d+)", timeout=1)[1])
    assert 20 <= stopped <= 20 + STEPS_IN_FLIGHT + 1, run.output


@slow
def test_a_second_sigint_exits_at_once(tmp_path):
    # Batches of 512 (about half a second a step) leave time for the second Ctrl-C.
    run = helpers.train(tmp_path, "steps=200,checkpoint_every=5", "--config.input.batch_size=512")
    run.wait_for(r"step 6/200")
    run.popen.send_signal(signal.SIGINT)
    run.wait_for("press Ctrl-C again")
    run.popen.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output
    assert "interrupted: stopped at once" in run.output and "Traceback" not in run.output
    assert complete_steps(tmp_path)[-1] >= 5  # the newest complete checkpoint is intact


def _tmp_dirs(checkpoints: pathlib.Path) -> list[pathlib.Path]:
    try:
        return [p for p in checkpoints.iterdir() if "orbax-checkpoint-tmp" in p.name]
    except FileNotFoundError:
        return []


def _kill_while_writing(run, checkpoints: pathlib.Path, point: str, timeout: float = 120):
    """Polls every millisecond for a checkpoint being written and SIGKILLs the trainer at
    ``point``; returns the temporary directory the kill interrupted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.popen.poll() is None:
        for tmp in _tmp_dirs(checkpoints):
            if point == "model item written" and not any((tmp / "model").glob("*")):
                continue
            if point == "2 ms into the write":
                time.sleep(0.002)
            run.popen.kill()
            run.popen.wait()
            return tmp
        time.sleep(0.001)
    run.popen.kill()
    raise AssertionError(f"never saw a checkpoint being written:\n{run.output}")


@slow
def test_sigkill_during_checkpoint_writes_leaves_the_run_resumable_and_exact(
    uninterrupted, tmp_path
):
    """Three kills in a row, each in the middle of a checkpoint write, then a clean finish."""
    checkpoint_dir = tmp_path / Workdir.CHECKPOINTS
    config_arg = f"steps={STEPS},checkpoint_every=1"
    for point in ("temporary directory created", "model item written", "2 ms into the write"):
        run = helpers.train(tmp_path, config_arg)
        interrupted = _kill_while_writing(run, checkpoint_dir, point)
        step_being_written = int(interrupted.name.split(".")[0])
        steps = complete_steps(tmp_path)
        assert step_being_written not in steps  # the half-written step is not listed ...
        if steps:  # ... and the newest listed one restores completely
            setup = trainer.make_setup(tiny_config(num_steps=STEPS), devices=jax.devices()[:1])
            abstract = trainer.abstract_state(setup)
            mngr = checkpoints.manager(Workdir(tmp_path), read_only=True)
            item = checkpoints.restore(
                mngr, steps[-1], model=abstract.model_item(), train=abstract.train_item()
            )
            assert int(item["train"]["step"]) == steps[-1]
    rerun = helpers.train(tmp_path, config_arg)
    assert rerun.finish() == 0, rerun.output
    assert not _tmp_dirs(checkpoint_dir)  # the leftovers were cleaned up
    assert_same_final_parameters(tmp_path, uninterrupted)


def _poison_batch(monkeypatch, at_step: int):
    """Training batch number ``at_step`` (1-based) gets a NaN loss weight (images are
    uint8 and cannot hold a NaN)."""
    batches = data.train_batches

    def poisoned(*args, start_step=0, **kwargs):
        for step, batch in enumerate(batches(*args, start_step=start_step, **kwargs), start_step):
            if step + 1 == at_step:
                batch["mask"][0] = np.nan
            yield batch

    monkeypatch.setattr(data, "train_batches", poisoned)


@slow
def test_a_non_finite_step_stops_the_run_without_saving_it(monkeypatch, tmp_path):
    _poison_batch(monkeypatch, at_step=4)
    with pytest.raises(trainer.TrainError, match=r"step 4: non-finite training.*newest .* step 2"):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path))
    assert complete_steps(tmp_path) == [1, 2]  # step 4 never saved; step 2 is intact
    _, params = final_params(tiny_config(), str(tmp_path), jax.devices())
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@slow
def test_a_non_finite_step_is_skipped_and_counted_when_configured(monkeypatch, tmp_path):
    _poison_batch(monkeypatch, at_step=4)
    config = tiny_config(on_nonfinite="skip")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 6 and np.isfinite(results["loss"])
    setup = trainer.make_setup(config)
    abstract = trainer.abstract_state(setup)
    mngr = checkpoints.manager(Workdir(tmp_path), read_only=True)
    item = checkpoints.restore(mngr, 6, model=abstract.model_item(), train=abstract.train_item())
    assert int(item["train"]["nonfinite_steps"]) == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(item["model"]))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    trainer.train_and_evaluate(tiny_config(num_steps=1), str(workdir))
    return workdir


@slow
@pytest.mark.parametrize(
    "change,names",
    [
        (
            {"kernel_size": 5},
            r"blocks/7/spatial/rel_row: shape \(3, 16\) in the checkpoint, \(5, 16\)",
        ),
        ({"spatial": ("conv",) * 4}, r"in the checkpoint but not in the config's model"),
    ],
)
def test_eval_on_a_checkpoint_of_another_architecture_names_the_parameters(
    trained_workdir, change, names
):
    config = tiny_config(num_steps=1)
    config.model.update(**change)
    with pytest.raises(checkpoints.CheckpointError, match=names):
        trainer.evaluate_checkpoint(config, str(trained_workdir))


def test_an_unwritable_workdir_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(WorkdirError, match="a_file/run is not writable"):
        trainer.train_and_evaluate(tiny_config(), str(tmp_path / "a_file" / "run"))
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


@slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.kernal_size=9", 'Did you mean "kernel_size" instead of "kernal_size"'),
        ("--config.model.stem=cnov", "config.model.stem='cnov': must be one of"),
        ("--config.input.dataset=imagenet2013", "not a TFDS dataset"),
    ],
)
def test_a_bad_config_ends_train_py_with_one_message_and_writes_nothing(
    tmp_path, override, message
):
    run = helpers.train(tmp_path / "run", "steps=2", override)
    assert run.finish() == 1
    assert message in run.output and "Traceback" not in run.output
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, config_arg: str) -> list[helpers.Process]:
    """train.py as 2 processes of 2 CPU devices each, joined by a coordinator on 127.0.0.1."""
    address = f"127.0.0.1:{_free_port()}"
    return [
        helpers.train(
            workdir,
            config_arg,
            "--distributed=on",
            devices=2,
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        )
        for i in range(2)
    ]


@slow
def test_two_processes_train_preempt_resume_and_match_one_process(tmp_path):
    """2 processes × 2 devices: each reads its shard, only process 0 logs; SIGTERM to
    process 1 alone stops both after the same step with one checkpoint written together;
    the restarted pair restores it, and so does 1 process × 4 devices (a slice that came
    back as another shape); both end where 1 process × 4 devices does, given the same
    global batches."""
    # Batches of 128 make steps slow enough for JAX's preemption sync (a background
    # exchange through the coordinator) to settle on a step before the run ends, and few
    # enough that round-off differences between the two set-ups stay at round-off level.
    steps, config_arg = 10, "steps=10,checkpoint_every=1000,batch=128"
    single = helpers.Process(
        ["-m", "tests.two_shard_reference", str(tmp_path / "single"), config_arg],
        helpers.environment(devices=4),
    )
    assert single.finish() == 0, single.output

    workdir = tmp_path / "pair"
    pair = _two_processes(workdir, config_arg)
    pair[0].wait_for(rf"step 2/{steps}")
    pair[1].popen.send_signal(signal.SIGTERM)
    assert [p.finish() for p in pair] == [0, 0], pair[0].output + pair[1].output
    stopped = {int(p.wait_for(r"stopped by .* after step (\d+)", timeout=1)[1]) for p in pair}
    assert len(stopped) == 1 and 2 <= stopped.pop() < steps  # the same step on both
    assert "step 1/" not in pair[1].output  # process 1 logs nothing
    # A preempted pod slice may come back as another shape: the same checkpoint resumed
    # by ONE process of 4 devices continues the same global data order.
    alone = tmp_path / "alone"
    shutil.copytree(workdir, alone)
    single_resume = helpers.train(alone, config_arg, devices=4)
    assert single_resume.finish() == 0, single_resume.output
    assert "resumed from step" in single_resume.output

    pair = _two_processes(workdir, config_arg)
    assert [p.finish() for p in pair] == [0, 0], pair[0].output + pair[1].output
    assert "resumed from step" in pair[0].output
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 2  # process 0's, once per run

    config, devices = (
        config_lib.load_config(f"tests/tiny_config.py:{config_arg}"),
        jax.devices()[:4],
    )
    step_b, params_b = final_params(config, str(tmp_path / "single"), devices)
    flat_b = np.concatenate([x.ravel() for x in jax.tree.leaves(params_b)])
    for run in (workdir, alone):
        step_a, params_a = final_params(config, str(run), devices)
        assert step_a == step_b == steps
        # Same data and math, but reductions across processes (gloo) add in another order
        # than within one, and SGD amplifies round-off step by step: compare the whole
        # parameter vector. (Different global batches move it by several percent.)
        flat_a = np.concatenate([x.ravel() for x in jax.tree.leaves(params_a)])
        difference = np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_b)
        assert difference < 5e-3, (run.name, difference)


@slow
def test_a_two_process_run_on_a_workdir_in_use_exits_on_both_processes(tmp_path):
    """Process 0 finds the lock held; its verdict reaches process 1 through the
    coordination service, so both exit 1 with the same line at once (before: process 1
    went on and died 30 s later in its first collective; on a pod it would hang)."""
    config_arg = "steps=200,checkpoint_every=5"
    holder = helpers.train(tmp_path, config_arg, "--config.input.batch_size=256")
    holder.wait_for(r"step 2/200")
    pair = _two_processes(tmp_path, config_arg)
    codes, exited = [], []
    for process in pair:
        codes.append(process.finish(120))
        exited.append(time.monotonic())
    assert codes == [1, 1], pair[0].output + pair[1].output
    lines = [[x for x in p.output.splitlines() if x.startswith("error:")] for p in pair]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    assert f"in use by another trainer (pid {holder.popen.pid} on" in lines[0][0]
    assert exited[1] - exited[0] < 10  # process 1 had already left, or left at once
    assert "Traceback" not in pair[0].output + pair[1].output
    holder.popen.terminate()
    assert holder.finish() == 0, holder.output


@slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--workdir", "WORKDIR"], "error: --config is required: e.g. --config configs/digits.py"),
        (
            ["--config", "configs/digit.py", "--workdir", "WORKDIR"],
            "error: --config configs/digit.py: no such file 'configs/digit.py'; did you mean "
            "configs/digits.py?",
        ),
        (["--config", "configs/digits.py"], "error: --workdir is required"),
        (
            [
                "--config",
                "configs/digits.py",
                "--workdir",
                "WORKDIR",
                "--config.model.kernal_size=3",
            ],
            'kernal_size. Did you mean "kernel_size" instead of "kernal_size"? The fields are',
        ),
    ],
)
def test_a_forgotten_or_misspelt_flag_is_named_with_the_fix(tmp_path, args, message):
    args = [a.replace("WORKDIR", str(tmp_path / "run")) for a in args]
    run = helpers.Process(["train.py", *args], helpers.environment())
    assert run.finish() == 1
    assert message in run.output and "Traceback" not in run.output, run.output
    assert not (tmp_path / "run").exists()


def test_help_is_a_success_and_lists_every_flag_of_the_program():
    """``train.py --help`` exits 0 (absl's help exits 1) and lists --verbose beside the
    program's own flags, not only under --helpfull."""
    run = helpers.Process(["train.py", "--help"], helpers.environment())
    assert run.finish() == 0, run.output
    for flag in ("--config", "--workdir", "--distributed", "--[no]verbose"):
        assert flag in run.output, run.output
