"""Local (k×k neighbourhood) multi-head self-attention: the pure functional core.

This is Eq. 3 of Ramachandran et al. (2019) for every pixel (i, j) and head n:

    logit(i, j, a, b) = q_ij · k_ab                                   (content)
                      + q_ij[:d/2] · rel_row[a-i+r] + q_ij[d/2:] · rel_col[b-j+r]   (position)
    y_ij = Σ_{|a-i|≤r, |b-j|≤r} softmax_ab(logit) v_ab,   r = kernel_size // 2.

No scaling is applied here; ``SelfAttention2D`` scales q by d^-1/2.

Implementations live one per module (``patches`` is the reference expression) and
are chosen with ``impl``; they all compute exactly this function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sasa_flax.errors import ArgumentError, check_one_of
from sasa_flax.ops import choice, dense, pallas, patches, shifted
from sasa_flax.ops.common import vary_together
from sasa_flax.registries import Registry

PADDINGS = ("mask", "zeros")

# name -> function(q, k, v, rel_row, rel_col, *, kernel_size, padding)
_IMPLEMENTATIONS = Registry(
    "attention implementation (impl)",
    {
        "patches": patches.local_attention,
        "shifted": shifted.local_attention,
        "dense": dense.local_attention,
        "pallas": pallas.local_attention,
    },
    reserved=("auto",),
)


def register_implementation(name: str, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Makes ``fn`` available as ``impl=name`` here, in ``SelfAttention2D`` and as
    ``config.model.attention_impl``.

    ``fn(q, k, v, rel_row, rel_col, *, kernel_size, padding)`` must compute exactly
    ``local_attention``'s function (check it with the tests' float64 reference); the
    arguments reach it already validated. Registering the same definition again (its file
    loaded a second time, e.g. as a config file) replaces it. Returns ``fn``.
    """
    return _IMPLEMENTATIONS.add(name, fn)


def implementations() -> tuple[str, ...]:
    """Every valid ``impl``: "auto" and the registered implementations."""
    return ("auto", *_IMPLEMENTATIONS)


def local_attention(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array,
    rel_row: jax.Array | None = None,
    rel_col: jax.Array | None = None,
    *,
    kernel_size: int,
    padding: str = "mask",
    impl: str = "auto",
) -> jax.Array:
    """Multi-head self-attention of every pixel over its k×k neighbourhood.

    Args:
      q: queries (B, H, W, N, d): N heads of width d.
      k: keys, same shape as ``q``; or ``None`` for position-only attention
        (paper Table 6), where the logit is the positional term alone.
      v: values (B, H, W, N, dv).
      rel_row, rel_col: relative row / column embeddings, (kernel_size, d // 2)
        each, shared by all heads; entry t embeds the offset t - kernel_size // 2.
        Both ``None`` for no positional term.
      kernel_size: odd window extent k (the window is centred on the query).
      padding: what lies outside the image. ``"mask"``: those neighbours take no
        part in the softmax, so a border pixel attends over its in-image
        neighbours only. ``"zeros"``: they are zero keys and zero values that do
        take part (their logit is the positional term alone).
      impl: ``"patches"`` (the reference expression: k×k neighbourhoods gathered,
        then einsum; memory-hungry), ``"shifted"`` (k² static shifts with a
        hand-written backward that gathers no k×k neighbourhoods; reverse-mode only,
        like every ``custom_vjp``), ``"dense"`` (the whole image as one block with a
        window mask: (H·W)² work in matmuls, for images not much larger than the
        window), ``"pallas"`` (fused Pallas kernels with an online softmax and their
        own backward; Triton kernels on GPU, Mosaic kernels on TPU, the GPU kernels
        interpreted on CPU, where they are exact but slow) or ``"auto"`` (the default,
        as ``SelfAttention2D``'s): chosen per platform when the program is lowered
        (``auto_choice``; e.g. on CPU ``"dense"`` when H·W < 4·k², else ``"shifted"``).

    Returns:
      (B, H, W, N, dv) in the dtype of ``v``. Logits and the softmax are computed
      in float32 whatever the input dtype (float64 for float64 inputs).

    Raises:
      ValueError: naming the offending argument, for bad shapes, an even or
        non-positive kernel_size, an odd d with a positional term, or an unknown
        padding / impl. Raised at trace time, before anything is compiled.
    """
    validate_arguments(q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding)
    # Inside a user's shard_map (check_vma=True) the custom VJPs need operands of one
    # type: the invariant tables become varying, and their gradient is summed over the
    # shards by the cast's transpose.
    q, k, v, rel_row, rel_col = vary_together(q, k, v, rel_row, rel_col)
    # The scope names the core's ops in profiles and in the TPU estimate (tpu_schedule).
    with jax.named_scope("local_attention"):
        return _implementation(impl)(
            q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding
        )


def local_attention_weights(
    q: jax.Array,
    k: jax.Array | None,
    rel_row: jax.Array | None = None,
    rel_col: jax.Array | None = None,
    *,
    kernel_size: int,
    padding: str = "mask",
) -> jax.Array:
    """The attention weights of ``local_attention``, for inspection and plots.

    Returns:
      (B, H, W, N, kernel_size, kernel_size), at least float32: weight of neighbour
      (i + dy, j + dx) at index [..., dy + r, dx + r]. Under ``"mask"`` the
      weights of out-of-image neighbours are exactly 0.
    """
    validate_arguments(q, k, None, rel_row, rel_col, kernel_size=kernel_size, padding=padding)
    weights = patches.local_attention_weights(
        q, k, rel_row, rel_col, kernel_size=kernel_size, padding=padding
    )
    return weights.reshape(*weights.shape[:-1], kernel_size, kernel_size)


def _auto(q, k, v, rel_row, rel_col, *, kernel_size, padding):
    """``choice.auto_choice`` per platform, decided when the program is lowered."""
    height, width = q.shape[1:3]
    widths = dict(head_dim=q.shape[-1], value_dim=v.shape[-1], itemsize=q.dtype.itemsize)

    def branch(platform):
        impl = choice.auto_choice(platform, height, width, kernel_size, **widths)
        options = dict(kernel_size=kernel_size, padding=padding)
        if impl == "pallas":  # lowered for CUDA or TPU only: compiled, never interpreted
            return pallas.compiled(platform, **options)
        return lambda *args: _IMPLEMENTATIONS[impl](*args, **options)

    return choice.per_platform(branch, q, k, v, rel_row, rel_col)


def _implementation(impl: str) -> Callable:
    if impl == "auto":  # decided per platform, when the program is lowered
        return _auto
    validate_impl(impl)
    return _IMPLEMENTATIONS[impl]


def validate_impl(impl) -> None:
    check_one_of("impl", impl, implementations())


def validate_kernel_size(kernel_size, name: str = "kernel_size") -> None:
    """Raises unless ``kernel_size`` is a positive odd integer."""
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ArgumentError(
            name,
            kernel_size,
            "must be a positive odd integer (3, 5, 7, ...): the window is centred on the "
            "query pixel",
        )


def validate_padding(padding, name: str = "padding") -> None:
    check_one_of(name, padding, PADDINGS)


def validate_arguments(
    q, k, v, rel_row, rel_col, *, kernel_size, padding, table_rows: str = "kernel_size"
) -> None:
    """Checks the arguments of ``local_attention``; ``v=None`` skips v's checks.
    ``table_rows``: how an error names the tables' row count (block attention's is
    "2 * block_size - 1")."""
    validate_kernel_size(kernel_size)
    validate_padding(padding)
    _check_float("q", q)
    if q.ndim != 5:
        raise ValueError(
            f"q must have shape (batch, height, width, heads, head_dim); got shape {q.shape}. "
            "Reshape (B, H, W, C) inputs to (B, H, W, heads, C // heads)."
        )
    if k is not None:
        _check_float("k", k)
        if k.shape != q.shape:
            raise ValueError(
                f"k must have the same shape as q {q.shape}; got {k.shape}. "
                "Pass k=None for position-only attention."
            )
    if v is not None:
        _check_float("v", v)
        if v.ndim != 5 or v.shape[:4] != q.shape[:4]:
            raise ValueError(
                f"v must have shape (batch, height, width, heads, value_dim) with the first four "
                f"equal to q's {q.shape[:4]}; got {v.shape}."
            )
    if (rel_row is None) != (rel_col is None):
        raise ValueError(
            "rel_row and rel_col must be given together or both be None; got "
            f"rel_row={_describe(rel_row)}, rel_col={_describe(rel_col)}."
        )
    if rel_row is None:
        if k is None:
            raise ValueError(
                "k is None and rel_row/rel_col are None: every logit would be zero. "
                "Pass k, or relative tables for position-only attention."
            )
        return
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(
            f"the head width q.shape[-1] must be even with relative tables (half is "
            f"matched with rel_row, half with rel_col); got {head_dim}. Use an even "
            "head width or pass rel_row=rel_col=None."
        )
    expected = (kernel_size, head_dim // 2)
    for name, table in (("rel_row", rel_row), ("rel_col", rel_col)):
        _check_float(name, table)
        if table.shape != expected:
            raise ValueError(
                f"{name} must have shape ({table_rows}, head_dim // 2) = {expected}; "
                f"got {table.shape}."
            )


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")


def _describe(x) -> str:
    return "None" if x is None else f"array of shape {x.shape}"
