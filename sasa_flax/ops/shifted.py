"""Local attention as k² static shifts, with a hand-written backward pass.

Never materialises a k×k neighbourhood of K or V. For each of the k² offsets
o = (dy, dx) the keys and values are read as a static slice of the zero-padded
image, and the logit is one reduction over the head width,

    logit_o = q · (k[i+dy, j+dx] + r_o),   r_o = concat(rel_row[dy], rel_col[dx]),

so the relative term costs nothing extra (it is folded into each key read). The
only per-pixel tensor with a k² axis that the expression itself needs is the
attention matrix, (B, H, W, N, k²). Whether the compiled program stays that lean is
up to XLA: on CPU (jax 0.10.2) a reduce fusion materialises the shifted slices it
reads, so the forward logits are written as add chains (see ``_neighbour_dots``) and
the backward's slices still cost k²·C temporaries (benchmarks/local_attention.py).

Why a custom VJP: autodiff through k² static slices turns every slice's
cotangent into a pad of the full image and sums k² of them (an order of magnitude
slower than this; benchmarks/RESULTS.md). The backward here is written in "gather
form": dK and dV are k²-term sums of shifted slices of the zero-padded (dlogits·q)
and (att·dy), each output pixel gathering from the queries that saw it.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sasa_flax.ops.common import (
    accumulation_dtype,
    in_image_mask,
    offset_vectors,
    relative_table_grads,
    replicated_like,
)


def local_attention(q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype.

    Two rewrites help only a CPU's caches and its YNNPACK fusions (``_per_image``,
    ``_neighbour_dots(unrolled=True)``); they are chosen when the program is lowered,
    for CPU only. On TPU and GPU the forward is batched and its dots are reductions.
    """
    rel = None if rel_row is None else (rel_row, rel_col)

    def run(for_cpu: bool):
        return lambda q, k, v, rel: _attention(q, k, v, rel, kernel_size, padding, for_cpu)

    return jax.lax.platform_dependent(q, k, v, rel, cpu=run(True), default=run(False))


def _offsets(kernel_size: int) -> list[tuple[int, int]]:
    """(dy, dx) + r for every offset, row-major: index o = dy * k + dx."""
    return [(dy, dx) for dy in range(kernel_size) for dx in range(kernel_size)]


def _pad(x: jax.Array, r: int) -> jax.Array:
    """Zero-pads the two spatial axes of (B, H, W, ...) by r on each side."""
    return jnp.pad(x, [(0, 0), (r, r), (r, r)] + [(0, 0)] * (x.ndim - 3))


def _window(padded: jax.Array, dy: int, dx: int, height: int, width: int) -> jax.Array:
    return padded[:, dy : dy + height, dx : dx + width]


def _neighbour_dots(x, y, kernel_size, offsets=None, *, unrolled=False):
    """(B, H, W, N, k²): x_ij · (y[i+dy, j+dx] + r_o) for every offset o, zeros outside.

    ``unrolled`` writes each dot product as a chain of d elementwise adds instead of a
    reduction. Same arithmetic; but on CPU (jax 0.10.2) a reduction goes to a YNNPACK
    fusion that materialises every shifted slice, while the add chain stays one loop
    fusion: faster and with a fraction of the temporaries for the forward logits. In the
    backward's d(att) the same rewrite was slower, so the backward keeps the reduction
    (both measured side by side: benchmarks/RESULTS.md, 2026-11-26).
    """
    _, height, width, _, d = x.shape
    y_pad = _pad(y, kernel_size // 2)
    columns = []
    for o, (dy, dx) in enumerate(_offsets(kernel_size)):
        neighbour = _window(y_pad, dy, dx, height, width)
        if offsets is not None:
            neighbour = neighbour + offsets[o]
        product = x * neighbour
        if unrolled:
            columns.append(functools.reduce(jnp.add, [product[..., i] for i in range(d)]))
        else:
            columns.append(jnp.sum(product, axis=-1))
    return jnp.stack(columns, axis=-1)


def _logits(q, k, rel, kernel_size, padding, for_cpu=True):
    """(B, H, W, N, k²) logits in q's dtype (already the accumulation dtype)."""
    _, height, width, _, _ = q.shape
    offsets = None if rel is None else offset_vectors(rel, kernel_size, q.dtype)
    if k is None:  # position only: one small matmul against the k² offset vectors
        logits = jnp.einsum("bhwnd,od->bhwno", q, offsets)
    else:
        logits = _neighbour_dots(q, k, kernel_size, offsets, unrolled=for_cpu)
    if padding == "mask":
        inside = in_image_mask(height, width, kernel_size)[None, :, :, None, :]
        logits = jnp.where(inside, logits, jnp.finfo(logits.dtype).min)
    return logits


def _weighted_sum(att, v, kernel_size):
    """Σ_o att_o · v[i+dy, j+dx]: (B, H, W, N, dv)."""
    _, height, width, _, _ = v.shape
    v_pad = _pad(v, kernel_size // 2)
    terms = (
        att[..., o, None] * _window(v_pad, dy, dx, height, width)
        for o, (dy, dx) in enumerate(_offsets(kernel_size))
    )
    return functools.reduce(jnp.add, terms)


def _scatter_back(per_query, values, kernel_size):
    """Σ_o per_query_o[i-dy, j-dx] · values[i-dy, j-dx]: each pixel gathers what the
    queries that saw it through offset o send back. per_query: (B, H, W, N, k²)."""
    _, height, width, _, _ = values.shape
    r = kernel_size // 2
    p_pad, x_pad = _pad(per_query, r), _pad(values, r)
    terms = []
    for o, (dy, dx) in enumerate(_offsets(kernel_size)):
        sy, sx = 2 * r - dy, 2 * r - dx  # the query at (i - (dy - r), j - (dx - r))
        terms.append(
            _window(p_pad, sy, sx, height, width)[..., o, None]
            * _window(x_pad, sy, sx, height, width)
        )
    return functools.reduce(jnp.add, terms)


def _forward(q, k, v, rel, kernel_size, padding, for_cpu=True):
    """Output (in v's dtype) and the attention weights (accumulation dtype)."""
    acc = accumulation_dtype(q, v)
    k_acc = None if k is None else k.astype(acc)
    logits = _logits(q.astype(acc), k_acc, rel, kernel_size, padding, for_cpu)
    att = jax.nn.softmax(logits, axis=-1)
    y = _weighted_sum(att, v.astype(acc), kernel_size).astype(v.dtype)
    return y, att


def _per_image(fn, *batched):
    """fn applied to one image at a time (``lax.map`` over the batch axis), stacked.

    ``fn`` takes and returns arrays with a leading batch axis of 1 (None passes).

    Why, for the forward: one image's k² shifted slices and logits stay in cache
    instead of k² passes over the whole batch: faster at every ResNet stage on CPU.
    The backward is not mapped: per image it was slower (benchmarks/RESULTS.md).
    """

    def one(arrays):
        outputs = fn(*(None if a is None else a[None] for a in arrays))
        return jax.tree.map(lambda x: x[0], outputs)

    return jax.lax.map(one, batched)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, rel, kernel_size, padding, for_cpu):
    return _attention_fwd(q, k, v, rel, kernel_size, padding, for_cpu)[0]


def _attention_fwd(q, k, v, rel, kernel_size, padding, for_cpu):
    forward = lambda q, k, v: _forward(q, k, v, rel, kernel_size, padding, for_cpu)  # noqa: E731
    # One image at a time helps a CPU's caches; on an accelerator it would be a
    # sequential loop of small kernels over the per-device batch.
    # lax.map cannot scan over a batch whose type says it is split over devices
    # (Explicit mesh axes): that batch is computed whole.
    one_at_a_time = for_cpu and jax.typeof(q).sharding.spec[:1] in ((), (None,))
    y, att = _per_image(forward, q, k, v) if one_at_a_time else forward(q, k, v)
    # Inputs are saved in their own dtype (bfloat16 stays small); the backward casts.
    return y, (q, k, v, rel, att)


def _attention_bwd(kernel_size, padding, for_cpu, saved, dy):
    del for_cpu  # the backward is the same on every platform
    q_in, k_in, v_in, rel, att = saved
    acc = att.dtype
    q, v = q_in.astype(acc), v_in.astype(acc)
    k = None if k_in is None else k_in.astype(acc)
    dy = dy.astype(acc)

    # d(att_o) = dy · v_o, then the softmax backward.
    d_att = _neighbour_dots(dy, v, kernel_size)
    d_logits = att * (d_att - jnp.sum(att * d_att, axis=-1, keepdims=True))

    # dq = Σ_o dlogits_o (k_o + r_o); excluded neighbours have att = 0, so dlogits = 0.
    dq = jnp.zeros_like(q)
    if rel is not None:
        dq += jnp.einsum("bhwno,od->bhwnd", d_logits, offset_vectors(rel, kernel_size, acc))
    if k is not None:
        dq += _weighted_sum(d_logits, k, kernel_size)
    dk = None if k is None else _scatter_back(d_logits, q, kernel_size).astype(k_in.dtype)
    dv = _scatter_back(att, dy, kernel_size).astype(v_in.dtype)

    d_rel = None
    if rel is not None:
        # (k², d), summed over every pixel: replicated wherever the batch is split.
        per_offset = jnp.einsum("bhwno,bhwnd->od", d_logits, q, out_sharding=replicated_like(q))
        d_rel = relative_table_grads(per_offset, rel)
    return dq.astype(q_in.dtype), dk, dv, d_rel


_attention.defvjp(_attention_fwd, _attention_bwd)
