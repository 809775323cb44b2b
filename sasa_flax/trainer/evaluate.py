"""Evaluation: of the state during training, and of a saved checkpoint (``eval.py``), which
restores the model item only and never opens the training split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sasa_flax import data, logs
from sasa_flax.run import Workdir, distributed
from sasa_flax.trainer.compile import compile_eval_step, kernel_failures_in_config_terms
from sasa_flax.trainer.progress import log, write_eval_events
from sasa_flax.trainer.restore import restore
from sasa_flax.trainer.setup import Setup
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
    logs.show_progress()
    restored = restore(config, workdir, step=step, devices=devices, other_setting=other_setting)
    workdir, setup = restored.workdir, restored.setup
    # Only for a run that has a checkpoint (a missing workdir is "not trained"), before
    # the evaluation.
    writable = workdir.writable()
    if not writable and jax.process_index() == 0:
        log.warning("%s is not writable: the results are printed, not written to it", workdir)
    eval_fn, _ = compile_eval_step(setup, restored.abstract)  # chunked where it must be
    results = evaluate(setup, eval_fn, *restored.weights)

    def write():
        workdir.write_eval_results(restored.step, results, restored.setting)
        write_eval_events(str(workdir.eval_events), restored.step, results)

    if writable:
        distributed.on_process_0("eval-results", write)
    setting = restored.setting or "the run's own"
    return dict(step=restored.step, setting=setting, written=writable, **results)
