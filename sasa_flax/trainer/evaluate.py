"""Evaluation: of the state during training, and of a saved checkpoint (``eval.py``), which
restores the model item only and never opens the training split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sasa_flax import data, logs
from sasa_flax.run import Workdir, checkpoints
from sasa_flax.trainer import resume
from sasa_flax.trainer.compile import compile_eval_step, kernel_failures_in_config_terms
from sasa_flax.trainer.progress import log, log_model_description, write_eval_events
from sasa_flax.trainer.setup import Setup, TrainState, abstract_state, eval_weights, make_eval_setup
from sasa_flax.trainer.steps import global_batch


def evaluate(setup: Setup, eval_fn, params: dict, model_state: dict) -> dict:
    """Top-1, top-5 (%) and loss over every example of the eval split, exactly once."""
    totals = None
    batches = data.eval_batches(setup.dataset, setup.config.input)
    for local in batches:
        with kernel_failures_in_config_terms():  # compiled at the first batch
            sums = eval_fn(params, model_state, global_batch(setup, local))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    skipped = setup.dataset.eval.size - int(count)  # corrupt images, under 'skip'
    if skipped and jax.process_index() == 0:
        log.warning("evaluation skipped %d image(s) that could not be decoded", skipped)
    return dict(
        top1=100.0 * float(totals["top1"]) / max(count, 1.0),
        top5=100.0 * float(totals["top5"]) / max(count, 1.0),
        loss=float(totals["loss"]) / max(count, 1.0),
        num_examples=int(count),
        skipped_images=skipped,
    )


def restore_model_item(setup: Setup, abstract: TrainState, workdir: Workdir, step: int | None):
    """(step, restored items: "model" and "meta") of a checkpoint, verified: the newest
    that verifies, or ``step`` (refused naming the newest good one if it does not)."""
    workdir = Workdir.of(workdir)
    workdir.check_not_a_file()
    mngr = checkpoints.manager(workdir, read_only=True)
    requested = checkpoints.step_to_restore(mngr, workdir, step)
    if step is None:  # the newest checkpoint that verifies
        return checkpoints.newest_good(
            mngr, workdir, set_bad_aside=False, model=abstract.model_item()
        )
    checkpoints.check_architecture(mngr, requested, abstract.model_item(), "this config")
    try:
        return requested, checkpoints.restore_verified(mngr, requested, model=abstract.model_item())
    except checkpoints.CheckpointError as e:
        good, _ = checkpoints.newest_good(
            mngr, workdir, set_bad_aside=False, quiet=True, model=abstract.model_item()
        )
        raise checkpoints.CheckpointError(
            f"{e}; not evaluating it. The newest checkpoint that verifies is step {good}."
        ) from None


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | Workdir,
    *,
    step: int | None = None,
    devices=None,
    other_setting: bool = False,
) -> dict:
    """Restores a checkpoint's model item (no optimizer state) and evaluates it, in the
    evaluation setting the run was trained for unless ``other_setting`` (see
    ``resume.EVAL_FIELDS``; checked before anything is compiled). Opens the evaluation
    split only (``make_eval_setup``). Where the workdir cannot be written (read-only, no
    permission), says so first and evaluates anyway, returning ``written=False``."""
    # The run's data setting from its run record, before any data is opened (another
    # dataset's config would otherwise try to download it first); the model's after the
    # checkpoint's architecture is checked (a shape that differs names its parameters).
    logs.show_progress()
    workdir = Workdir.of(workdir)
    workdir.check_not_a_file()
    record = workdir.run_record()
    if record.get("config"):
        saved = resume.eval_fields(record["config"], model=False)
        resume.eval_setting_suffix(dict(eval_setting=saved), config, workdir, other_setting)
    setup = make_eval_setup(config, devices=devices)
    log_model_description(setup)  # as train.py does: which implementation each layer runs
    abstract = abstract_state(setup)
    step, restored = restore_model_item(setup, abstract, workdir, step)
    # Only for a run that has a checkpoint (a missing workdir is "not trained", above),
    # before the evaluation.
    writable = workdir.writable()
    if not writable and jax.process_index() == 0:
        log.warning("%s is not writable: the results are printed, not written to it", workdir)
    saved = resume.recorded_eval_setting(restored["meta"], record, config.model.name)
    setting = resume.eval_setting_suffix(dict(eval_setting=saved), config, workdir, other_setting)
    eval_fn, _ = compile_eval_step(setup, abstract)  # chunked where the batch would not fit
    results = evaluate(setup, eval_fn, *eval_weights(restored["model"]))
    if writable:
        workdir.write_eval_results(step, results, setting)
        if jax.process_index() == 0:
            write_eval_events(workdir.eval_events, step, results)
    return dict(step=step, setting=setting or "the run's own", written=writable, **results)
