"""Which checkpoint a run restores: the newest that verifies (a damaged one set aside on a
local disk, recorded on an object store, and skipped ever after), or the step asked for;
what a killed save left, removed before a run writes anything. ``checkpoints.py`` says
what a checkpoint holds and where."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sasa_flax.run import distributed
from sasa_flax.run.checkpoints import (
    ArchitectureMismatch,
    CheckpointError,
    check_architecture,
    manager,
    restore_verified,
)
from sasa_flax.run.workdir import Workdir

log = logging.getLogger(__name__)


def remove_partial_checkpoints(workdir: Workdir, *, quiet: bool = False) -> list[str]:
    """Deletes the ``N.orbax-checkpoint-tmp-*`` directories a killed or failed save left
    on a local disk (never a complete checkpoint); returns their paths. Run before
    anything else is written. On object stores there are none: orbax's manager removes
    uncommitted steps itself (module docstring). ``quiet``: no log line (the caller
    reports the failure that left them)."""
    root = workdir.path(Workdir.CHECKPOINTS)
    if workdir.on_object_store or not root.exists():
        return []
    partial = [p for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name]
    for path in partial:
        path.rmtree() if path.is_dir() else path.unlink()
    if partial and not quiet:
        log.warning(
            "removed %d partial checkpoint(s) a stopped run left: %s",
            len(partial),
            ", ".join(p.name for p in partial),
        )
    return [str(p) for p in partial]


def damaged_steps(workdir: Workdir) -> dict[int, str]:
    """{step: record path} of the damaged checkpoints recorded in place (object stores)
    and not yet replaced by a new save of their step."""
    root = workdir.damaged
    if not workdir.on_object_store or not root.exists():
        return {}
    found = {}
    for record in root.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):
            entry = json.loads(record.read_text())
            if not entry.get("replaced"):
                found[int(entry["step"])] = str(record)
    return found


def _mark_replaced(record: str) -> None:
    path = epath.Path(record)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), replaced=time.time())))


def set_aside(workdir: Workdir, step: int, reason: str) -> str:
    """Takes a damaged checkpoint out of the run, never deleting it (module docstring):
    moved into ``damaged_checkpoints/`` on a local disk, recorded there on an object
    store; returns what the log line says about it."""
    target = workdir.damaged / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not workdir.on_object_store:
        (workdir.path(Workdir.CHECKPOINTS) / str(step)).rename(target)
        return f"moved to {target}"
    record = target.with_name(f"{target.name}.json")
    record.write_text(json.dumps(dict(step=step, reason=reason, time=time.time())))
    return (
        f"recorded as damaged in {record} (kept in place; skipped from now on, and replaced "
        "when the run saves that step again)"
    )


def newest_good(
    mngr: ocp.CheckpointManager,
    workdir: Workdir,
    *,
    set_bad_aside: bool,
    quiet: bool = False,
    **abstract: Any,
) -> tuple[int, dict | None]:
    """(step, restored) of the newest checkpoint that verifies, or (0, None) if none.
    Each bad one on the way is reported in one line (by process 0) and, with
    ``set_bad_aside``, set aside (``set_aside``); steps recorded damaged before are
    skipped. ``quiet``: no line (a caller that only names the newest good step). Every
    process takes the same decisions."""
    recorded = damaged_steps(workdir)
    steps = sorted(mngr.all_steps(), reverse=True)
    changed = False
    try:
        for step in steps:
            if step in recorded:
                if not quiet:
                    _log_once(
                        "checkpoint step %d was recorded as damaged (%s); skipped",
                        step,
                        recorded[step],
                    )
                continue
            try:
                return step, restore_verified(mngr, step, **abstract)
            except ArchitectureMismatch:
                raise
            except CheckpointError as e:
                where = ""
                if set_bad_aside:
                    where = distributed.on_process_0(
                        f"set-aside-{step}", lambda e=e, step=step: set_aside(workdir, step, str(e))
                    )
                    where, changed = f"; {where}" if where else "", True
                if not quiet:
                    _log_once("%s%s; falling back to the checkpoint before it", e, where)
    finally:
        if changed:
            mngr.reload()
    if steps:
        raise CheckpointError(
            f"no checkpoint of {workdir.checkpoints} verifies (steps {sorted(steps)}; see "
            "the lines above). Start a new run in another workdir, or restore the files."
        )
    return 0, None


def _log_once(message: str, *args) -> None:
    """A warning from process 0 only: every process reaches the same verdict."""
    if jax.process_index() == 0:
        log.warning(message, *args)


def step_to_restore(mngr: ocp.CheckpointManager, workdir: Workdir, step: int | None) -> int:
    """The requested step, or the latest; a CheckpointError naming what exists otherwise."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {workdir.checkpoints}: train first with "
            f"`python train.py --config ... --workdir {workdir}`, or pass the workdir of a run."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint of step {step} in {workdir.checkpoints}; available steps: {steps}."
        )
    return step


def restore_for_evaluation(workdir: Workdir, model: Any, step: int | None) -> tuple[int, dict]:
    """(step, restored items "model" and "meta") of a checkpoint to evaluate, verified:
    the newest that verifies when ``step`` is None, else ``step`` (refused naming the
    newest good one if it does not verify, or its architecture is not ``model``'s). The
    optimizer state is never read; nothing in the workdir is moved or written. The caller
    (``trainer.restore``) has refused a workdir that is a file."""
    mngr = manager(workdir, read_only=True)
    requested = step_to_restore(mngr, workdir, step)
    if step is None:
        return newest_good(mngr, workdir, set_bad_aside=False, model=model)
    check_architecture(mngr, requested, model, "this config")
    try:
        return requested, restore_verified(mngr, requested, model=model)
    except CheckpointError as e:
        good, _ = newest_good(mngr, workdir, set_bad_aside=False, quiet=True, model=model)
        raise CheckpointError(
            f"{e}; not evaluating it. The newest checkpoint that verifies is step {good}."
        ) from None
