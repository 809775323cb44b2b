"""The base of every error meant for a person: bad config, data, devices or workdir."""

from __future__ import annotations

import dataclasses
from typing import Any


class UserError(ValueError):
    """Raised before anything is compiled or written; the message names what to change.

    Entry points print the message alone (no traceback) and exit non-zero.
    """


class TrainError(UserError):
    """The run cannot start as configured; the message says why and what to change."""


class ImplementationError(UserError):
    """An attention implementation that cannot run here (a kernel the device's compiler
    refused, no tile that fits its memory, a mesh it cannot split over). The message says
    it in the library's words, naming another as ``impl='shifted'``; a program translates
    that into its own option (the trainer: ``--config.model.attention_impl=shifted``)."""


class ArgumentError(UserError):
    """One constructor or function argument that cannot work.

    Each rule is checked once, where the argument is used (an op, a layer's options, a
    model's constructor); the same error then reads right in both places it reaches:

        str(error)                    "kernel_size must be a positive odd integer ...; got 4."
        error.as_field("config.model.")  "config.model.kernel_size=4: must be a positive ..."

    ``requirement`` starts with a verb phrase ("must be ...", "gives ...") and may name the
    place it applies to as ``{where}``, filled by ``at`` ("group 2") or "this layer".
    """

    def __init__(self, argument: str, value: Any, requirement: str, where: str = "this layer"):
        self.argument, self.value, self.requirement, self.where = (
            argument,
            value,
            requirement,
            where,
        )
        super().__init__(f"{argument} {self._text()}; got {value!r}.")

    def _text(self) -> str:
        return self.requirement.replace("{where}", self.where)

    def as_field(self, prefix: str) -> str:
        """The message as a config field's: ``{prefix}{argument}={value!r}: {requirement}``."""
        return f"{prefix}{self.argument}={self.value!r}: {self._text()}"

    def at(self, where: str) -> ArgumentError:
        """The same error, located (``"group 2"``)."""
        return ArgumentError(self.argument, self.value, self.requirement, where)

    def renamed(self, argument: str) -> ArgumentError:
        """The same error under the name its caller knows the argument by."""
        return ArgumentError(argument, self.value, self.requirement, self.where)


def check_one_of(argument: str, value: Any, choices) -> None:
    """Raises ArgumentError unless ``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise ArgumentError(argument, value, f"must be one of {tuple(choices)}")


def check_options(options) -> None:
    """Type-checks a frozen options dataclass field by field (bool, int, float, str fields),
    naming the field."""
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        kind = {"bool": bool, "int": int, "float": (int, float), "str": str}.get(str(field.type))
        if kind is None:
            continue
        wrong_bool = isinstance(value, bool) and kind is not bool
        if wrong_bool or not isinstance(value, kind):
            name = field.type if isinstance(field.type, str) else field.type.__name__
            raise ArgumentError(field.name, value, f"must be a {name}")
