"""The reference expression of local attention: gather k×k neighbourhoods, then einsum.

Every pixel's k×k neighbourhood of K and V is materialised with
``jax.lax.conv_general_dilated_patches`` (a one-hot convolution, so zero padding
outside the image comes for free), logits and the weighted sum are einsums. It is
simple enough to read against the paper's Eq. 3 and is the implementation every
faster one is compared with. It is not lean: it stores k²·C values per pixel (its memory,
measured against the others, is in benchmarks/RESULTS.md).

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sasa_flax.ops.common import accumulation_dtype, in_image_mask

# Patch extraction is a convolution with one-hot filters: at default precision
# a GPU/TPU would round the gathered values (TF32 / bf16 passes). HIGHEST keeps
# the copy exact.
_EXACT = jax.lax.Precision.HIGHEST


def neighbourhoods(x: jax.Array, kernel_size: int) -> jax.Array:
    """Gathers each pixel's k×k neighbourhood, zeros outside the image.

    Args:
      x: (B, H, W, N, d).
      kernel_size: odd window size k.

    Returns:
      (B, H, W, N, d, k*k); the last axis enumerates offsets (dy, dx) row-major,
      entry t = (dy + r) * k + (dx + r) with r = k // 2.
    """
    b, h, w, n, d = x.shape
    r = kernel_size // 2
    patches = jax.lax.conv_general_dilated_patches(
        x.reshape(b, h, w, n * d),
        filter_shape=(kernel_size, kernel_size),
        window_strides=(1, 1),
        padding=((r, r), (r, r)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_EXACT,
    )
    # conv_general_dilated_patches orders output features channel-major.
    return patches.reshape(b, h, w, n, d, kernel_size * kernel_size)


def relative_logits(q: jax.Array, rel_row: jax.Array, rel_col: jax.Array) -> jax.Array:
    """q[:d/2]·rel_row[dy] + q[d/2:]·rel_col[dx] for every offset (dy, dx).

    Args:
      q: (..., N, d): queries of N heads (e.g. (B, H, W, N, d)).
      rel_row, rel_col: (k, d // 2) shared by the heads, or (N, k, d // 2) per head.

    Returns:
      (..., N, k, k) in the accumulation dtype: [..., dy, dx].
    """
    half = q.shape[-1] // 2
    acc = accumulation_dtype(q, rel_row)
    spec = "...nc,tc->...nt" if rel_row.ndim == 2 else "...nc,ntc->...nt"
    row = jnp.einsum(spec, q[..., :half], rel_row, preferred_element_type=acc)
    col = jnp.einsum(spec, q[..., half:], rel_col, preferred_element_type=acc)
    return row[..., :, None] + col[..., None, :]


def attention_logits(q, k, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """Logits (B, H, W, N, k*k), at least float32; excluded neighbours hold the dtype's min."""
    b, h, w, n, _ = q.shape
    acc = accumulation_dtype(q)
    logits = jnp.zeros((b, h, w, n, kernel_size * kernel_size), acc)
    if k is not None:
        logits += jnp.einsum(
            "bhwnd,bhwndt->bhwnt", q, neighbourhoods(k, kernel_size), preferred_element_type=acc
        )
    if rel_row is not None:
        logits += relative_logits(q, rel_row, rel_col).reshape(logits.shape)
    if padding == "mask":
        inside = in_image_mask(h, w, kernel_size)[None, :, :, None, :]
        # A finite minimum (not -inf) keeps gradients NaN-free; exp() of it
        # underflows to exactly 0, so excluded neighbours get weight exactly 0.
        logits = jnp.where(inside, logits, jnp.finfo(logits.dtype).min)
    return logits


def local_attention_weights(q, k, rel_row, rel_col, *, kernel_size: int, padding: str):
    """Softmax weights (B, H, W, N, k*k), at least float32."""
    logits = attention_logits(q, k, rel_row, rel_col, kernel_size=kernel_size, padding=padding)
    return jax.nn.softmax(logits, axis=-1)


def local_attention(q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype."""
    weights = local_attention_weights(
        q, k, rel_row, rel_col, kernel_size=kernel_size, padding=padding
    )
    # Weights are rounded to v's dtype for the weighted sum (as flash attention
    # does); the sum itself accumulates in float32.
    y = jnp.einsum(
        "bhwnt,bhwndt->bhwnd",
        weights.astype(v.dtype),
        neighbourhoods(v, kernel_size),
        preferred_element_type=accumulation_dtype(v),
    )
    return y.astype(v.dtype)


def weights_at(q, k, rel_row, rel_col, positions, *, kernel_size: int, padding: str):
    """Softmax weights of a few query pixels only, without any whole-image patches:
    (B, P, N, k, k) for ``positions`` = [(i, j), ...] (static), at least float32; the
    same weights as ``local_attention_weights`` at those pixels. ``rel_row``/``rel_col``
    may be per head, (N, k, d/2). Memory O(B·P·N·k²·d): for pictures of a trained model.

    Also returns the (P, k, k) bool mask of the neighbours inside the image.
    """
    b, h, w, n, _ = q.shape
    r = kernel_size // 2
    acc = accumulation_dtype(q)
    padded = None if k is None else jnp.pad(k, ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))
    inside = in_image_mask(h, w, kernel_size).reshape(h, w, kernel_size, kernel_size)
    weights, masks = [], []
    for i, j in positions:
        query = q[:, i, j]  # (B, N, d)
        logits = jnp.zeros((b, n, kernel_size, kernel_size), acc)
        if padded is not None:
            window = padded[:, i : i + kernel_size, j : j + kernel_size]  # (B, k, k, N, d)
            logits += jnp.einsum("bnd,byxnd->bnyx", query, window, preferred_element_type=acc)
        if rel_row is not None:
            logits += relative_logits(query, rel_row, rel_col)
        mask = inside[i, j]
        if padding == "mask":
            logits = jnp.where(mask, logits, jnp.finfo(acc).min)
        flat = jax.nn.softmax(logits.reshape(b, n, -1), axis=-1)
        weights.append(flat.reshape(logits.shape))
        masks.append(mask)
    return jnp.stack(weights, axis=1), np.stack(masks)
