"""A trained model back from its workdir: the one way ``eval.py``, ``visualize`` and any
user's script restore a checkpoint for evaluation. The checkpoint chosen and verified by
``run.restoring.restore_for_evaluation``; the evaluation setting checked against the
run's (``resume.EVAL_FIELDS``) before anything is compiled."""

from __future__ import annotations

import dataclasses

import ml_collections
from flax import nnx

from sasa_flax.run import Workdir, restoring
from sasa_flax.trainer import resume
from sasa_flax.trainer.progress import log_model_description
from sasa_flax.trainer.setup import (
    Setup,
    TrainState,
    abstract_state,
    eval_weights,
    make_eval_setup,
    merged_model,
)


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint restored for evaluation (its model item only, no optimizer state)."""

    setup: Setup  # make_eval_setup's: the evaluation split only
    abstract: TrainState
    workdir: Workdir
    step: int
    items: dict  # "model" (params, model_state, ema_params) and "meta"
    setting: str  # "" for the run's own evaluation setting, else what differs

    @property
    def weights(self) -> tuple[dict, dict]:
        """(params to evaluate, model state): the EMA where the run kept one."""
        return eval_weights(self.items["model"])

    def model(self) -> nnx.Module:
        """The model with these weights, in evaluation mode."""
        return merged_model(self.setup, self.setup.eval_graphdef, *self.weights, 0)


def restore(
    config: ml_collections.ConfigDict,
    workdir: Workdir | str,
    *,
    step: int | None = None,
    devices=None,
    other_setting: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Restored:
    """The checkpoint of ``workdir`` at ``step`` (default: the newest that verifies) for
    ``config``, in the evaluation setting the run was trained for unless
    ``other_setting``. The run's data setting is checked from its run record before any
    data is opened (another dataset's config would otherwise try to download it first);
    the model's after the checkpoint's architecture is checked (a shape that differs
    names its parameters)."""
    workdir = Workdir.of(workdir)
    workdir.check_not_a_file()
    record = workdir.run_record()
    if record.get("config"):
        saved = resume.eval_fields(record["config"], model=False)
        resume.eval_setting_suffix(dict(eval_setting=saved), config, workdir, other_setting)
    setup = make_eval_setup(
        config, devices=devices, process_index=process_index, process_count=process_count
    )
    log_model_description(setup)  # as train.py does: which implementation each layer runs
    abstract = abstract_state(setup)
    step, items = restoring.restore_for_evaluation(workdir, abstract.model_item(), step)
    saved = resume.recorded_eval_setting(items["meta"], record, config.model.name)
    setting = resume.eval_setting_suffix(dict(eval_setting=saved), config, workdir, other_setting)
    return Restored(setup, abstract, workdir, step, items, setting)
