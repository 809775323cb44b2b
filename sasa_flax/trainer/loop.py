"""The training loop, in labelled stages (one process per host; every host runs the same
program):
  1. Validate the config and the batch against the devices; open the dataset. A run
     that already finished says so and does nothing more.
  2. Claim the workdir (process 0 decides, every process hears the verdict).
  3. Abstract init (``jax.eval_shape``), then the state born replicated on the mesh, or
     restored from the newest checkpoint that verifies; both steps compiled and checked
     against the device's memory; only then is the start recorded.
  4. Loop: global batches from per-process data, jitted train step (state donated),
     metrics, periodic evaluation, asynchronous checkpoints.
  5. Final checkpoint and evaluation, printed and written to the workdir.
"""

from __future__ import annotations

import collections
import contextlib
import time

import flax
import jax
import ml_collections

from sasa_flax import data, logs
from sasa_flax.errors import TrainError
from sasa_flax.run import Workdir, checkpoints, distributed, lock, preemption, restoring, saves
from sasa_flax.trainer import resume
from sasa_flax.trainer.compile import compile_eval_step, compile_train_step
from sasa_flax.trainer.evaluate import evaluate
from sasa_flax.trainer.prefetch import DevicePrefetch
from sasa_flax.trainer.profile import StepProfile
from sasa_flax.trainer.progress import (
    ProgressLog,
    format_duration,
    log,
    log_model_description,
    metric_writer,
)
from sasa_flax.trainer.setup import (
    Setup,
    TrainState,
    abstract_state,
    eval_weights,
    init_state,
    log_weight_decay,
    make_setup,
)

STEPS_IN_FLIGHT = 2  # steps the loop may dispatch beyond the last one finished


def _nonfinite_error(checkpoint_saves, bad: int, metrics: dict, done: int) -> TrainError:
    checkpoint_saves.finish()  # the last good checkpoint is complete; no later one is saved
    newest = checkpoint_saves.mngr.latest_step()
    loss, grad_norm = (float(metrics[k]) for k in ("loss", "grad_norm"))
    unsaved = f"step {bad}" if bad == done else f"steps {bad}-{done}"
    return TrainError(
        f"step {bad}: non-finite training (loss {loss}, gradient norm {grad_norm}); stopped "
        f"without saving {unsaved}. The newest checkpoint is step {newest}. "
        "Lower config.train.base_learning_rate or lengthen warm-up, or set "
        "config.train.on_nonfinite='skip' to skip such steps and count them."
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Workdir,
    *,
    devices=None,
    stop_after_step: int | None = None,
    command: dict | None = None,
) -> dict:
    """Trains (resuming from workdir's latest checkpoint), evaluates, returns the final
    eval metrics. It returns early, after a durable checkpoint, with ``stopped_by`` set
    on SIGTERM / SIGINT (see ``preemption``), or at ``stop_after_step``. ``command``:
    the config file argument and overrides (``cli.config_arguments``), for ``run.json``."""
    # 1-2. Config, devices, data, mesh; then the workdir (nothing is written before), held
    # by this run alone while it trains. Process 0 decides and every process hears the
    # verdict: a refusal ends all of them with the same line.
    logs.show_progress()
    workdir = Workdir.of(workdir)
    workdir.check_not_a_file()
    setup = make_setup(config, devices=devices)
    finished = distributed.everywhere("finished", lambda: resume.finished_results(setup, workdir))
    if finished is not None:
        if jax.process_index() == 0:
            log.info(
                "%s already finished at step %d (final top-1 %.2f%%): nothing to do. To "
                "evaluate it again: eval.py; to train it longer: more --config.train."
                "num_epochs with --config.train.allow_schedule_change=true; to train it "
                "anew: another --workdir.",
                workdir,
                finished["step"],
                finished["top1"],
            )
        return dict(finished, already_finished=True)
    lease = distributed.on_process_0("claim-workdir", lambda: _claim_workdir(workdir))
    with lock.keep(lease):
        distributed.everywhere("workdir-writable", workdir.ensure_writable)
        return _train_and_evaluate(setup, workdir, stop_after_step, command or {})


def _claim_workdir(workdir: Workdir) -> lock.Lease:
    """Process 0's part of a start: refuses a workdir a live run holds, removes what a
    killed save left (it may be what fills the disk; never a live run's save in
    progress), proves the workdir writable, then takes its lock."""
    lock.check_free(workdir)
    restoring.remove_partial_checkpoints(workdir)
    workdir.ensure_writable()
    return lock.take(workdir)


def _train_and_evaluate(
    setup: Setup,
    workdir: Workdir,
    stop_after_step: int | None,
    command: dict,
) -> dict:
    config = setup.config
    abstract = abstract_state(setup)  # traced once, used for jit, init and restore
    log_weight_decay(setup, abstract)
    log_model_description(setup)
    t = config.train
    mngr = checkpoints.manager(
        workdir, every_steps=t.checkpoint_every_steps, keep=t.keep_checkpoints
    )
    checkpoint_saves = saves.Saves(mngr, workdir, abstract.model_item(), abstract.train_item())

    # 3. State: restored from the newest checkpoint that verifies (a damaged one is moved
    # aside, saying so), or born sharded.
    start_step, restored = restoring.newest_good(
        mngr,
        workdir,
        set_bad_aside=True,
        model=abstract.model_item(),
        train=abstract.train_item(),
    )
    damaged = restoring.damaged_steps(workdir)  # kept in place: replaced when re-saved
    if restored is not None:
        resume.check_model_unchanged(setup, restored["meta"], workdir)
        resume.check_schedule_unchanged(setup, restored["meta"], workdir)
        resume.warn_if_data_order_changes(setup, restored["meta"])
        state = TrainState(**restored["model"], **restored["train"])
        log.info("resumed from step %d of %s", start_step, workdir)
    else:
        state = init_state(setup, abstract)
    # Both steps compiled, and checked against the device's memory, before the start is
    # recorded: a train batch that cannot fit ends here naming the accumulation that
    # would; an eval batch that cannot fit is evaluated in chunks.
    compile_start = time.perf_counter()
    train_fn = compile_train_step(setup, abstract)
    compile_seconds = time.perf_counter() - compile_start
    if jax.process_index() == 0:
        log.info("compiled the train step in %s", format_duration(compile_seconds))
    eval_fn, _ = compile_eval_step(setup, abstract)
    # Only now, with every check passed, is the start recorded.
    distributed.on_process_0(
        "run-record",
        lambda: workdir.write_run_record(resume.run_record(setup, workdir, command, start_step)),
    )
    writer = metric_writer(workdir.root)
    if start_step == 0 and jax.process_index() == 0:
        writer.write_hparams(
            {
                k: str(v)
                for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
            }
        )

    # 4. Loop. Batches are put on the devices two steps ahead by a background thread; the
    # loop reads from the devices only at log lines, evaluations and saves, never once
    # per step.
    writer.write_scalars(start_step, {"train/compile_seconds": compile_seconds})
    batches = data.train_batches(setup.dataset, config.input, seed=t.seed, start_step=start_step)
    end_step = (
        setup.total_steps if stop_after_step is None else min(stop_after_step, setup.total_steps)
    )
    prefetch = DevicePrefetch(setup, batches)
    progress = ProgressLog(setup, writer, start_step, prefetch)
    in_flight = collections.deque()  # a small output of each step not yet waited for
    profile = StepProfile(t, workdir)
    try:
        with preemption.stop_on_signals() as stop_request:
            for step in range(start_step, end_step):
                profile.before(step)
                # The per-step path moves nothing between host and device implicitly: a
                # host read of a device value here would stall every step of a pod, so
                # it fails instead (explicit reads at log lines, evaluations and saves).
                with jax.transfer_guard("disallow"):
                    state, metrics = train_fn(state, next(prefetch))
                    done = step + 1
                    progress.add(done, metrics)
                # Dispatch is asynchronous: unchecked, the loop runs tens of steps ahead of
                # the devices and a stop request waits for all of them. It waits instead
                # for the step STEPS_IN_FLIGHT back to finish (no transfer: the devices
                # always have the next steps queued), so a stop is acted on within that
                # many steps after the one the devices are running.
                in_flight.append(metrics["finite"])
                if len(in_flight) > STEPS_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                profile.after(done, metrics)
                checkpoint_saves.poll()  # a save that failed in the background stops the run here
                stopping = stop_request.should_stop(done)
                force = done == end_step or stopping
                evaluating = bool(
                    t.eval_every_steps
                    and done % t.eval_every_steps == 0
                    and done != setup.total_steps
                )
                saving = force or mngr.should_save(done)
                writing = force or progress.due(done)
                # A non-finite step left the state as it was, on device; under 'stop' it
                # is looked for before anything is logged, evaluated or saved, so that it
                # is never checkpointed and the run stops naming it.
                if t.on_nonfinite == "stop" and (saving or writing or evaluating):
                    bad = progress.first_nonfinite()
                    if bad is not None:
                        raise _nonfinite_error(checkpoint_saves, *bad, done)
                if writing:
                    progress.write(done)
                if evaluating:
                    results = evaluate(setup, eval_fn, *eval_weights(state))
                    writer.write_scalars(done, {f"eval/{k}": v for k, v in results.items()})
                if saving:  # decided here alone (a period, a stop, the last step)
                    checkpoint_saves.start(
                        done,
                        model=state.model_item(),
                        train=state.train_item(),
                        meta=resume.checkpoint_meta(setup, done),
                        damaged=damaged,
                    )
                if stopping:
                    checkpoint_saves.finish()
                    writer.flush()
                    log.info(
                        "%s: stopped after step %d with its checkpoint written; run the same "
                        "command to resume.",
                        stop_request.reason,
                        done,
                    )
                    return dict(step=done, train_log=progress.lines, stopped_by=stop_request.reason)
    except Exception:
        # A fatal error mid-run (a corrupt image, a full disk): let the checkpoint being
        # written finish, or fail, before the error ends the program, so that orbax is not
        # shut down under it; the newest complete checkpoint stays the last good one.
        with contextlib.suppress(Exception):
            mngr.wait_until_finished()
        with contextlib.suppress(Exception):  # the events queued since the last flush
            writer.flush()
        raise
    finally:
        prefetch.close()
        profile.stop()  # a run that ends or stops inside the traced steps

    # 5. Final evaluation (the loop's last step forced a checkpoint; let it land).
    final_step = int(jax.device_get(state.step))
    checkpoint_saves.finish()
    if stop_after_step is not None and final_step < setup.total_steps:
        writer.flush()
        return dict(step=final_step, train_log=progress.lines)
    results = evaluate(setup, eval_fn, *eval_weights(state))
    writer.write_scalars(final_step, {f"eval/{k}": v for k, v in results.items()})
    writer.flush()
    distributed.on_process_0(
        "final-results", lambda: workdir.write_eval_results(final_step, results)
    )
    if jax.process_index() == 0:
        log.info(
            "final evaluation at step %d: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d examples)",
            final_step,
            results["top1"],
            results["top5"],
            results["loss"],
            results["num_examples"],
        )
    return dict(step=final_step, train_log=progress.lines, **results)
