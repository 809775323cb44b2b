"""Preemption, crashes and bad steps: real signals to real train.py processes, real kills
in the middle of checkpoint writes, and exact resumption checked to the bit."""

import pathlib
import signal
import time

import jax
import numpy as np
import pytest

from sasa_flax import checkpointing, train_lib
from tests import subprocesses
from tests.test_train import final_params, tiny_config

STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The parameters that the interrupted runs must reproduce: the same 24 steps in one
    train.py process that nothing stops (a process, not this one: XLA's CPU numerics
    depend on how many host devices the platform was started with)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run = subprocesses.train(workdir, f"steps={STEPS}")
    assert run.finish() == 0, run.output
    return final_params(tiny_config(num_steps=STEPS), str(workdir), jax.devices()[:1])[1]


def assert_same_final_parameters(workdir, expected):
    step, params = final_params(tiny_config(num_steps=STEPS), str(workdir), jax.devices()[:1])
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def complete_steps(workdir) -> list[int]:
    return sorted(checkpointing.manager(str(workdir), read_only=True).all_steps())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_exits_0_and_the_rerun_resumes_exactly(
    signum, uninterrupted, tmp_path, rng
):
    config_arg = f"steps={STEPS},checkpoint_every=1000"  # no periodic checkpoint in the way
    run = subprocesses.train(tmp_path, config_arg)
    at = int(rng.integers(2, STEPS // 2))
    run.wait_for(rf"step {at}/{STEPS}")
    run.popen.send_signal(signum)
    assert run.finish() == 0, run.output
    stopped = int(run.wait_for(rf"stopped by {signum.name} after step (\d+)", timeout=1)[1])
    assert at <= stopped < STEPS
    assert complete_steps(tmp_path)[-1] == stopped  # written at the signal, and durable
    rerun = subprocesses.train(tmp_path, config_arg)
    assert rerun.finish() == 0, rerun.output
    assert f"resumed from step {stopped} " in rerun.output
    assert_same_final_parameters(tmp_path, uninterrupted)


def test_a_second_sigint_exits_at_once(tmp_path):
    # Batches of 512 (about half a second a step) leave time for the second Ctrl-C.
    run = subprocesses.train(
        tmp_path, "steps=200,checkpoint_every=5", "--config.input.batch_size=512"
    )
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


def test_sigkill_during_checkpoint_writes_leaves_the_run_resumable_and_exact(
    uninterrupted, tmp_path
):
    """Three kills in a row, each in the middle of a checkpoint write, then a clean finish."""
    checkpoints = tmp_path / checkpointing.CHECKPOINT_DIR
    config_arg = f"steps={STEPS},checkpoint_every=1"
    for point in ("temporary directory created", "model item written", "2 ms into the write"):
        run = subprocesses.train(tmp_path, config_arg)
        interrupted = _kill_while_writing(run, checkpoints, point)
        step_being_written = int(interrupted.name.split(".")[0])
        steps = complete_steps(tmp_path)
        assert step_being_written not in steps  # the half-written step is not listed ...
        if steps:  # ... and the newest listed one restores completely
            setup = train_lib.make_setup(tiny_config(num_steps=STEPS), devices=jax.devices()[:1])
            abstract = train_lib.abstract_state(setup)
            mngr = checkpointing.manager(str(tmp_path), read_only=True)
            item = checkpointing.restore(
                mngr, steps[-1], model=abstract.model_item(), train=abstract.train_item()
            )
            assert int(item["train"]["step"]) == steps[-1]
    rerun = subprocesses.train(tmp_path, config_arg)
    assert rerun.finish() == 0, rerun.output
    assert not _tmp_dirs(checkpoints)  # the leftovers were cleaned up
    assert_same_final_parameters(tmp_path, uninterrupted)
