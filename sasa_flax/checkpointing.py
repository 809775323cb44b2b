"""Everything orbax, in one place.

A checkpoint of step N lives in ``workdir/checkpoints/N`` and holds three items:
  ``model``: parameters, batch statistics and the parameter EMA (all eval needs);
  ``train``: optimizer state and step (only training needs them);
  ``meta``: JSON: where the data iterator stands and what it was trained with.
Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed, and ``CheckpointManager`` saves
asynchronously: training continues while the arrays are written.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from sasa_flax.errors import UserError

# orbax warns "Given directory is read only" whenever a read-only manager opens a workdir,
# i.e. on every evaluation, which is exactly what eval.py asks for.
logging.getLogger("absl").addFilter(
    lambda record: "Given directory is read only" not in record.getMessage()
)

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for; the message says what exists."""


def checkpoint_dir(workdir: str) -> str:
    """workdir/checkpoints, for local paths and gs:// alike."""
    return f"{workdir.rstrip('/')}/{CHECKPOINT_DIR}"


def manager(
    workdir: str, *, every_steps: int = 1, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager for workdir (local path or gs://)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else every_steps,
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        # A write killed half-way leaves a ``N.orbax-checkpoint-tmp-*`` directory, never
        # listed as a step; the next training run deletes it.
        cleanup_tmp_directories=not read_only,
    )
    # Handlers named up front, so that a read-only manager can read item metadata.
    handlers = dict(
        model=ocp.StandardCheckpointHandler(),
        train=ocp.StandardCheckpointHandler(),
        meta=ocp.JsonCheckpointHandler(),
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    model: Any,
    train: Any,
    meta: dict,
    force: bool = False,
) -> bool:
    """Starts an asynchronous save of step (if due, or ``force``); True if one started."""
    return mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def restore(
    mngr: ocp.CheckpointManager, step: int, *, model: Any, train: Any | None = None
) -> dict[str, Any]:
    """Restores ``model`` (and ``train`` unless None) into the given abstract trees
    (``jax.ShapeDtypeStruct`` with shardings), plus ``meta``."""
    items = dict(model=ocp.args.StandardRestore(model), meta=ocp.args.JsonRestore())
    if train is not None:
        items["train"] = ocp.args.StandardRestore(train)
    return dict(mngr.restore(step, args=ocp.args.Composite(**items)))


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in leaves
    }


def check_architecture(mngr: ocp.CheckpointManager, step: int, model: Any, what: str) -> None:
    """Raises CheckpointError naming the parameters where checkpoint ``step``'s model item
    and the abstract ``model`` tree differ (missing, unexpected, or of another shape).
    Reads metadata only, before anything is restored or compiled."""
    saved = _shapes_by_path(mngr.item_metadata(step)["model"])
    wanted = _shapes_by_path(model)
    problems = [f"{p}: in the config's model but not in the checkpoint" for p in wanted
                if p not in saved]  # fmt: skip
    problems += [f"{p}: in the checkpoint but not in the config's model" for p in saved
                 if p not in wanted]  # fmt: skip
    problems += [
        f"{p}: shape {saved[p]} in the checkpoint, {wanted[p]} in the config's model"
        for p in wanted
        if p in saved and saved[p] != wanted[p]
    ]
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(
            f"the checkpoint of step {step} does not match the model of {what} "
            f"({len(problems)} differences):\n  {shown}{more}\n"
            "Pass the config (and config arguments) the run was trained with."
        )


def step_to_restore(mngr: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    """The requested step, or the latest; a CheckpointError naming what exists otherwise."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
            f"`python train.py --config ... --workdir {workdir}`, or pass the workdir of a run."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint of step {step} in {checkpoint_dir(workdir)}; available steps: {steps}."
        )
    return step
