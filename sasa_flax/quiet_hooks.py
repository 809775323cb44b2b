"""Process-wide quieting of orbax's failure aftermath, for the entry points only.

When a save fails (a full disk) or a damaged checkpoint fails to load, the trainer reports
it in one line; orbax's background threads and asyncio then log tracebacks of the same
error (and Python warns of its abandoned coroutines), and every evaluation triggers a
"read only" warning. ``install`` (called
by ``cli.start``, never at import) drops exactly those. ``SASA_FLAX_VERBOSE=1`` (the entry
points' ``--verbose``) keeps everything.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings


def _is_read_aftermath(exc: BaseException | None) -> bool:
    """The errors orbax's abandoned reads raise after a damaged checkpoint failed to load:
    already reported in one line by ``restore_verified``. Kept with SASA_FLAX_VERBOSE=1."""
    if os.environ.get("SASA_FLAX_VERBOSE"):
        return False
    text = str(exc)
    closed_loop = isinstance(exc, RuntimeError) and "Event loop is closed" in text
    return closed_loop or "Encountered error while reading array" in text


def _keep_log_record(record: logging.LogRecord) -> bool:
    """Drops what orbax and asyncio log around a failure the trainer reports in one line:

    - orbax's "Given directory is read only" warning, which every evaluation triggers
      (eval.py asks for exactly that);
    - the tracebacks orbax logs from each background thread when a write fails (a full
      disk) and asyncio's abandoned futures and tasks (a damaged checkpoint's reads): the
      same error is raised by the next save, wait or restore. Kept with SASA_FLAX_VERBOSE=1.
    """
    message = record.getMessage()
    if "Given directory is read only" in message:
        return False
    if os.environ.get("SASA_FLAX_VERBOSE") or record.levelno < logging.ERROR:
        return True
    from_orbax = "/orbax/" in (record.pathname or "")
    abandoned = record.name == "asyncio" or "never retrieved" in message
    return not (from_orbax or abandoned)


def _quiet_thread_excepthook(args, _default=threading.excepthook):
    tb = args.exc_traceback
    frames = [] if tb is None else [f.filename for f, _ in traceback.walk_tb(tb)]
    if os.environ.get("SASA_FLAX_VERBOSE") or not any("/orbax/" in f for f in frames):
        _default(args)


def install() -> None:
    """Process-wide: drops the aftermath of failures the trainer reports in one line
    (``_is_read_aftermath``, ``_keep_log_record``, orbax's thread tracebacks). Installed
    by the entry points (``cli.start``), never at import: a program that imports the
    library keeps its own logging and hooks. Idempotent."""
    if getattr(sys.excepthook, "_sasa_flax_quiet", False):
        return
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(info):
        if not _is_read_aftermath(info.exc_value):
            unraisable(info)

    def quiet_excepthook(kind, value, tb):
        if not _is_read_aftermath(value):
            excepthook(kind, value, tb)

    quiet_excepthook._sasa_flax_quiet = True
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    for name in ("absl", "asyncio", ""):
        logging.getLogger(name).addFilter(_keep_log_record)
    threading.excepthook = _quiet_thread_excepthook
    if not os.environ.get("SASA_FLAX_VERBOSE"):
        # orbax's reads abandoned after a damaged checkpoint failed to load: their
        # coroutines are collected unawaited (already reported in one line).
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
