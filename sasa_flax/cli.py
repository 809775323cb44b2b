"""What train.py and eval.py do before and around their work."""

from __future__ import annotations

import contextlib
import sys

from absl import app, logging

from sasa_flax import distributed
from sasa_flax.errors import UserError


def start(argv, distributed_mode: str) -> None:
    """Rejects stray arguments, joins the other hosts if any, quiets absl's INFO logging
    (orbax logs every file it writes; progress lines have their own logger)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.maybe_initialize(distributed_mode)
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def user_errors():
    """A UserError ends the program with its message alone, no traceback."""
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}")
