"""Where the library's log lines go: set up by the program that runs, never at import.

Every module logs to ``logging.getLogger(__name__)``, below the ``sasa_flax`` logger. The
commands (``train.py``, ``eval.py``, ``visualize``) call ``show_progress`` from
``cli.start``: one handler on ``sasa_flax`` that writes INFO and above to stderr as
``HH:MM:SS message``, whatever absl's verbosity (orbax logs every file it writes at INFO),
and stops them reaching the root logger twice. ``train_and_evaluate`` and
``evaluate_checkpoint`` call it too, so that progress shows in a notebook; it does
nothing where the program has already configured logging (a handler on ``sasa_flax`` or
on the root logger: then the lines go there).
"""

from __future__ import annotations

import logging
import sys

ROOT = "sasa_flax"


def show_progress(*, force: bool = False) -> None:
    """Progress lines to stderr: always for the commands (``force``, from ``cli.start``);
    from library calls only where the program has not configured logging itself (a
    handler on ``sasa_flax``, or on the root logger other than absl's): then the lines go
    there, at INFO."""
    logger = logging.getLogger(ROOT)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if any(isinstance(h, _ProgressHandler) for h in logger.handlers):
        return
    others = [h for h in logging.getLogger().handlers if type(h).__name__ != "ABSLHandler"]
    if not force and (logger.handlers or others):
        return
    handler = _ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False  # not again through absl's handler on the root logger


class _ProgressHandler(logging.StreamHandler):
    """The handler ``show_progress`` installs (recognised so it is installed once)."""
