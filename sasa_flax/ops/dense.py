"""Local attention as dense attention over the whole image with a window mask.

Every query scores every pixel of its image with one matmul per head, and pixels
outside its k×k window are masked out of the softmax. Exact, and all matmuls (so
plain autodiff is efficient), but the work is (H·W)² instead of H·W·k²: it pays
only when the image is not much larger than the window (ResNet-50's last stage at
k = 7, or 14×14 at k = 11; benchmarks/RESULTS.md has the CPU ratios). ``impl="auto"``
picks it when H·W < 4·k² (``auto_choice``, the one place that rule is written).

Relative logits: the tables are first placed by image row, E_row[y, y'] = rel_row[y' −
y + r] (zero where |y' − y| > r), (H, H, d/2), and by column (W, W, d/2); then one matmul
per query row gives q_row·E_row[y] for every key row, (B, N, P, H), and one per query
column the column terms, (B, N, P, W), broadcast onto the (P, P) grid. Those matmuls take
the inputs in their own dtype (exact products, as the q·k matmul), where placing per-offset
dots with one-hot matrices needed float32 at HIGHEST precision (in libtpu's schedule that
was a third of a 14² layer's step). The window is an additive mask (0 or MASKED_LOGIT), so
the backward carries no select over the (P, P) grid. Under ``padding="zeros"`` the
out-of-image neighbours are zero keys and values that still take part in the softmax: they
add k² − (in-image count) extra logits per query (the positional term alone) with zero
values.

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

from sasa_flax.ops.common import MASKED_LOGIT, accumulation_dtype, in_image_mask


def _placement(extent: int, kernel_size: int) -> np.ndarray:
    """One-hot (extent, extent, k): the window offset of image row (or column) y' seen
    from row y, all zero where y' is outside y's window."""
    r = kernel_size // 2
    lines = np.arange(extent)
    offsets = lines[None, :] - lines[:, None] + r  # (y, y')
    return (offsets[..., None] == np.arange(kernel_size)).astype(np.float32)


def _window(height: int, width: int, kernel_size: int) -> np.ndarray:
    """(P, P) bool: whether pixel q lies in pixel p's window."""
    rows = _placement(height, kernel_size).sum(-1) > 0
    cols = _placement(width, kernel_size).sum(-1) > 0
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(height * width, -1)


def _relative_logits(q, table, axis: int, kernel_size: int, acc) -> jax.Array:
    """q (B, H, W, N, d) against ``table`` (k, d/2) placed along image ``axis`` (1: rows,
    matched with q's first half; 2: columns, with its second half): (B, N, P, extent),
    the term of every key row (column)."""
    extent = q.shape[axis]
    # (y, y', d): exact, each entry one table row or zero, and zero on q's other half
    # (cheaper than slicing q, whose head width lies on a TPU's lanes).
    placed = jnp.einsum(
        "uvt,tc->uvc",
        jnp.asarray(_placement(extent, kernel_size), acc),
        table.astype(acc),
        precision=jax.lax.Precision.HIGHEST,
    )
    halves = [placed, jnp.zeros_like(placed)]
    placed = jnp.concatenate(halves if axis == 1 else halves[::-1], axis=-1).astype(table.dtype)
    # One matmul per query row (column): every query of it against every key row (column).
    spec = "bywnc,yvc->bnywv" if axis == 1 else "bywnc,wvc->bnywv"
    terms = jnp.einsum(
        spec, q, placed, precision=matmul_precision(q, table), preferred_element_type=acc
    )
    batch, heads, height, width, _ = terms.shape
    return terms.reshape(batch, heads, height * width, extent)


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
    matmul = functools.partial(jnp.einsum, preferred_element_type=acc)

    logits = jnp.zeros((batch, heads, pixels, pixels), acc)
    if k is not None:
        logits = matmul("bpnd,bqnd->bnpq", flat(q), flat(k), precision=matmul_precision(q, k))
    extra = None  # (B, N, P, k²): logits of the zero keys outside the image ("zeros")
    if rel_row is not None:
        half = d // 2
        row_term = _relative_logits(q, rel_row, 1, kernel_size, acc)  # (B, N, P, H)
        col_term = _relative_logits(q, rel_col, 2, kernel_size, acc)  # (B, N, P, W)
        logits += (row_term[..., :, None] + col_term[..., None, :]).reshape(logits.shape)
        if padding == "zeros":
            q_flat = flat(q)
            row_taps = _per_offset(q_flat[..., :half], rel_row, acc)
            col_taps = _per_offset(q_flat[..., half:], rel_col, acc)
            extra = (row_taps[..., :, None] + col_taps[..., None, :]).reshape(
                batch, heads, pixels, kernel_size * kernel_size
            )
    # Outside the window: a constant added, not a select (no select in the backward).
    logits = logits + jnp.where(_window(height, width, kernel_size), 0.0, MASKED_LOGIT).astype(acc)
    if padding == "zeros":
        outside = ~in_image_mask(height, width, kernel_size).reshape(pixels, -1)  # (P, k²)
        if extra is None:
            extra = jnp.zeros((batch, heads, pixels, outside.shape[-1]), acc)
        logits = jnp.concatenate([logits, jnp.where(outside, extra, MASKED_LOGIT)], axis=-1)
    att = jax.nn.softmax(logits, axis=-1)[..., :pixels]  # zero keys carry zero values
    y = matmul("bnpq,bqnd->bpnd", att.astype(v.dtype), flat(v), precision=matmul_precision(v))
    return y.reshape(batch, height, width, heads, -1).astype(v.dtype)
