"""The one registry every extension point uses (models, attention implementations,
datasets, augmentations, the ResNet's spatial layers, cost rules), with one rule for a
second registration under a taken name.

A config file that registers something is imported afresh each time it is loaded (by
``train.py``, then by ``report --results`` once per run, ...), so each load makes a new
function object. Registering the *same definition* again (same source file and qualified
name) replaces the old one; another definition under a taken name is an error.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
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


def _place(obj: Any) -> str:
    source, name = definition(obj)
    return f"{name} in {source or '?'}"


class Registry(dict):
    """name -> what was registered, as a dict. ``add`` keeps the rule: the same definition
    again (same source file and qualified name) replaces the old object; another one under
    a taken or ``reserved`` name is refused, naming both places. ``defined_by(value)``:
    the function or class whose definition identifies a registered value."""

    def __init__(
        self,
        kind: str,
        initial: dict | None = None,
        *,
        defined_by: Callable[[Any], Any] = lambda value: value,
        reserved: tuple[str, ...] = (),
    ):
        super().__init__(initial or {})
        self.kind, self.defined_by, self.reserved = kind, defined_by, reserved

    def add(self, name: Any, value: Any) -> Any:
        label = name.__name__ if isinstance(name, type) else repr(name)
        if name in self.reserved:
            raise ValueError(f"{self.kind} {label} is reserved; choose another name.")
        existing = self.get(name)
        new = self.defined_by(value)
        if existing is not None and not same_definition(self.defined_by(existing), new):
            raise ValueError(
                f"{self.kind} {label} is already registered by {_place(self.defined_by(existing))};"
                f" {_place(new)} is another definition: choose another name."
            )
        self[name] = value
        return value
