"""Paths as users type them: one rule for every local path a command takes."""

from __future__ import annotations

import os


def local_path_made_absolute(path: str) -> str:
    """``path`` with ``~`` expanded and made absolute against the current directory; a URL
    (``gs://bucket/x``, ``memory://x``) as given; "" stays "" (nothing was given).

    Applied where a path enters (the workdir, the data folders), because the shell expands
    nothing after ``--flag=`` and orbax and tensorstore refuse relative paths."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
