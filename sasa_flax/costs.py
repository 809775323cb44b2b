"""Paper-convention parameter and FLOP counts, layer by layer, for any model.

Convention (the paper's footnote): a multiply-add is 2 FLOPs; one image. Not counted:
BatchNorm, activations, softmax, masking, pooling, residual additions and biases' adds.

Each layer type that has a count registers a rule beside its own definition
(``SelfAttention2D`` and ``AttentionStem`` in ``sasa_flax/layers/``; flax's ``nnx.Conv``,
``nnx.BatchNorm`` and ``nnx.Linear`` here). ``trace`` runs an abstract forward pass of a
model (nothing is computed or compiled) in which every module with a rule reports its
cost at the shape it is called with; modules that own parameters but have no rule are
listed, so a report can say what it could not count.

A rule is ``rule(module, in_shape, *, in_image_taps_only) -> (params, flops, out_shape)``
with ``out_shape`` ``None`` where running the module itself is cheap (its own output is
then used); ``flops`` are per image. A ruled module's submodules are not counted again.

For a model at an image size: ``report`` (counted layers and the uncounted ones) and
``count`` (parameters, FLOPs); this module imports no model and no config (a config's
model is ``config_lib.validate``'s). Parameters are counted exactly and equal the
model's (a test checks every shipped config): BatchNorm scale and bias count, running
statistics do not; the attention stem's mixture weights p(a, b, m) are computed once per
block position and not counted as FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax.registries import Registry


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    flops: int
    in_shape: tuple[int, ...] = ()  # the input the module was called with


_RULES: Registry = Registry("cost rule for")


def register_cost(module_type: type):
    """Decorator: ``rule`` counts ``module_type`` (and its subclasses without a rule)."""

    def register(rule):
        return _RULES.add(module_type, rule)

    return register


def rule_for(module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


# --- closed forms shared by the rules -------------------------------------------------


def conv_taps(n: int, k: int, stride: int, pad_low: int, pad_high: int, in_image_only: bool):
    """Σ over the output positions of the kernel taps counted along one axis; with
    ``in_image_only`` the taps on zero padding are skipped (XLA's cost-analysis
    convention, used to cross-check these formulas)."""
    outputs = (n + pad_low + pad_high - k) // stride + 1
    if not in_image_only:
        return outputs * k
    return sum(
        min(o * stride - pad_low + k, n) - max(o * stride - pad_low, 0) for o in range(outputs)
    )


def conv(
    name: str,
    k: int,
    c_in: int,
    c_out: int,
    in_size: int,
    stride: int = 1,
    pad: int = 0,
    in_image_taps_only: bool = False,
) -> LayerCost:
    """A bias-free k×k convolution of a square in_size² input, padded by ``pad``."""
    taps = conv_taps(in_size, k, stride, pad, pad, in_image_taps_only)
    return LayerCost(name, k * k * c_in * c_out, 2 * c_in * c_out * taps * taps)


def _padding(padding, n: int, k: int, stride: int) -> tuple[int, int]:
    """(low, high) zero padding of one axis, for flax's padding argument."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return 0, 0
        if padding.upper() == "SAME":
            out = -(-n // stride)
            total = max((out - 1) * stride + k - n, 0)
            return total // 2, total - total // 2
        raise ValueError(f"cannot count a convolution with padding={padding!r}")
    return tuple(padding)


@register_cost(nnx.Conv)
def _conv_rule(module: nnx.Conv, in_shape, *, in_image_taps_only: bool):
    kernel = tuple(module.kernel_size)
    strides = module.strides if isinstance(module.strides, Sequence) else (module.strides,) * 2
    pads = module.padding
    if not isinstance(pads, str) and isinstance(pads[0], int):
        pads = [(p, p) for p in pads]
    taps = 1
    for axis, (n, k, s) in enumerate(zip(in_shape[1:-1], kernel, strides, strict=True)):
        low, high = _padding(pads if isinstance(pads, str) else pads[axis], n, k, s)
        taps *= conv_taps(n, k, s, low, high, in_image_taps_only)
    groups = module.feature_group_count
    weights = module.in_features * module.out_features // groups
    params = weights * math.prod(kernel) + module.out_features * module.use_bias
    return params, 2 * weights * taps, None


@register_cost(nnx.BatchNorm)
def _batch_norm_rule(module: nnx.BatchNorm, in_shape, *, in_image_taps_only: bool):
    del in_shape, in_image_taps_only
    return module.num_features * (int(module.use_scale) + int(module.use_bias)), 0, None


@register_cost(nnx.Linear)
def _linear_rule(module: nnx.Linear, in_shape, *, in_image_taps_only: bool):
    del in_image_taps_only
    positions = 1
    for n in in_shape[1:-1]:
        positions *= n
    weights = module.in_features * module.out_features
    return weights + module.out_features * module.use_bias, 2 * weights * positions, None


# --- the trace ------------------------------------------------------------------------


def _owns_parameters(module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


@contextlib.contextmanager
def _counting_calls(classes, on_call):
    """Replaces ``__call__`` of ``classes`` by ``on_call(original, module, x)`` for the
    duration; the originals are restored whatever happens."""
    originals = {cls: cls.__dict__["__call__"] for cls in classes if "__call__" in cls.__dict__}

    def patched(original):
        return lambda module, x, *a, **kw: on_call(original, module, x, *a, **kw)

    try:
        for cls, original in originals.items():
            cls.__call__ = patched(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def trace(
    model: nnx.Module, input_shape: Sequence[int], *, in_image_taps_only: bool = False
) -> tuple[list[LayerCost], list[str]]:
    """(costs in call order, paths of the parameter-owning modules that no rule counts)
    of one abstract forward pass of ``model`` on ``input_shape`` (batch 1), in eval mode.

    A module whose rule gives its output shape is not run at all (attention layers: their
    tracing is the expensive part); the others run as written on abstract values.
    """
    graphdef, state = nnx.split(model)
    costs: list[LayerCost] = []
    uncounted: list[str] = []

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_graph(module)}
        counted: list[str] = []
        inside_counted = [0]  # > 0 while a counted module runs: its parts are not recounted

        def on_call(original, layer, x, *args, **kwargs):
            rule = rule_for(layer)
            if rule is None or inside_counted[0] or id(layer) not in paths:
                return original(layer, x, *args, **kwargs)
            params, flops, out_shape = rule(layer, x.shape, in_image_taps_only=in_image_taps_only)
            path = paths[id(layer)]
            if path in counted:  # called again (weights shared): its parameters once
                params = 0
            costs.append(LayerCost(path or type(layer).__name__, params, flops, tuple(x.shape)))
            counted.append(path)
            if out_shape is not None:
                return jnp.zeros(out_shape, x.dtype)
            inside_counted[0] += 1
            try:
                return original(layer, x, *args, **kwargs)
            finally:
                inside_counted[0] -= 1

        ruled = {cls for m in _modules(module) for cls in type(m).__mro__ if cls in _RULES}
        with _counting_calls(ruled, on_call):
            module(x)
        for m in _modules(module):
            path = paths[id(m)]
            covered = any(path == c or path.startswith(c + "/") or not c for c in counted)
            if _owns_parameters(m) and not covered:
                uncounted.append(path or type(m).__name__)
        return jnp.zeros(())

    jax.eval_shape(forward, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return costs, uncounted


def _modules(module) -> list[nnx.Module]:
    return [m for _, m in nnx.iter_graph(module) if isinstance(m, nnx.Module)]


def total(costs: Sequence[LayerCost]) -> tuple[int, int]:
    """(parameters, FLOPs)."""
    return sum(c.params for c in costs), sum(c.flops for c in costs)


# --- a model at an image size ----------------------------------------------------------


def report(
    model: nnx.Module, image_size: int, *, in_image_taps_only: bool = False
) -> tuple[list[LayerCost], list[str]]:
    """(every counted layer of ``model`` on image_size² RGB images, named by its path in
    the model; paths of the parameter-owning layers no rule counts). ``model`` may be
    abstract (``config_lib.validate`` returns the config's). ``in_image_taps_only`` skips
    the convolution taps that fall on zero padding, as XLA's cost analysis does (to
    cross-check these formulas)."""
    return trace(model, (1, image_size, image_size, 3), in_image_taps_only=in_image_taps_only)


def count(model: nnx.Module, image_size: int) -> tuple[int, int]:
    """(parameters, FLOPs) of ``model`` on image_size² RGB images."""
    return total(report(model, image_size)[0])
