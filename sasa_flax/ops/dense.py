"""Local attention as dense attention over the whole image with a window mask.

Every query scores every pixel of its image with one matmul per head, and pixels
outside its k×k window are masked out of the softmax. Exact, and all matmuls (so
plain autodiff is efficient), but the work is (H·W)² instead of H·W·k²: it pays
only when the image is not much larger than the window (ResNet-50's last stage at
k = 7, or 14×14 at k = 11; benchmarks/RESULTS.md has the CPU ratios). ``impl="auto"``
picks it when H·W < 4·k² (``auto_choice``, the one place that rule is written).

Relative logits: q·r_{dy} and q·r_{dx} are computed per query and offset,
(B, N, P, k) each with P = H·W, placed by image row and column with constant one-hot
matrices, (B, N, P, H) and (B, N, P, W), and broadcast onto the (P, P) grid. Under
``padding="zeros"`` the out-of-image neighbours are zero keys and values that still
take part in the softmax: they add k² − (in-image count) extra logits per query (the
positional term alone) with zero values.

Precision: the q·k and weighted-sum matmuls take bfloat16 inputs as they are (one pass
of a TPU's or GPU's matrix unit, products exact in the float32 accumulator) and
float32 inputs at HIGHEST (exact; several passes on a TPU). See ``matmul_precision``.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_flax.ops.common import accumulation_dtype, in_image_mask


def _placement(height: int, width: int, kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot (P, H, k) and (P, W, k): the row offset of image row y seen from query p
    (all zero where the row is outside p's window), and the same for columns."""
    r = kernel_size // 2
    ys, xs = np.divmod(np.arange(height * width), width)
    offsets = np.arange(kernel_size)
    rows = (np.arange(height)[None, :] - ys[:, None] + r)[..., None] == offsets  # (P, H, k)
    cols = (np.arange(width)[None, :] - xs[:, None] + r)[..., None] == offsets  # (P, W, k)
    return rows.astype(np.float32), cols.astype(np.float32)


def matmul_precision(*arrays) -> jax.lax.Precision:
    """HIGHEST for float32/float64 operands (exact, like every other implementation; on
    TPU that is several bf16 passes), DEFAULT for bfloat16/float16: their products are
    exact in the float32 accumulator, in one pass of the matrix unit."""
    exact = jnp.dtype(jnp.result_type(*arrays)).itemsize >= 4
    return jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT


def _per_offset(q_half, table, acc) -> jax.Array:
    """(B, P, N, d/2) queries · (k, d/2) table -> (B, N, P, k), exact in ``acc``.

    Products and a sum, not a matmul: the output has only k columns (3 to 11), too
    narrow for a matrix unit, and as a dot XLA:GPU's Triton GEMM fusions found no tiling
    for it without autotuning (H100 target, 7²×512, batch 128).
    """
    products = q_half.astype(acc)[..., None, :] * table.astype(acc)
    return jnp.sum(products, axis=-1).transpose(0, 2, 1, 3)


def local_attention(q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype.

    The matmuls take the inputs in their own dtype and accumulate in float32
    (``matmul_precision``); the softmax is float32 and its weights are rounded to v's
    dtype for the weighted sum, as in "patches".
    """
    batch, height, width, heads, d = q.shape
    pixels = height * width
    acc = accumulation_dtype(q, v)
    flat = lambda x: x.reshape(batch, pixels, heads, x.shape[-1])  # noqa: E731
    q_flat = flat(q)
    rows, cols = _placement(height, width, kernel_size)
    window = jnp.asarray(  # (P, P): the window of query p
        (rows.sum(-1)[:, :, None] * cols.sum(-1)[:, None, :]).reshape(pixels, pixels) > 0
    )
    matmul = functools.partial(jnp.einsum, preferred_element_type=acc)

    logits = jnp.zeros((batch, heads, pixels, pixels), acc)
    if k is not None:
        logits = matmul("bpnd,bqnd->bnpq", q_flat, flat(k), precision=matmul_precision(q, k))
    extra = None  # (B, N, P, k²): logits of the zero keys outside the image ("zeros")
    if rel_row is not None:
        half = d // 2
        by_row = _per_offset(q_flat[..., :half], rel_row, acc)
        by_col = _per_offset(q_flat[..., half:], rel_col, acc)
        # Onto the grid: (B, N, P, H) by image row plus (B, N, P, W) by image column.
        # The one-hot products are exact at HIGHEST and cost P·(H + W)·k, not P²·k.
        exact = jax.lax.Precision.HIGHEST
        row_term = matmul("bnpt,pyt->bnpy", by_row, jnp.asarray(rows, acc), precision=exact)
        col_term = matmul("bnpt,pxt->bnpx", by_col, jnp.asarray(cols, acc), precision=exact)
        logits += (row_term[..., :, None] + col_term[..., None, :]).reshape(logits.shape)
        if padding == "zeros":
            extra = (by_row[..., :, None] + by_col[..., None, :]).reshape(
                batch, heads, pixels, kernel_size * kernel_size
            )
    lowest = jnp.finfo(acc).min
    logits = jnp.where(window, logits, lowest)
    if padding == "zeros":
        outside = ~in_image_mask(height, width, kernel_size).reshape(pixels, -1)  # (P, k²)
        if extra is None:
            extra = jnp.zeros((batch, heads, pixels, outside.shape[-1]), acc)
        logits = jnp.concatenate([logits, jnp.where(outside, extra, lowest)], axis=-1)
    att = jax.nn.softmax(logits, axis=-1)[..., :pixels]  # zero keys carry zero values
    y = matmul("bnpq,bqnd->bpnd", att.astype(v.dtype), flat(v), precision=matmul_precision(v))
    return y.reshape(batch, height, width, heads, -1).astype(v.dtype)
