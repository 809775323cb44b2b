"""The workdir: every file and folder a run keeps there, who writes it, and the rules
around it (what a resume must keep unchanged, what an evaluation's results file is named).

    workdir/
      run.json                        RUN_RECORD: config, size, devices, every (re)start
      train.lock                      LOCK_NAME: the live trainer's lease (workdir_lock)
      checkpoints/<step>/             CHECKPOINTS: model, train, meta items (checkpointing)
      damaged_checkpoints/            DAMAGED: checkpoints set aside or recorded damaged
      eval_results_step_<N>[_<setting>].json   final / eval.py results (eval_results_file)
      events.out.tfevents.*           TensorBoard: train/*, eval/* scalars (train.progress)
      eval/                           EVAL_EVENTS: eval.py's TensorBoard events

Written by process 0 only; local paths and gs:// alike (``etils.epath``). ``results``
reads a workdir through ``read_run_record``, ``eval_results`` and ``checkpoint_steps``.
"""

from __future__ import annotations

import json
import logging
import re
import time

import jax
from etils import epath

from sasa_flax.errors import TrainError

RUN_RECORD = "run.json"
LOCK_NAME = "train.lock"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
EVAL_EVENTS = "eval"
_EVAL_RESULTS = re.compile(r"^eval_results_step_(\d+)\.json$")  # the run's own setting only

log = logging.getLogger(__name__)


def path(workdir: str, name: str) -> str:
    """``workdir/name`` for local paths and gs:// alike."""
    return f"{str(workdir).rstrip('/')}/{name}"


def eval_results_file(step: int, setting: str = "") -> str:
    """``eval_results_step_{step}.json``, or ``..._{setting}.json`` for another setting."""
    return f"eval_results_step_{step}{setting and '_' + setting}.json"


def exists(workdir: str) -> bool:
    return epath.Path(workdir).exists()


def eval_results(workdir: str) -> dict[int, dict]:
    """{step: results} of the run's own evaluation setting."""
    found = {}
    for f in epath.Path(workdir).iterdir():
        if match := _EVAL_RESULTS.match(f.name):
            found[int(match.group(1))] = json.loads(f.read_text())
    return found


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps under ``checkpoints/`` (as listed, committed or not: how far a run got)."""
    root = epath.Path(workdir) / CHECKPOINTS
    return [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []


def read_run_record(workdir: str) -> dict:
    """``run.json``, or {} before the first start."""
    record = epath.Path(workdir) / RUN_RECORD
    return json.loads(record.read_text()) if record.exists() else {}


# The fields that shape the learning-rate schedule or the data stream of a run: a resumed
# run must have the checkpoint's values (or config.train.allow_schedule_change=True).
SCHEDULE_FIELDS = (
    "train.num_epochs", "train.num_steps", "train.base_learning_rate", "train.warmup_epochs",
    "train.seed", "input.batch_size", "input.dataset", "input.data_dir",
    "input.tuning_split", "input.augment",
)  # fmt: skip


# The fields that change what an evaluation means: recorded at training time, and
# eval.py evaluates that setting unless told otherwise (--other_setting).
EVAL_FIELDS = (
    "input.dataset", "input.data_dir", "input.tuning_split", "input.image_size",
    "input.augment", "model.num_classes",
)  # fmt: skip


def _fields(config, names) -> dict:
    return {f: config[f.split(".")[0]].get(f.split(".")[1]) for f in names}


def _schedule_fields(config) -> dict:
    return _fields(config, SCHEDULE_FIELDS)


def same_schedule(record: dict, config) -> bool:
    """Whether the run record's config (``run.json``) has ``config``'s schedule fields."""
    saved = record.get("config")
    if not saved:
        return False
    now = json.loads(config.to_json_best_effort())
    return not _changes(_schedule_fields(saved), _schedule_fields(now))


def _changes(saved: dict, now: dict) -> list[str]:
    return [f for f in saved if f in now and saved[f] != now[f]]


def _listing(saved: dict, now: dict, changed: list[str]) -> str:
    return ", ".join(f"config.{f} {saved[f]!r} -> {now[f]!r}" for f in changed)


def checkpoint_meta(setup, step: int) -> dict:
    return dict(
        step=step,
        epoch=step / setup.steps_per_epoch,
        examples_seen=step * setup.config.input.batch_size,
        global_batch_size=setup.config.input.batch_size,
        dataset=setup.config.input.dataset,
        seed=setup.config.train.seed,
        total_steps=setup.total_steps,
        schedule=_schedule_fields(setup.config),
        eval_setting=eval_fields(setup.config),
        processes=setup.dataset.process_count,
    )


def warn_if_data_order_changes(setup, meta: dict) -> None:
    """A checkpoint restores onto any mesh (orbax reshards it). Random-access splits keep
    their global order on any number of processes; a streamed (TFDS) split is read per
    process, so another process count continues with another, equally shuffled, order."""
    saved = meta.get("processes")
    if saved and saved != setup.dataset.process_count and setup.dataset.train.read is None:
        log.warning(
            "resuming a run of %d processes on %d: the TFDS training split is read per "
            "process, so it continues in another (equally shuffled) order",
            saved, setup.dataset.process_count,
        )  # fmt: skip


def check_schedule_unchanged(setup, meta: dict, workdir: str) -> None:
    """Refuses a resume whose schedule or data fields differ from the checkpoint's, naming
    each field with its old and new value, unless config.train.allow_schedule_change."""
    saved = dict(meta.get("schedule") or {"input.batch_size": meta.get("global_batch_size")})
    now = _schedule_fields(setup.config)
    changed = _changes(saved, now)
    if not changed:
        return
    listing = _listing(saved, now, changed)
    if setup.config.train.allow_schedule_change:
        log.warning("resuming with a changed schedule (%s): it continues from step %d of "
                    "the new one", listing, meta["step"])  # fmt: skip
        return
    raise TrainError(
        f"{workdir} was trained with a different schedule or data stream: {listing}. "
        "Resuming would silently change the run; use the original values, a new workdir, or "
        "--config.train.allow_schedule_change=True to continue from step "
        f"{meta['step']} with the new schedule (e.g. to extend a finished run)."
    )


def write_run_record(setup, workdir: str, command: dict, start_step: int = 0) -> None:
    """``run.json``: this start's config argument and overrides, the whole config, the
    model's size and the devices; and ``starts``, one entry per (re)start of the run
    (time, step it started from, its config argument, overrides, config and devices), so
    that a resume with other overrides stays visible. Written at every start, after the
    resume checks passed. ``report --results`` reads it."""
    from sasa_flax import costs  # the cost rules: only here, not on the training path

    try:
        params, total_flops = costs.count(setup.config)
    except Exception:  # noqa: BLE001 - a registered model without cost rules: no counts
        params = total_flops = None
    record_path = epath.Path(workdir) / RUN_RECORD
    config = json.loads(setup.config.to_json_best_effort())
    devices = dict(
        devices=setup.mesh.size,
        processes=jax.process_count(),
        device_kind=jax.devices()[0].device_kind,
    )
    try:
        starts = read_run_record(workdir).get("starts", [])
    except (ValueError, OSError):  # an unreadable record: the history starts again
        starts = []
    this_start = dict(time=time.time(), start_step=start_step, **command, config=config)
    starts.append(dict(this_start, **devices))
    record = dict(
        **command,
        config=config,
        params=params,
        flops=total_flops,
        **devices,
        total_steps=setup.total_steps,
        steps_per_epoch=setup.steps_per_epoch,
        starts=starts,
    )
    record_path.write_text(json.dumps(record, indent=1))


def write_eval_results(workdir: str, step: int, results: dict, setting: str = "") -> None:
    """``eval_results_step_{step}.json``, or ``..._{setting}.json`` for another setting."""
    if jax.process_index() != 0:
        return
    target = epath.Path(workdir) / eval_results_file(step, setting)
    target.write_text(json.dumps(dict(step=step, **results), indent=2))


def writable(workdir: str) -> bool:
    """Whether files can be written in the existing ``workdir`` (creates nothing else)."""
    probe = epath.Path(workdir) / f".sasa_write_test_{jax.process_index()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError:
        return False
    return True


def eval_fields(config) -> dict:
    """The fields that change what an evaluation means (``EVAL_FIELDS``) of a config or of
    a run record's config (a dict)."""
    return _fields(config, EVAL_FIELDS)


def ensure_writable(workdir: str) -> None:
    """Creates workdir if needed and proves it writable (local or gs://) before any work."""
    root = epath.Path(workdir)
    probe = root / f".sasa_write_test_{jax.process_index()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(
            f"--workdir {workdir} is not writable ({e.strerror or e}); pass a directory you "
            "can create files in (local path or gs://bucket/path)."
        ) from None


def eval_setting_suffix(meta: dict, config, workdir: str, other_setting: bool) -> str:
    """ "" when ``config`` evaluates the setting the run was trained for (``meta``'s);
    otherwise refuses, or with ``other_setting`` names the setting for its results file."""
    saved = meta.get("eval_setting") or {}
    now = eval_fields(config)
    changed = _changes(saved, now)
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
