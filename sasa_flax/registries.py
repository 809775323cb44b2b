"""What the registries (models, attention implementations) share: when a second
registration under a taken name is the same definition.

A config file that registers something is imported afresh each time it is loaded (by
``train.py``, then by ``report --results`` once per run, ...), so each load makes a new
function object. Registering the *same definition* again (same source file and qualified
name) replaces the old one; another definition under a taken name is an error.
"""

from __future__ import annotations

import inspect
import os
from typing import Any


def definition(obj: Any) -> tuple[str, str]:
    """(source file, qualified name) of a function or class. A class's file is read from
    its methods' code: ``inspect.getsourcefile`` looks a class up in ``sys.modules``, where
    a config file's module is not."""
    code = getattr(obj, "__code__", None)
    if code is None and inspect.isclass(obj):
        methods = [v for v in vars(obj).values() if inspect.isfunction(v)]
        code = methods[0].__code__ if methods else None
    if code is not None:
        source = code.co_filename
    else:
        try:
            source = inspect.getsourcefile(obj) or ""
        except TypeError:
            source = ""
    return os.path.realpath(source) if source else "", getattr(obj, "__qualname__", repr(obj))


def same_definition(a: Any, b: Any) -> bool:
    return a is b or definition(a) == definition(b)
