"""Float64 NumPy references written as plain loops over pixels and neighbours.

Deliberately naive and independent of sasa_flax: no patches, no einsum, no
shared helpers. Every attention implementation is checked against these.
"""

from __future__ import annotations

import numpy as np


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def local_attention(q, k, v, rel_row, rel_col, kernel_size, padding):
    """Eq. 3 of the paper, one query pixel and one head at a time.

    Returns:
      y: (B, H, W, N, dv) float64.
      weights: (B, H, W, N, k, k) float64; 0 where a neighbour is excluded.
    """
    q = np.asarray(q, np.float64)
    v = np.asarray(v, np.float64)
    k = None if k is None else np.asarray(k, np.float64)
    has_pos = rel_row is not None
    if has_pos:
        rel_row = np.asarray(rel_row, np.float64)
        rel_col = np.asarray(rel_col, np.float64)
    batch, height, width, heads, d = q.shape
    dv = v.shape[-1]
    half = d // 2
    r = kernel_size // 2
    y = np.zeros((batch, height, width, heads, dv))
    weights = np.zeros((batch, height, width, heads, kernel_size, kernel_size))
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                for n in range(heads):
                    query = q[b, i, j, n]
                    logits, values, slots = [], [], []
                    for a in range(i - r, i + r + 1):
                        for c in range(j - r, j + r + 1):
                            inside = 0 <= a < height and 0 <= c < width
                            if not inside and padding == "mask":
                                continue
                            key = k[b, a, c, n] if (inside and k is not None) else np.zeros(d)
                            value = v[b, a, c, n] if inside else np.zeros(dv)
                            logit = float(np.dot(query, key))
                            if has_pos:
                                logit += float(np.dot(query[:half], rel_row[a - i + r]))
                                logit += float(np.dot(query[half:], rel_col[c - j + r]))
                            logits.append(logit)
                            values.append(value)
                            slots.append((a - i + r, c - j + r))
                    p = _softmax(np.array(logits))
                    y[b, i, j, n] = (p[:, None] * np.array(values)).sum(0)
                    for weight, (ty, tx) in zip(p, slots, strict=True):
                        weights[b, i, j, n, ty, tx] = weight
    return y, weights


def block_local_attention(q, k, v, rel_row, rel_col, block_size):
    """Every pixel attends to all pixels of its own block_size² block."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    has_pos = rel_row is not None
    batch, height, width, heads, d = q.shape
    half = d // 2
    s = block_size
    y = np.zeros(v.shape)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                top, left = (i // s) * s, (j // s) * s
                for n in range(heads):
                    logits, values = [], []
                    for a in range(top, top + s):
                        for c in range(left, left + s):
                            logit = float(np.dot(q[b, i, j, n], k[b, a, c, n]))
                            if has_pos:
                                logit += float(np.dot(q[b, i, j, n, :half], rel_row[a - i + s - 1]))
                                logit += float(np.dot(q[b, i, j, n, half:], rel_col[c - j + s - 1]))
                            logits.append(logit)
                            values.append(v[b, a, c, n])
                    p = _softmax(np.array(logits))
                    y[b, i, j, n] = (p[:, None] * np.array(values)).sum(0)
    return y
