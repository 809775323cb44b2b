"""Attention within non-overlapping b×b blocks: the attention stem's operator.

The paper's stem (§3.2, A.1) "attends within each 4×4 spatial block": unlike the
sliding k×k window of ``local_attention``, every pixel of a block attends to the
same b² pixels, those of its own block. The logit has the same form as Eq. 3,

    logit(i, j, a, b) = q_ij · k_ab + q_ij[:d/2] · rel_row[a-i+b-1] + q_ij[d/2:] · rel_col[b-j+b-1],

with offsets inside a block ranging over -(b-1)..(b-1), so the relative tables
have 2b-1 rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sasa_flax.ops.common import accumulation_dtype
from sasa_flax.ops.local_attention import validate_arguments


def block_local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_row: jax.Array | None = None,
    rel_col: jax.Array | None = None,
    *,
    block_size: int,
) -> jax.Array:
    """Multi-head attention of every pixel over its own block_size² block.

    Args:
      q, k: (B, H, W, N, d); H and W divisible by ``block_size``.
      v: (B, H, W, N, dv).
      rel_row, rel_col: (2 * block_size - 1, d // 2) each or both ``None``;
        entry t embeds the offset t - (block_size - 1).
      block_size: the side b of the blocks.

    Returns:
      (B, H, W, N, dv) in v's dtype; logits and softmax in at least float32.
    """
    _validate(q, k, v, rel_row, rel_col, block_size)
    batch, height, width, heads, _ = q.shape

    def merged(x):  # (B, H, W, N, c) -> (N·c, b², M)
        return to_blocks(x.reshape(batch, height, width, -1), block_size)

    y = attention_in_blocks(
        merged(q), merged(k), merged(v), rel_row, rel_col, block_size=block_size, num_heads=heads
    )
    return from_blocks(y, (batch, height, width), block_size).reshape(*v.shape)


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """(B, H, W, C) -> (C, b², M): channel, position in the block (row-major), and every
    block of every image last (M = B·(H/b)·(W/b)). The blocked layout: on TPU the blocks
    lie on the lanes, so a block's products are whole vector registers."""
    batch, height, width, channels = x.shape
    b = block_size
    x = x.reshape(batch, height // b, b, width // b, b, channels)
    return x.transpose(5, 2, 4, 0, 1, 3).reshape(channels, b * b, -1)


def from_blocks(y: jax.Array, image_shape: tuple[int, int, int], block_size: int) -> jax.Array:
    """``to_blocks`` undone: (C, b², M) -> (B, H, W, C) for ``image_shape`` (B, H, W)."""
    batch, height, width = image_shape
    b = block_size
    y = y.reshape(-1, b, b, batch, height // b, width // b)
    return y.transpose(3, 4, 1, 5, 2, 0).reshape(batch, height, width, -1)


def attention_in_blocks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_row,
    rel_col,
    *,
    block_size: int,
    num_heads: int,
) -> jax.Array:
    """``block_local_attention`` in the blocked layout (``to_blocks``): q, k (N·d, b², M),
    v (N·dv, b², M), heads major in the channels (head n is channels n·d .. n·d + d);
    returns (N·dv, b², M) in v's dtype. Arguments are not validated here.

    The products are formed elementwise, not as matmuls over 16 × 16 blocks: a matrix
    unit would be almost idle at this size, while with the blocks last every product is
    a whole vector register. The logit of query q and key k is q · (k + r_qk), r_qk the
    two relative tables placed for the pair (a gather of the small tables, not of
    activations). A layer that projects its input can project it in this layout
    (``AttentionStem``: 3 input channels to move instead of q, k and v's 64).
    """
    blk = block_size
    acc = accumulation_dtype(q, k, v)
    positions, blocks = q.shape[1:]

    def heads(x):  # (N, c, b², M)
        return x.reshape(num_heads, -1, positions, blocks)

    q, k, v = heads(q), heads(k), heads(v)
    keys = k[:, :, None].astype(acc)  # (N, d, 1, b² keys, M); converted inside the fusions
    if rel_row is not None:
        # Offset (key - query) + (b - 1) for every (query, key) position pair.
        pos = np.arange(blk)
        row_of = np.repeat(pos, blk)  # position index p = row * b + col
        col_of = np.tile(pos, blk)
        row_idx = row_of[None, :] - row_of[:, None] + blk - 1  # (b², b²)
        col_idx = col_of[None, :] - col_of[:, None] + blk - 1
        placed = jnp.concatenate([rel_row[row_idx], rel_col[col_idx]], axis=-1)  # (b², b², d)
        keys = keys + jnp.moveaxis(placed, -1, 0).astype(acc)[None, ..., None]
    logits = jnp.sum(q[:, :, :, None].astype(acc) * keys, axis=1)  # (N, b² q., b² k., M)
    weights = jax.nn.softmax(logits, axis=2)
    # Weights rounded to v's dtype, as every implementation of local attention does.
    weights = weights.astype(v.dtype).astype(acc)
    y = jnp.sum(weights[:, None] * v[:, :, None].astype(acc), axis=3)  # (N, dv, b², M)
    return y.reshape(-1, positions, blocks).astype(v.dtype)


def _validate(q, k, v, rel_row, rel_col, block_size) -> None:
    """Block attention's own rules (a positive block side dividing the image); the rest
    are local attention's, whose relative tables of a window of side 2b - 1 have the
    same shape as a block's (``validate_arguments``: each rule written once)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}.")
    if k is None or v is None:
        raise ValueError("block_local_attention needs k and v arrays; got None.")
    validate_arguments(
        q,
        k,
        v,
        rel_row,
        rel_col,
        kernel_size=2 * block_size - 1,
        padding="mask",
        table_rows="2 * block_size - 1",
    )
    h, w = q.shape[1:3]
    if h % block_size or w % block_size:
        raise ValueError(
            f"the image height and width must be multiples of block_size={block_size}; "
            f"got {h}×{w}. Resize or crop the input to a multiple of {block_size}."
        )
