"""Running the Pallas kernels one batch shard per device.

XLA cannot partition a Pallas call: on a TPU mesh of several chips a Mosaic call outside
``shard_map`` does not lower ("Mosaic kernels cannot be automatically partitioned"), and
on several GPUs XLA all-gathers a Triton call's operands and runs it on the global batch
on every device. Local attention is independent per image, so the kernels run under
``jax.shard_map`` on each device's slice of the batch, with the relative tables
replicated; shard_map's transpose sums the tables' gradients over the shards, the same
global reduction XLA writes for the other implementations.

The mesh is the one in context (``jax.set_mesh``; the trainer, the evaluator and the
compile check set it). Outside a mesh, or on a mesh of one device, the kernels are called
as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The axes of ``mesh`` that split a batch of ``batch`` images: every axis of more than
    one device, in mesh order, as long as the product of their sizes divides ``batch``
    (the trainer's one ``data`` axis; on a mesh with other axes too, the batch is split
    over all of them). An axis left out holds whole copies of the batch: the kernels then
    repeat work across it, which is correct but slower, never wrong."""
    axes, product = [], 1
    for name in mesh.axis_names:
        size = mesh.shape[name]
        if size > 1 and batch % (product * size) == 0:
            axes.append(name)
            product *= size
    return tuple(axes)


def per_batch_shard(kernels: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``kernels(q, k, v, rel_row, rel_col) -> y`` run per batch shard of the mesh in
    context (module docstring). q, k, v, y: (B, H, W, N, ·), split on B; ``k`` and the
    tables may be ``None``."""

    def sharded(q, k, v, rel_row, rel_col):
        mesh = jax.sharding.get_abstract_mesh()
        axes = () if mesh.empty else batch_axes(mesh, q.shape[0])
        if not axes:
            return kernels(q, k, v, rel_row, rel_col)
        split = P(axes)
        present = [(x, spec) for x, spec in
                   ((q, split), (k, split), (v, split), (rel_row, P()), (rel_col, P()))
                   if x is not None]  # fmt: skip
        missing = tuple(x is None for x in (q, k, v, rel_row, rel_col))

        def per_shard(*arrays):
            it = iter(arrays)
            return kernels(*(None if absent else next(it) for absent in missing))

        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=tuple(spec for _, spec in present),
            out_specs=split,
            # pallas_call's outputs carry no varying-axes type; the tables' cotangents
            # are still summed over the shards (checked against the unsharded layer).
            check_vma=False,
        )(*(x for x, _ in present))

    return sharded
