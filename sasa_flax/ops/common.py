"""Pieces every implementation of local attention shares: dtypes, the in-image mask, the
offsets and the relative tables folded per offset (and their gradients).

Offsets are enumerated row-major everywhere: offset o = (dy + r)·k + (dx + r) for
dy, dx in [-r, r], r = k // 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The logit the fused kernels give a masked neighbour. Finite, so that a query whose
# first offsets are all outside never computes exp(-inf - -inf) = nan: once an in-image
# neighbour arrives, exp(MASKED_LOGIT - max) underflows to exactly 0.
MASKED_LOGIT = -1e30


def accumulation_dtype(*arrays) -> jnp.dtype:
    """float32 for bfloat16/float16/float32 inputs, float64 for float64 ones.

    Logits, softmax and sums are never computed in less than float32; float64
    inputs (the gradient tests) stay float64.
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def in_image_mask(height: int, width: int, kernel_size: int) -> np.ndarray:
    """(H, W, k*k) bool: whether neighbour t of pixel (i, j) lies inside the image.

    Computed with NumPy at trace time: it depends only on static shapes.
    """
    r = kernel_size // 2
    offsets = np.arange(kernel_size) - r
    rows = np.arange(height)[:, None] + offsets[None, :]  # (H, k)
    cols = np.arange(width)[:, None] + offsets[None, :]  # (W, k)
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    mask = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # (H, W, k, k)
    return mask.reshape(height, width, kernel_size * kernel_size)


def offset_vectors(rel, kernel_size: int, dtype) -> jax.Array:
    """r_o for every offset: (k², d) = concat(rel_row[dy], rel_col[dx])."""
    rel_row, rel_col = (t.astype(dtype) for t in rel)
    rows = jnp.repeat(rel_row, kernel_size, axis=0)  # o -> dy
    cols = jnp.tile(rel_col, (kernel_size, 1))  # o -> dx
    return jnp.concatenate([rows, cols], axis=-1)


def relative_table_grads(per_offset: jax.Array, rel) -> tuple[jax.Array, jax.Array]:
    """Gradients of (rel_row, rel_col) from the gradient of every r_o, (k², ≥ d).

    r_o = concat(rel_row[dy], rel_col[dx]), so rel_row[dy] collects the first d/2
    entries over dx and rel_col[dx] the last d/2 over dy. Columns past d (padding)
    are ignored. Returned in the tables' dtypes.
    """
    rel_row, rel_col = rel
    kernel_size, half = rel_row.shape
    per_offset = per_offset[:, : 2 * half].reshape(kernel_size, kernel_size, 2 * half)
    return (
        per_offset[..., :half].sum(axis=1).astype(rel_row.dtype),  # over dx
        per_offset[..., half:].sum(axis=0).astype(rel_col.dtype),  # over dy
    )


def vary_together(*arrays: jax.Array | None) -> list[jax.Array | None]:
    """``arrays`` (``None`` passes through), each made varying over every manual mesh axis
    that any of them varies over. Inside a user's ``shard_map`` with ``check_vma=True`` a
    Pallas call needs operands of one type, and an invariant operand (the relative
    tables) must be cast to varying so that its gradient is summed over the shards (the
    cast's transpose), as JAX does for every other parameter there. Elsewhere a no-op."""
    present = [x for x in arrays if x is not None]
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in present))

    def vary(x):
        if x is None:
            return None
        missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return [vary(x) for x in arrays]


def replicated_like(x: jax.Array):
    """``out_sharding`` for a sum over all of ``x``'s split dimensions (a parameter's
    gradient): replicated on ``x``'s mesh where its type carries a sharding (Explicit
    mesh axes), where JAX cannot tell how such a contraction's output is split; None
    (XLA decides) elsewhere."""
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
