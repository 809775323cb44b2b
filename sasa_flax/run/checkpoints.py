"""Everything orbax, in one place. Every function takes the run's ``Workdir`` (or a path).

A checkpoint of step N lives in ``workdir/checkpoints/N`` and holds three items:
  ``model``: parameters, batch statistics and the parameter EMA (all eval needs);
  ``train``: optimizer state and step (only training needs them);
  ``meta``: JSON: where the data iterator stands and what it was trained with.
``CheckpointManager`` saves asynchronously: training continues while the arrays are
written (``saves.py``: the loop's saves, a failed one stopping the run). Which step to
restore, and what happens to damaged ones, is ``restoring.py``'s. A half-written
checkpoint is never listed as a step; how that is ensured, and
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

import itertools
import json
import logging
import re
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


def manager(
    workdir: Workdir,
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
    checkpoints = workdir.checkpoints
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
