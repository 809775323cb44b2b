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
    bsz, h, w, n, d = q.shape
    blk = block_size
    acc = accumulation_dtype(q, k, v)
    many = bsz * (h // blk) * (w // blk) * n  # (image, block, head) triples

    def to_blocks(x):  # (B, H, W, N, c) -> (b², c, M): M = every block of every head, last
        x = x.reshape(bsz, h // blk, blk, w // blk, blk, n, x.shape[-1])
        x = x.transpose(2, 4, 6, 0, 1, 3, 5)
        return x.reshape(blk * blk, x.shape[2], many)

    # The products are formed elementwise with the (image, block, head) axis M last, not
    # as matmuls over 16 × 16 blocks: a matrix unit would be almost idle at this size, and
    # on TPU an array whose last axis has 16 entries fills 16 of 128 lanes (8× the
    # memory). The logit of query q and key k is q · (k + r_qk), r_qk the two relative
    # tables placed for the pair (one gather of the small tables, not of activations).
    qb, kb, vb = to_blocks(q), to_blocks(k), to_blocks(v)
    keys = kb[None].astype(acc)  # (1, b², d, M); converted inside the fused products
    if rel_row is not None:
        # Offset (key - query) + (b - 1) for every (query, key) position pair.
        pos = np.arange(blk)
        row_of = np.repeat(pos, blk)  # position index p = row * b + col
        col_of = np.tile(pos, blk)
        row_idx = row_of[None, :] - row_of[:, None] + blk - 1  # (b², b²)
        col_idx = col_of[None, :] - col_of[:, None] + blk - 1
        placed = jnp.concatenate([rel_row[row_idx], rel_col[col_idx]], axis=-1)  # (b², b², d)
        keys = keys + placed.astype(acc)[..., None]  # (b², b², d, M)
    logits = jnp.sum(qb[:, None].astype(acc) * keys, axis=2)  # (b² queries, b² keys, M)
    weights = jax.nn.softmax(logits, axis=1)
    # Weights rounded to v's dtype, as every implementation of local attention does.
    weights = weights.astype(v.dtype).astype(acc)
    yb = jnp.sum(weights[:, :, None] * vb[None].astype(acc), axis=1)  # (b², dv, M)
    # Back to (B, H, W, N, dv).
    y = yb.reshape(blk, blk, v.shape[-1], bsz, h // blk, w // blk, n)
    y = y.transpose(3, 4, 0, 5, 1, 6, 2).reshape(bsz, h, w, n, v.shape[-1])
    return y.astype(v.dtype)


def _validate(q, k, v, rel_row, rel_col, block_size) -> None:
    """Block attention's own rules (a positive block side dividing the image); the rest
    are local attention's, whose relative tables of a window of side 2b - 1 have the
    same shape as a block's (``validate_arguments``: each rule written once)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}.")
    if k is None or v is None:
        raise ValueError("block_local_attention needs k and v arrays; got None.")
    validate_arguments(
        q, k, v, rel_row, rel_col, kernel_size=2 * block_size - 1, padding="mask",
        table_rows="2 * block_size - 1",
    )  # fmt: skip
    h, w = q.shape[1:3]
    if h % block_size or w % block_size:
        raise ValueError(
            f"the image height and width must be multiples of block_size={block_size}; "
            f"got {h}×{w}. Resize or crop the input to a multiple of {block_size}."
        )
