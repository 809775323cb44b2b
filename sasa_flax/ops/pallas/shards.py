"""Pallas calls in any program: each device runs the kernels on its own images and heads.

XLA cannot look inside a Pallas call. Left alone, a Mosaic call in a TPU program of several
chips does not compile ("Mosaic kernels cannot be automatically partitioned"), and on
several GPUs XLA all-gathers a Triton call's operands and runs it on the global batch on
every device. Local attention is independent per image and per head, so every kernel call
goes through ``per_group``, which runs it under ``jax.shard_map`` on each device's block
of (batch, heads), whatever program it is in:

1. Inside a ``shard_map`` over every mesh axis (a user's own data-parallel step, with
   ``check_vma`` on or off), or on one device: the arrays are already local; the kernels
   are called on them as they are.
2. Operands whose types carry their sharding (a mesh with Explicit axes, ``jax.make_mesh``'s
   default, with or without ``jax.set_mesh``): the split of batch and heads is read from
   the types, so batch-sharded (data parallel), heads-sharded (tensor parallel) and both
   run where they are. Any other sharded dimension is gathered first (``jax.sharding.reshard``).
3. Anything else (Auto axes: ``jax.jit`` with ``NamedSharding`` inputs on a mesh made with
   ``AxisType.Auto``, or our trainer): decided when the program is lowered, from the
   program's own mesh. The batch is split over the mesh axes that divide it, in mesh
   order; the heads over the axes left, where they divide the heads. A dimension that no
   axis divides stays whole: every device of that axis then computes the same groups
   (correct, not faster), e.g. 6 images on 8 devices. Under Auto axes the operands'
   own split is not known at that point: a heads-sharded operand is resharded to this
   split (use Explicit axes for tensor parallelism).

Why not ``jax.experimental.custom_partitioning``, which lets XLA's partitioner choose per
operand after propagation: libtpu does not implement the custom-call partitioner
extension, so a custom-partitioned call fails to compile on TPU ("Custom emitter for
CustomSPMDPartitioning not found"; jax-ml/jax#38196, reproduced by a deviceless libtpu
compile with jax 0.10.2). One mechanism serves TPU, GPU and the CPU tests alike.

The relative tables' gradient leaves the kernels as one partial sum per (image, head,
tile), a grouped output, and is summed outside the call: XLA reduces it across devices
once, like every other parameter's gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax.errors import ImplementationError


class KernelPlacementError(ImplementationError, NotImplementedError):
    """The kernels cannot be placed on the program's mesh as it is split."""


GROUP_DIMS = 2  # (batch, heads): the leading dimensions of a merged (GPU) operand


def per_group(
    kernel: Callable[..., Sequence[jax.Array | None]],
    grouped: Sequence[bool],
    *,
    heads_axis: int = 1,
    out_shapes: Callable[..., Sequence[jax.ShapeDtypeStruct | None]] | None = None,
    **options,
) -> Callable[..., tuple[jax.Array | None, ...]]:
    """``_per_group`` with the kernels' call protocol, Pallas' own: an operand may be None
    (absent: no keys, no tables), and ``kernel`` receives it as None; an output whose
    ``out_shapes`` entry is None is absent, and comes back as None. Both twins' kernels
    take their operands, specs and outputs so (``tpu._call``, ``gpu._call``)."""

    def call(*arrays):
        present = [i for i, x in enumerate(arrays) if x is not None]
        first = next(arrays[i] for i in present if grouped[i])
        wanted = None if out_shapes is None else out_shapes(first.shape[0], first.shape[heads_axis])
        live = None if wanted is None else [i for i, s in enumerate(wanted) if s is not None]

        def on_present(*given):
            full = [None] * len(arrays)
            for i, x in zip(present, given, strict=True):
                full[i] = x
            outputs = kernel(*full)
            return list(outputs) if live is None else [outputs[i] for i in live]

        def present_shapes(batch, heads):
            return [s for s in out_shapes(batch, heads) if s is not None]

        results = _per_group(
            on_present,
            [grouped[i] for i in present],
            heads_axis=heads_axis,
            out_shapes=None if out_shapes is None else present_shapes,
            **options,
        )(*(arrays[i] for i in present))
        if wanted is None:
            return tuple(results)
        results = iter(results)
        return tuple(next(results) if s is not None else None for s in wanted)

    return call


def _per_group(
    kernel: Callable[..., Sequence[jax.Array]],
    grouped: Sequence[bool],
    *,
    local_only: bool = False,
    heads_axis: int = 1,
    merge: bool = True,
    out_shapes: Callable[..., Sequence[jax.ShapeDtypeStruct]] | None = None,
) -> Callable[..., tuple[jax.Array, ...]]:
    """``kernel`` run on each device's block of (batch, heads) (module docstring).

    Args:
      kernel: ``kernel(*arrays) -> outputs``, a sequence of arrays. With ``merge`` it
        receives each grouped operand with its (batch, heads) dimensions merged into one
        of b·n groups (the GPU kernels' (G, ...) frames) and returns arrays whose first
        dimension is the same b·n groups; without, it receives and returns grouped arrays
        as they are (batch first, heads at ``heads_axis``). Every other operand whole.
      grouped: per operand, True when it is grouped: batch on axis 0, heads on
        ``heads_axis`` (1: (B, N, ...), the GPU frames; 2: (B, c, N, L), the TPU frames).
      local_only: call ``kernel`` on the arrays as they are, nothing split (Pallas' TPU
        interpreter, on one CPU device in the tests: it calls back into Python, which
        the split decided at lowering cannot hold).
      out_shapes: ``out_shapes(batch, heads)``, the shapes and dtypes of what ``kernel``
        returns for ``batch`` images and ``heads`` heads (with ``merge``: for batch·heads
        groups), so that the outputs are typed without tracing ``kernel``. Without it they
        are typed by ``jax.eval_shape`` of ``kernel``, which traces a Pallas kernel's body
        once more per call: seconds for an unrolled TPU kernel.

    Returns:
      ``f(*arrays)``: grouped operands as (B, N, ...), every output as (B, N, ...).
    """
    grouped = tuple(grouped)
    if not any(grouped):
        raise ValueError("per_group needs at least one grouped operand")
    if merge and heads_axis != 1:
        raise ValueError("merge needs the heads on axis 1")

    def local(*arrays):
        if not merge:
            return tuple(kernel(*arrays))
        batch, heads = _first_grouped(arrays, grouped).shape[:GROUP_DIMS]
        merged = [
            x.reshape(batch * heads, *x.shape[GROUP_DIMS:]) if g else x
            for x, g in zip(arrays, grouped, strict=True)
        ]
        return tuple(y.reshape(batch, heads, *y.shape[1:]) for y in kernel(*merged))

    def typed_outputs(*arrays):  # the outputs' global types, from the kernel's own shapes
        first = _first_grouped(arrays, grouped)
        batch, heads = first.shape[0], first.shape[heads_axis]
        if not merge:
            return out_shapes(batch, heads)
        return [
            jax.ShapeDtypeStruct((batch, heads, *y.shape[1:]), y.dtype)
            for y in out_shapes(batch, heads)
        ]

    def call(*arrays):
        if local_only:
            return local(*arrays)
        typed = jax.typeof(_first_grouped(arrays, grouped)).sharding
        if not _manual_axes(arrays) and _explicit(typed.mesh):
            spec = tuple(typed.spec) + (None,) * (heads_axis + 1)
            split = _grouped_spec(spec[0], spec[heads_axis], heads_axis)
            specs = _specs(grouped, split)
            # Types must equal in_specs: gather any other split dimension first.
            arrays = [
                jax.sharding.reshard(x, NamedSharding(typed.mesh, spec))
                for x, spec in zip(arrays, specs, strict=True)
            ]
            return _shard_mapped(local, typed.mesh, specs, split)(*arrays)
        # Inside a shard_map, or a split decided when the program is lowered.
        return tuple(
            _per_group_p.bind(
                *arrays,
                local=local,
                grouped=grouped,
                heads_axis=heads_axis,
                out_shapes=None if out_shapes is None else typed_outputs,
            )
        )

    return call


# One jitted program per kernel key: JAX traces a jitted function once per operand shapes
# and lowers each traced program once per module, so the layers of a stage (same frames,
# same config) share one trace of the kernel's body and one Mosaic / Triton lowering,
# instead of one per layer (seconds each for an unrolled TPU kernel on a host CPU).
_PROGRAMS: dict = {}
_PROGRAMS_KEPT = 128  # (config, kernel) pairs (SASA-R50 conv stem train step: 24); LRU


def device_program(key, build: Callable[[], Callable]) -> Callable:
    """``jax.jit(build())``, built once per hashable ``key`` (which must determine
    everything ``build`` closes over) and reused by every call with the same key."""
    program = _PROGRAMS.pop(key, None)
    if program is None:
        program = jax.jit(build())
    _PROGRAMS[key] = program  # most recently used last
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
        del _PROGRAMS[next(iter(_PROGRAMS))]
    return program


def forget_device_programs() -> None:
    """Drops every kept program: the next calls trace the kernels again. For a kernel
    edited or patched in a running process (a notebook, a test), like ``jax.clear_caches``
    for jitted functions."""
    _PROGRAMS.clear()


def _first_grouped(arrays, grouped):
    return next(x for x, g in zip(arrays, grouped, strict=True) if g)


def _explicit(mesh) -> bool:
    """Whether arrays on ``mesh`` carry their sharding in their types (Explicit axes)."""
    return not mesh.empty and mesh.size > 1 and jax.sharding.AxisType.Explicit in mesh.axis_types


def _manual_axes(arrays) -> bool:
    """Inside a shard_map: the mesh in context has manual axes, or an operand varies."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:
        return True
    return any(jax.typeof(x).manual_axis_type.varying for x in arrays)


def _grouped_spec(batch_entry, heads_entry, heads_axis: int) -> P:
    """How a grouped array is split: batch on axis 0, heads on ``heads_axis``."""
    return P(batch_entry, *(None,) * (heads_axis - 1), heads_entry)


def _specs(grouped, split: P) -> tuple[P, ...]:
    """Grouped operands split as ``split`` on (batch, heads) and whole along the rest;
    the other operands replicated."""
    return tuple(split if g else P() for g in grouped)


def _shard_mapped(local, mesh, specs, split: P):
    # check_vma=False: a pallas_call's outputs carry no varying-axes type here; every
    # output is split as ``split`` and the tables' partial sums are reduced outside.
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=split, check_vma=False)


def split_for(mesh, batch: int, heads: int) -> P:
    """The (batch, heads) split used where the operands' own split is unknown (Auto
    axes): the batch over the mesh axes of more than one device that divide it, in mesh
    order; then the heads over the axes left that divide them."""
    batch_axes, head_axes, batch_ways, head_ways = [], [], 1, 1
    for name, size in zip(mesh.axis_names, mesh.axis_sizes, strict=True):
        if size == 1:
            continue
        if batch % (batch_ways * size) == 0:
            batch_axes.append(name)
            batch_ways *= size
        elif heads % (head_ways * size) == 0:
            head_axes.append(name)
            head_ways *= size
    entry = lambda axes: tuple(axes) if axes else None  # noqa: E731
    return P(entry(batch_axes), entry(head_axes))


# ------------------------------------------------- decided when the program is lowered

_per_group_p = Primitive("sasa_per_group")
_per_group_p.multiple_results = True


@_per_group_p.def_abstract_eval
def _abstract_eval(*avals, local, grouped, heads_axis, out_shapes):
    """The kernels' outputs; inside a shard_map, varying over the operands' manual axes
    (the kernels are per-device computations, never differentiated themselves: they sit
    inside custom VJP rules, so these types sum or broadcast nothing)."""
    del grouped, heads_axis
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    like = max(avals, key=lambda a: len(a.manual_axis_type.varying))
    if out_shapes is not None:
        outputs = out_shapes(*structs)
    else:
        with _vma_unchecked():
            outputs = jax.eval_shape(local, *structs)
    if like.manual_axis_type.empty:
        return [jax.core.ShapedArray(y.shape, y.dtype) for y in outputs]
    on_mesh = NamedSharding(like.sharding.mesh, P())
    return [
        jax.core.ShapedArray(
            y.shape, y.dtype, sharding=on_mesh, manual_axis_type=like.manual_axis_type
        )
        for y in outputs
    ]


def _vma_unchecked():
    """The kernels traced without a user shard_map's varying-axes check: a pallas_call's
    out_shape carries no varying axes, and Pallas' interpreter (the CPU) slices varying
    refs with invariant program ids. ``_abstract_eval`` types the outputs instead."""
    from jax._src import config  # the pinned jax's check_vma switch

    return config._check_vma(False)


def _lowering(ctx, *values, local, grouped, heads_axis, out_shapes):
    del out_shapes  # the kernels are traced here, once
    mesh = _program_mesh(ctx)
    if mesh is None:
        # The kernels are lowered on plain (device-local) types: their bodies know
        # nothing of a user shard_map's varying axes (see _vma_unchecked).
        plain = lambda avals: [jax.core.ShapedArray(a.shape, a.dtype) for a in avals]  # noqa: E731
        ctx = ctx.replace(avals_in=plain(ctx.avals_in), avals_out=plain(ctx.avals_out))
        with _vma_unchecked():
            return mlir.lower_fun(local, multiple_results=True)(ctx, *values)
    shape = _first_grouped(ctx.avals_in, grouped).shape
    split = _grouped_spec(*split_for(mesh, shape[0], shape[heads_axis]), heads_axis)
    mapped = _shard_mapped(local, mesh, _specs(grouped, split), split)
    return mlir.lower_fun(mapped, multiple_results=True)(ctx, *values)


def _program_mesh(ctx):
    """The mesh the program is compiled for, or None where there is nothing to split
    (one device, or already inside a shard_map over every axis)."""
    from jax._src import sharding_impls  # the pinned jax's axis contexts

    context = ctx.module_context.axis_context
    if isinstance(context, sharding_impls.SPMDAxisContext):
        if set(context.manual_axes) == set(context.mesh.axis_names):
            return None
        raise KernelPlacementError(
            "the Pallas attention kernels inside a shard_map over only some mesh axes "
            f"({sorted(context.manual_axes)} of {list(context.mesh.axis_names)}): map over "
            "every axis, or use impl='shifted'."
        )
    if not isinstance(context, sharding_impls.ShardingContext):
        return None
    mesh = context.abstract_mesh
    devices = context.device_assignment
    if devices is None or len(devices) == 1:
        return None
    if mesh is None or mesh.empty:  # devices without a named mesh: one axis over all
        return jax.sharding.AbstractMesh((len(devices),), ("devices",))
    return mesh


def _batching_rule(arrays, dims, *, local, grouped, heads_axis, out_shapes):
    """One call per vmapped slice (per-head relative tables vmap the attention over heads)."""
    mapped = [(x, d) for x, d in zip(arrays, dims, strict=True)]
    size = next(x.shape[d] for x, d in mapped if d is not None)

    def one_slice(i):
        sliced = [x if d is None else jnp.take(x, i, axis=d) for x, d in mapped]
        return _per_group_p.bind(
            *sliced, local=local, grouped=grouped, heads_axis=heads_axis, out_shapes=out_shapes
        )

    slices = [one_slice(i) for i in range(size)]
    outputs = [jnp.stack(ys) for ys in zip(*slices, strict=True)]
    return outputs, [0] * len(outputs)


def _register():
    from jax._src import dispatch  # lowering needs the device assignment, as for shard_map

    # Called outside jit, the call is compiled on its own, as JAX does for primitives.
    _per_group_p.def_impl(functools.partial(dispatch.apply_primitive, _per_group_p))
    mlir.register_lowering(_per_group_p, _lowering)
    batching.primitive_batchers[_per_group_p] = _batching_rule
    dispatch.prim_requires_devices_during_lowering.add(_per_group_p)


_register()
