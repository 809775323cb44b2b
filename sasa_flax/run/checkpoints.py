"""Everything orbax, in one place. Every function takes the run's ``Workdir`` (or a path).

A checkpoint of step N lives in ``workdir/checkpoints/N`` and holds three items:
  ``model``: parameters, batch statistics and the parameter EMA (all eval needs);
  ``train``: optimizer state and step (only training needs them);
  ``meta``: JSON: where the data iterator stands and what it was trained with.
``CheckpointManager`` saves asynchronously: training continues while the arrays are
written. A half-written checkpoint is never listed as a step; how that is ensured, and
what housekeeping it needs, depends on the filesystem:

- **Local disks** (and any filesystem with an atomic rename): orbax writes step N into
  ``N.orbax-checkpoint-tmp-*`` and renames it when complete. A killed save leaves that
  temporary directory; ``remove_partial_checkpoints`` deletes it before the next run
  writes anything (it may be what filled the disk). A damaged checkpoint is moved aside
  into ``damaged_checkpoints/`` by one rename, never deleted.
- **Object stores** (gs://), where a "rename" is a copy and a delete per object, neither
  cheap nor atomic: orbax writes ``checkpoints/N/`` in place and marks it complete with
  ``commit_success.txt``; a step without it is not listed, and the manager deletes it
  itself when it starts (``cleanup_tmp_directories``). A damaged checkpoint is not
  copied: it is *recorded* in ``damaged_checkpoints/N-<time>.json`` (what failed, when), skipped
  by every later restore and evaluation, and deleted only when the run saves step N
  again (orbax cannot overwrite a step), which supersedes it. The record says so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sasa_flax.errors import UserError
from sasa_flax.run import distributed
from sasa_flax.run.workdir import Workdir

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for; the message says what exists."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint of another model than the config's: never a reason to fall back."""


class CheckpointUnreadable(UserError):
    """A checkpoint could not be read for a reason outside its bytes (a path, a
    permission, a module, the machine's memory): never a reason to set it aside or to
    fall back to an older one, since every checkpoint of the run would meet the same."""


# Errors about the reader's environment, whichever checkpoint it reads.
_ENVIRONMENT_ERRORS = (ImportError, MemoryError, PermissionError)
# The storage layer's (tensorstore's) reports about bytes it read: a referenced file or
# key missing, a byte range past a file's end, content that does not decode ("ZSTD_
# decompressStream() failed: Data corruption detected" comes as FAILED_PRECONDITION, a
# code GCS's 412 shares, so the words decide, not the code).
_DATA_LOSS = re.compile(
    r"\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE)\b|[Cc]orrupt|Error decoding|decompress\w*\(\) failed"
)
# The JSON files orbax writes into a step (by name), and the items every checkpoint has.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata")
_ITEMS = ("model", "meta")


def _first_line(error: BaseException) -> str:
    text = next((line for line in str(error).splitlines() if line.strip()), "")
    return text.split(" See full TensorStore details")[0][:300] or type(error).__name__


def _chain(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _files(step_dir: epath.Path) -> list[epath.Path]:
    found, pending = [], [step_dir]
    while pending:
        for path in pending.pop().iterdir():
            (pending if path.is_dir() else found).append(path)
    return found


def _damage_in_files(step_dir: epath.Path) -> str | None:
    """Reads every file of a step once, as bytes: a fault found in them (an item
    missing, a JSON file of orbax's that does not parse), or None. An ``OSError`` (a file
    that cannot be listed or read) is the reader's environment, not damage: raised."""
    files = _files(step_dir)
    items = {p.relative_to(step_dir).parts[0] for p in files}
    damage = None
    for path in files:
        data = path.read_bytes()  # every file, so that an unreadable one raises here
        if damage is None and path.name in _JSON_FILES:
            try:
                json.loads(data)
            except ValueError:
                damage = f"{path.relative_to(step_dir)} is not valid JSON"
    missing = [item for item in _ITEMS if item not in items]
    return f"its {' and '.join(missing)} item is missing" if missing else damage


def read_failure(mngr: ocp.CheckpointManager, step: int, error: BaseException) -> UserError:
    """What a failed read of checkpoint ``step`` means, decided by what was read:

    - ``CheckpointUnreadable`` (nothing is set aside: every checkpoint would fail alike)
      when the reader's environment failed: a file of the step cannot be listed or read
      as bytes (a wrong path, a permission, an I/O error), or Python could not import a
      module or allocate memory;
    - ``CheckpointError`` (damaged) when a fault is found in the bytes: an item missing,
      a metadata file that does not parse, or the storage layer reporting that what it
      read is missing, short or undecodable (tensorstore's NOT_FOUND, OUT_OF_RANGE,
      DATA_LOSS, a decompression or decoding failure);
    - ``CheckpointUnreadable`` otherwise: the files are complete and read, and the
      failure is the reader's (e.g. orbax refusing a path), not the checkpoint's."""
    summary = f"{type(error).__name__}: {_first_line(error)}"
    environment = next((e for e in _chain(error) if isinstance(e, _ENVIRONMENT_ERRORS)), None)
    step_dir = epath.Path(mngr.directory) / str(step)
    if environment is not None:
        cause = f"a {type(environment).__name__} in this environment"
    else:
        try:
            damage = _damage_in_files(step_dir)
        except OSError as e:
            cause = f"its files cannot be read ({e})"
        else:
            if damage is None and any(_DATA_LOSS.search(str(e)) for e in _chain(error)):
                damage = "the storage layer found its data missing, short or undecodable"
            if damage is not None:
                return CheckpointError(f"checkpoint step {step} is damaged: {damage} ({summary})")
            cause = "its files are complete and read, so the reader failed, not the checkpoint"
    return CheckpointUnreadable(
        f"checkpoint step {step} could not be read ({summary}); {cause}. Nothing was set "
        "aside or skipped: fix that and run the same command again."
    )


def remove_partial_checkpoints(workdir: Workdir | str, *, quiet: bool = False) -> list[str]:
    """Deletes the ``N.orbax-checkpoint-tmp-*`` directories a killed or failed save left
    on a local disk (never a complete checkpoint); returns their paths. Run before
    anything else is written. On object stores there are none: orbax's manager removes
    uncommitted steps itself (module docstring). ``quiet``: no log line (the caller
    reports the failure that left them)."""
    workdir = Workdir.of(workdir)
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


def manager(
    workdir: Workdir | str,
    *,
    every_steps: int = 1,
    keep: int | None = None,
    read_only: bool = False,
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
    checkpoints = Workdir.of(workdir).checkpoints
    return ocp.CheckpointManager(checkpoints, options=options, item_handlers=handlers)


@jax.jit
def _checksums(tree) -> Any:
    """One uint32 per array, computed where the array lives (no host copy): the sum of
    its bits, each word weighted by a multiplicative hash of its position, modulo 2^32.
    A flipped byte, a swapped or a zeroed block changes it."""

    def checksum(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
        position = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761)
        return jnp.sum(words * (position | jnp.uint32(1)), dtype=jnp.uint32)

    return jax.tree.map(checksum, tree)


def checksums(**items: Any) -> dict[str, int]:
    """{"item/path/to/array": checksum} of every array of ``items``."""
    sums = jax.device_get(_checksums(items))
    return {path: int(value) for path, value in _by_path(sums).items()}


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


def restore(
    mngr: ocp.CheckpointManager, step: int, *, model: Any, train: Any | None = None
) -> dict[str, Any]:
    """Restores ``model`` (and ``train`` unless None) into the given abstract trees
    (``jax.ShapeDtypeStruct`` with shardings), plus ``meta``."""
    items = dict(model=ocp.args.StandardRestore(model), meta=ocp.args.JsonRestore())
    if train is not None:
        items["train"] = ocp.args.StandardRestore(train)
    return dict(mngr.restore(step, args=ocp.args.Composite(**items)))


def _by_path(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in leaves
    }


def _shapes_by_path(tree) -> dict[str, tuple]:
    return {path: tuple(leaf.shape) for path, leaf in _by_path(tree).items()}


@jax.jit
def _all_finite(tree) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def verify(step: int, restored: dict) -> None:
    """Raises CheckpointError naming what is wrong with restored checkpoint ``step``: an
    array whose checksum differs from the one recorded at save (damaged on disk), or
    non-finite parameters. One device-to-host transfer for each of the two checks."""
    recorded = (restored.get("meta") or {}).get("checksums")
    items = {k: v for k, v in restored.items() if k in ("model", "train")}
    if recorded:  # checkpoints written before checksums existed have none
        now = checksums(**items)
        bad = [path for path, value in now.items() if recorded.get(path) != value]
        if bad:
            raise CheckpointError(
                f"checkpoint step {step} is damaged: {len(bad)} array(s) fail their checksum "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
            )
    floating = {
        path: leaf
        for path, leaf in _by_path(items.get("model", {})).items()
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    finite = jax.device_get(_all_finite(floating))
    bad = [path for path, ok in finite.items() if not ok]
    if bad:
        raise CheckpointError(f"checkpoint step {step} holds non-finite values in {bad[0]}")


_attempts = itertools.count()  # the same sequence on every process: unique agreement keys


def restore_verified(mngr: ocp.CheckpointManager, step: int, **abstract: Any) -> dict:
    """``check_architecture``, ``restore`` then ``verify``: a checkpoint that cannot be
    read, lacks an item, or fails its checks raises one CheckpointError naming the step
    and what is wrong, on every process alike (a read that fails on one host fails all:
    otherwise the others would go on and wait in the next collective)."""

    def read() -> dict:
        check_architecture(mngr, step, abstract["model"], "this config")
        try:
            restored = restore(mngr, step, **abstract)
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
            raise read_failure(mngr, step, e) from None
        if not isinstance(restored.get("meta"), dict):
            raise CheckpointError(f"checkpoint step {step} lacks its meta item")
        return restored

    restored = distributed.everywhere(f"restore-{step}-{next(_attempts)}", read)
    verify(step, restored)
    return restored


def damaged_steps(workdir: Workdir | str) -> dict[int, str]:
    """{step: record path} of the damaged checkpoints recorded in place (object stores)
    and not yet replaced by a new save of their step."""
    workdir = Workdir.of(workdir)
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
    workdir: Workdir | str,
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
    workdir = Workdir.of(workdir)
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


def check_architecture(mngr: ocp.CheckpointManager, step: int, model: Any, what: str) -> None:
    """Raises CheckpointError naming the parameters where checkpoint ``step``'s model item
    and the abstract ``model`` tree differ (missing, unexpected, or of another shape).
    Reads metadata only, before anything is restored or compiled."""
    try:
        saved = _shapes_by_path(mngr.item_metadata(step)["model"])
    except Exception as e:  # noqa: BLE001 - a damaged or incomplete step, or the reader
        raise read_failure(mngr, step, e) from None
    wanted = _shapes_by_path(model)
    problems = [
        f"{p}: in the config's model but not in the checkpoint" for p in wanted if p not in saved
    ]
    problems += [
        f"{p}: in the checkpoint but not in the config's model" for p in saved if p not in wanted
    ]
    problems += [
        f"{p}: shape {saved[p]} in the checkpoint, {wanted[p]} in the config's model"
        for p in wanted
        if p in saved and saved[p] != wanted[p]
    ]
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ArchitectureMismatch(
            f"the checkpoint of step {step} does not match the model of {what} "
            f"({len(problems)} differences):\n  {shown}{more}\n"
            "Pass the config (and config arguments) the run was trained with."
        )


def step_to_restore(mngr: ocp.CheckpointManager, workdir: Workdir | str, step: int | None) -> int:
    """The requested step, or the latest; a CheckpointError naming what exists otherwise."""
    workdir = Workdir.of(workdir)
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
    optimizer state is never read; nothing in the workdir is moved or written."""
    workdir.check_not_a_file()
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
