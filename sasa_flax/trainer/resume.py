"""The rules of resuming, beside the trainer that applies them: which config fields a
resumed run must keep (``SCHEDULE_FIELDS``), which define what an evaluation means
(``EVAL_FIELDS``), what a checkpoint's ``meta`` item and the run record (``run.json``)
hold, and when a rerun finds its run already finished. Where these files live is
``run.Workdir``'s.
"""

from __future__ import annotations

import json
import logging
import time

import jax

from sasa_flax import costs, models
from sasa_flax.errors import TrainError
from sasa_flax.run import checkpoints, restoring
from sasa_flax.run.workdir import Workdir
from sasa_flax.trainer.setup import Setup, abstract_state

log = logging.getLogger(__name__)


# The fields that shape the learning-rate schedule or the data stream of a run: a resumed
# run must have the checkpoint's values (or config.train.allow_schedule_change=True).
SCHEDULE_FIELDS = (
    "train.num_epochs",
    "train.num_steps",
    "train.base_learning_rate",
    "train.warmup_epochs",
    "train.seed",
    "input.batch_size",
    "input.dataset",
    "input.data_dir",
    "input.tuning_split",
    "input.augment",
)


# The fields that change what an evaluation means: recorded at training time, and
# eval.py evaluates that setting unless told otherwise (--other_setting). Every field of
# the model that defines it (``model_fields``) belongs to it too.
EVAL_FIELDS = (
    "input.dataset",
    "input.data_dir",
    "input.tuning_split",
    "input.image_size",
    "input.augment",
)


def _as_json(config) -> dict:
    """A config, or a run record's config, as JSON holds it (tuples become lists), so
    that a value read back from a record compares equal to the same value in a config."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return json.loads(config.to_json_best_effort())


def _fields(config, names) -> dict:
    config = _as_json(config)
    return {f: config[f.split(".")[0]].get(f.split(".")[1]) for f in names}


def _schedule_fields(config) -> dict:
    return _fields(config, SCHEDULE_FIELDS)


def model_fields(config, model_name: str | None = None) -> dict:
    """{"model.<field>": value} of every model field that defines the model: all of
    ``config.model`` but the registered model's ``implementation_fields`` (how it is
    computed, e.g. ``attention_impl``). ``model_name``: whose implementation fields (by
    default the config's own model)."""
    model = _as_json(config)["model"]
    free = models.implementation_fields(model_name or model.get("name", ""))
    return {f"model.{k}": v for k, v in sorted(model.items()) if k not in free}


def same_run(record: dict, config) -> bool:
    """Whether the run record's config (``run.json``) has ``config``'s schedule fields and
    model."""
    saved = record.get("config")
    if not saved:
        return False
    name = _as_json(config)["model"].get("name")
    return not (
        _changes(_schedule_fields(saved), _schedule_fields(config))
        or _changes(model_fields(saved, name), model_fields(config))
    )


def _changes(saved: dict, now: dict) -> list[str]:
    """The fields both hold with different values (a field added to or removed from the
    code since is not a change of the run)."""
    return [f for f in saved if f in now and saved[f] != now[f]]


def _listing(saved: dict, now: dict, changed: list[str]) -> str:
    return ", ".join(f"config.{f} {saved[f]!r} -> {now[f]!r}" for f in changed)


def checkpoint_meta(setup: Setup, step: int) -> dict:
    return dict(
        step=step,
        epoch=step / setup.steps_per_epoch,
        examples_seen=step * setup.config.input.batch_size,
        global_batch_size=setup.config.input.batch_size,
        dataset=setup.config.input.dataset,
        seed=setup.config.train.seed,
        total_steps=setup.total_steps,
        schedule=_schedule_fields(setup.config),
        model=model_fields(setup.config),
        eval_setting=eval_fields(setup.config),
        processes=setup.dataset.process_count,
    )


def warn_if_data_order_changes(setup: Setup, meta: dict) -> None:
    """A checkpoint restores onto any mesh (orbax reshards it). Random-access splits keep
    their global order on any number of processes; a streamed (TFDS) split is read per
    process, so another process count continues with another, equally shuffled, order."""
    saved = meta.get("processes")
    if saved and saved != setup.dataset.process_count and setup.dataset.train.read is None:
        log.warning(
            "resuming a run of %d processes on %d: the TFDS training split is read per "
            "process, so it continues in another (equally shuffled) order",
            saved,
            setup.dataset.process_count,
        )


def check_schedule_unchanged(setup: Setup, meta: dict, workdir: Workdir) -> None:
    """Refuses a resume whose schedule or data fields differ from the checkpoint's, naming
    each field with its old and new value, unless config.train.allow_schedule_change."""
    saved = dict(meta.get("schedule") or {"input.batch_size": meta.get("global_batch_size")})
    now = _schedule_fields(setup.config)
    changed = _changes(saved, now)
    if not changed:
        return
    listing = _listing(saved, now, changed)
    if setup.config.train.allow_schedule_change:
        log.warning(
            "resuming with a changed schedule (%s): it continues from step %d of the new one",
            listing,
            meta["step"],
        )
        return
    raise TrainError(
        f"{workdir} was trained with a different schedule or data stream: {listing}. "
        "Resuming would silently change the run; use the original values, a new workdir, or "
        "--config.train.allow_schedule_change=True to continue from step "
        f"{meta['step']} with the new schedule (e.g. to extend a finished run)."
    )


def check_model_unchanged(setup: Setup, meta: dict, workdir: Workdir) -> None:
    """Refuses a resume whose model differs from the checkpoint's in any field that
    defines it (``model_fields``), shape-free ones included (``scale_queries``,
    ``padding``, BatchNorm's options): the parameters would restore and the run would go
    on as another model. Checkpoints from before the model was recorded in ``meta`` are
    compared with the run record's config."""
    now = model_fields(setup.config)
    saved = meta.get("model")
    if saved is None:
        recorded = workdir.run_record().get("config")
        if not recorded:
            return
        saved = model_fields(recorded, setup.config.model.name)
    changed = _changes(saved, now)
    if changed:
        raise TrainError(
            f"{workdir} was trained as another model: {_listing(saved, now, changed)}. "
            "Resuming would silently go on as a different model; use the run's values (its "
            f"{Workdir.RUN_RECORD} has them) or a new workdir."
        )


def run_record(setup: Setup, workdir: Workdir, command: dict, start_step: int = 0) -> dict:
    """``run.json``: this start's config argument and overrides, the whole config, the
    model's size and the devices; and ``starts``, one entry per (re)start of the run
    (time, step it started from, its config argument, overrides, config and devices), so
    that a resume with other overrides stays visible. Written at every start, after the
    resume checks passed. ``report --results`` reads it."""
    layers, uncounted = costs.report(setup.abstract_model, setup.config.input.image_size)
    params, total_flops = costs.total(layers)
    config = json.loads(setup.config.to_json_best_effort())
    devices = dict(
        devices=setup.mesh.size,
        processes=jax.process_count(),
        device_kind=jax.devices()[0].device_kind,
    )
    try:
        starts = workdir.run_record().get("starts", [])
    except (ValueError, OSError):  # an unreadable record: the history starts again
        starts = []
    this_start = dict(time=time.time(), start_step=start_step, **command, config=config)
    starts.append(dict(this_start, **devices))
    return dict(
        **command,
        config=config,
        params=params,
        flops=total_flops,
        # Layers with parameters that no cost rule counts (a model of the user's own):
        # the counts above leave them out.
        uncounted_layers=uncounted,
        **devices,
        total_steps=setup.total_steps,
        steps_per_epoch=setup.steps_per_epoch,
        starts=starts,
    )


def finished_results(setup: Setup, workdir: Workdir) -> dict | None:
    """The final evaluation of a run in ``workdir`` that reached this config's last step
    with this config's schedule, was evaluated there and whose last checkpoint verifies,
    or None: a rerun of a finished run (a sweep run twice) says so instead of compiling,
    training and evaluating again. A changed schedule or a damaged last checkpoint goes the
    usual way (refused or extended; reported, set aside and redone)."""
    if not workdir.exists():
        return None
    results = workdir.eval_results().get(setup.total_steps)
    newest = max(workdir.checkpoint_steps(), default=0)
    if results is None or newest != setup.total_steps:
        return None
    if not same_run(workdir.run_record(), setup.config):
        return None
    # Its last checkpoint must still verify: a damaged one is redone the usual way.
    if setup.total_steps in restoring.damaged_steps(workdir):
        return None
    abstract = abstract_state(setup)
    mngr = checkpoints.manager(workdir, read_only=True)
    try:
        checkpoints.restore_verified(
            mngr, setup.total_steps, model=abstract.model_item(), train=abstract.train_item()
        )
    except checkpoints.CheckpointError:
        return None
    return results


def eval_fields(config, model_name: str | None = None, *, model: bool = True) -> dict:
    """The fields that change what an evaluation means (``EVAL_FIELDS`` and, with
    ``model``, the model's ``model_fields``) of a config or of a run record's config (a
    dict)."""
    fields = _fields(config, EVAL_FIELDS)
    return dict(fields, **model_fields(config, model_name)) if model else fields


def recorded_eval_setting(meta: dict, record: dict, model_name: str) -> dict:
    """The evaluation setting a checkpoint was trained for: its ``meta``'s, completed
    with the run record's model fields for checkpoints from before ``meta`` held them."""
    saved = dict(meta.get("eval_setting") or {})
    if "model" not in meta and record.get("config"):
        saved = dict(model_fields(record["config"], model_name), **saved)
    return saved


def eval_setting_suffix(meta: dict, config, workdir: Workdir, other_setting: bool) -> str:
    """ "" when ``config`` evaluates the setting the run was trained for (``meta``'s);
    otherwise refuses, or with ``other_setting`` names the setting for its results file."""
    saved = meta.get("eval_setting") or {}
    now = eval_fields(config)
    changed = _changes(saved, now)  # only the fields ``saved`` holds
    if not changed:
        return ""
    listing = _listing(saved, now, changed)
    if not other_setting:
        raise TrainError(
            f"{workdir} was trained for another evaluation setting: {listing}. Pass the run's "
            "own settings, or --other_setting to evaluate this one on purpose (its results "
            "go to a file named for it; the run's own results file is kept)."
        )
    return "-".join(f"{f.split('.')[1]}={str(now[f]).replace('/', '_')}" for f in changed)
