"""Models by name: ``config.model.name`` picks one, the rest of ``config.model`` are its
keyword arguments.

A model is a class or factory registered under a name::

    from sasa_flax import models

    @models.register("tiny_vit")
    class TinyViT(nnx.Module):
        def __init__(self, *, depth=4, num_classes=10, dropout=0.1, dtype=None, rngs): ...
        def __call__(self, images): ...   # (B, H, W, 3) -> (B, num_classes) logits

Its keyword arguments (with defaults) are the fields of ``config.model``; it must also
take ``rngs`` (``nnx.Rngs``) and ``dtype`` (the compute dtype, or None). It validates its
own arguments, raising ``sasa_flax.errors.ArgumentError`` naming the argument, which
the config check reports as ``config.model.<argument>``. Optional methods the trainer and
the report use when present:

- ``check_image_size(height, width)``: raise ``ArgumentError("image_size", ...)`` for a
  size the model cannot take (checked before anything is compiled);
- ``decay_mask(params) -> pytree of bool``: which parameters get weight decay (default:
  every parameter with ndim > 1, see ``trainer.default_decay_mask``);
- ``describe(platform, image_size) -> list[str]``: lines the trainer and eval.py log once
  per run, e.g. which kernels the model's layers run on ``platform`` ("cpu", "tpu",
  "cuda", "rocm"); ResNet's: "attention on tpu: 56×56 k=7 auto → pallas: 3 layers; ...".

Parameter and FLOP counts come from the layers' own rules (``sasa_flax.costs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from sasa_flax.errors import ArgumentError
from sasa_flax.registries import Registry

_MODELS: Registry = Registry("model")

# Constructor arguments that are not config fields.
NOT_FIELDS = ("rngs", "dtype", "param_dtype")


def register(name: str, *, implementation_fields: tuple[str, ...] = ()):
    """Decorator: registers a model class or factory as ``config.model.name = name``.

    ``implementation_fields``: the arguments that choose *how* the model is computed, not
    *what* (an exact kernel choice such as ``attention_impl``): a run may resume, and a
    checkpoint be evaluated, with other values (on another platform, say). Every other
    field defines the model: changing one on resume or at evaluation is refused
    (``trainer.resume``).

    Registering the same definition again (its file loaded a second time, e.g. as a
    config file) replaces it; another definition under a taken name is an error.
    """

    def decorate(factory):
        factory.implementation_fields = tuple(implementation_fields)
        return _MODELS.add(name, factory)

    return decorate


def implementation_fields(name: str) -> tuple[str, ...]:
    """The model's fields that do not change what it computes (``register``)."""
    return getattr(get(name), "implementation_fields", ())


def names() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def get(name: str) -> Callable[..., Any]:
    if name not in _MODELS:
        raise ArgumentError(
            "name",
            name,
            f"must name a registered model, one of {names()}; register a new one with "
            "@sasa_flax.models.register('name') in a module your config imports",
        )
    return _MODELS[name]


def arguments(name: str) -> dict[str, Any]:
    """The model's config fields and their defaults (its keyword arguments)."""
    factory = get(name)
    # A class's own __init__ (a metaclass __call__ would hide it from inspect.signature).
    signature = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
    fields = {}
    for parameter in signature.parameters.values():
        if parameter.name in (*NOT_FIELDS, "self") or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        if parameter.default is parameter.empty:
            raise TypeError(
                f"model {name!r}: argument {parameter.name!r} needs a default, so that a "
                "config lists it as a field."
            )
        fields[parameter.name] = parameter.default
    return fields


def build(name: str, fields: dict[str, Any], *, rngs, dtype=None):
    """``get(name)(**fields, dtype=dtype, rngs=rngs)``."""
    return get(name)(**fields, dtype=dtype, rngs=rngs)
