"""Local attention as dense attention over the whole image with a window mask.

Every query scores every pixel of its image with one matmul per head, and pixels
outside its k×k window are masked out of the softmax. Exact, and all matmuls (so
plain autodiff is efficient), but the work is (H·W)² instead of H·W·k²: it pays
only when the image is not much larger than the window: ResNet-50's last stage at
k = 7 (7×7: 0.36× a 3×3 convolution forward+backward on CPU, against 0.95× for
"shifted") and 14×14 at k = 11 (2.53× against 5.51×). ``impl="auto"`` picks it when
H·W < 4·k².

Relative logits: q·r_{dy} and q·r_{dx} are computed per query and offset,
(B, N, P, k) each with P = H·W, and placed onto the (P, P) grid with constant one-hot
matrices. Under ``padding="zeros"`` the out-of-image neighbours are zero keys and
values that still take part in the softmax: they add k² − (in-image count) extra
logits per query (the positional term alone) with zero values.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sasa_flax.ops.common import accumulation_dtype, in_image_mask


def _placement(height: int, width: int, kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot (P, P, k) row and column offset of pixel p' seen from query p (zero
    outside the window); their product summed over k is the window mask."""
    r = kernel_size // 2
    ys, xs = np.divmod(np.arange(height * width), width)
    dy = ys[None, :] - ys[:, None] + r  # (P, P), in [0, k) inside the window
    dx = xs[None, :] - xs[:, None] + r
    inside = (dy >= 0) & (dy < kernel_size) & (dx >= 0) & (dx < kernel_size)
    offsets = np.arange(kernel_size)
    rows = (dy[..., None] == offsets) & inside[..., None]
    cols = (dx[..., None] == offsets) & inside[..., None]
    return rows.astype(np.float32), cols.astype(np.float32)


def local_attention(q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype."""
    batch, height, width, heads, d = q.shape
    pixels = height * width
    acc = accumulation_dtype(q, v)
    flat = lambda x: x.reshape(batch, pixels, heads, x.shape[-1]).astype(acc)  # noqa: E731
    q_flat, v_flat = flat(q), flat(v)
    rows, cols = _placement(height, width, kernel_size)
    window = jnp.asarray(rows.sum(-1) * cols.sum(-1) > 0)  # (P, P)

    logits = jnp.zeros((batch, heads, pixels, pixels), acc)
    if k is not None:
        logits = jnp.einsum("bpnd,bqnd->bnpq", q_flat, flat(k), precision="highest")
    extra = None  # (B, N, P, k²): logits of the zero keys outside the image ("zeros")
    if rel_row is not None:
        half = d // 2
        by_row = jnp.einsum("bpnd,td->bnpt", q_flat[..., :half], rel_row.astype(acc),
                            precision="highest")  # fmt: skip
        by_col = jnp.einsum("bpnd,td->bnpt", q_flat[..., half:], rel_col.astype(acc),
                            precision="highest")  # fmt: skip
        logits += jnp.einsum("bnpt,pqt->bnpq", by_row, jnp.asarray(rows, acc), precision="highest")
        logits += jnp.einsum("bnpt,pqt->bnpq", by_col, jnp.asarray(cols, acc), precision="highest")
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
    y = jnp.einsum("bnpq,bqnd->bpnd", att, v_flat, precision="highest")
    return y.reshape(batch, height, width, heads, -1).astype(v.dtype)
