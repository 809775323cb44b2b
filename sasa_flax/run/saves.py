"""The training loop's checkpoint saves (``checkpoints.py`` says what a checkpoint holds
and where): started asynchronously, watched at every step, a failure stopping the run at
the next step in one line."""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from sasa_flax.errors import UserError
from sasa_flax.run.checkpoints import _chain, _first_line, checksums
from sasa_flax.run.restoring import _mark_replaced, remove_partial_checkpoints
from sasa_flax.run.workdir import Workdir


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    model: Any,
    train: Any,
    meta: dict,
    damaged: dict[int, str] | None = None,
) -> bool:
    """Starts an asynchronous save of ``step``; the caller has decided it is due (the
    training loop: ``mngr.should_save`` or a stop or the last step). ``meta`` gets a
    checksum of every array (``verify`` checks them at restore). ``damaged``:
    ``damaged_steps``; a damaged step kept in place (object stores) is deleted first, and
    its record marked replaced, since orbax cannot overwrite a step."""
    if damaged and step in damaged and step in mngr.all_steps():
        mngr.delete(step)
        if jax.process_index() == 0:
            _mark_replaced(damaged.pop(step))
    meta = dict(meta, checksums=checksums(model=model, train=train))
    return mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,  # decided by the caller, not again by the manager's interval
    )


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a permission, the store); nothing
    of it is kept, and the run stops at once, naming it."""

    # After a failed asynchronous write orbax's background commit threads may wait for
    # ever (a server error on gs://): the program ends without waiting for them (``cli``).
    exit_without_waiting = True


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # unreachable


class Saves:
    """The training loop's checkpoint saves: each started asynchronously (``start``) and
    watched at every step (``poll``, which never waits), so that a save that failed in
    the background (a full disk) stops the run at the next step instead of at the next
    save, one interval later; ``finish`` waits for the last one.

    A failure raises ``SaveFailed``: one line naming the step, the folder, the cause and
    how much space a checkpoint needs, after removing what the failed save left (on a
    local disk; on an object store orbax never lists an uncommitted step and the next
    start deletes it)."""

    def __init__(self, mngr: ocp.CheckpointManager, workdir: Workdir, *items: Any):
        self.mngr, self.workdir = mngr, workdir
        self.needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(items))
        self.pending: int | None = None

    def start(self, step: int, **save_args: Any) -> None:
        """``save(mngr, step, **save_args)``; a previous save that failed raises first."""
        self.finish()
        try:
            save(self.mngr, step, **save_args)
        except Exception as e:  # noqa: BLE001 - orbax raises what the storage raised
            raise self._failure(step, e) from None
        self.pending = step

    def poll(self) -> None:
        """Raises ``SaveFailed`` if the save in flight has ended in failure; never waits."""
        if self.pending is not None and not self.mngr.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Waits for the save in flight, if any; raises ``SaveFailed`` if it failed."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failure(step, e) from None

    def _failure(self, step: int, error: BaseException) -> SaveFailed:
        full = any(
            "No space left" in str(e) or "os_error_code='28'" in str(e) for e in _chain(error)
        )
        cause = (
            "no space left on the device"
            if full
            else (f"{type(error).__name__}: {_first_line(error)}")
        )
        with contextlib.suppress(Exception):
            if jax.process_index() == 0:
                remove_partial_checkpoints(self.workdir, quiet=True)
        free = ""
        if not self.workdir.on_object_store:
            with contextlib.suppress(OSError):
                free = f", {_size(shutil.disk_usage(self.workdir.root).free)} free there now"
        with contextlib.suppress(Exception):
            self.mngr.reload()
        kept = [s for s in self.mngr.all_steps() if s != step]
        newest = (
            f"the newest complete checkpoint is step {max(kept)}"
            if kept
            else ("no checkpoint of this run is complete yet")
        )
        return SaveFailed(
            f"the checkpoint of step {step} could not be written to {self.workdir.checkpoints}"
            f" ({cause}); a checkpoint needs about {_size(self.needed)} (its arrays, before "
            f"compression){free}. Nothing of it was kept and {newest}: free space or fix the "
            "cause, then run the same command to resume."
        )
