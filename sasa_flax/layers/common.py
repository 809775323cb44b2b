"""Pieces both attention layers are made of: projections, head splitting, checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax.errors import ArgumentError

Dtype = Any


def make_projection(in_features, out_features, dtype, param_dtype, rngs) -> nnx.Linear:
    """A bias-free pointwise (1×1) projection: W_Q, W_K or W_V."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def apply_projection(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """``linear(x)`` for (..., C) inputs, computed as one 2-D matmul.

    Same parameters and result as calling the module, whose dot_general contracts the
    last axis of a 4-D input. On CPU (jax 0.10.2) XLA runs that form and its gradient
    far slower (benchmarks/RESULTS.md, the projection fix of 2026-11-26).
    """
    x, kernel = nnx.nn.dtypes.promote_dtype((x, linear.kernel[...]), dtype=linear.dtype)
    y = x.reshape(-1, x.shape[-1]) @ kernel
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def project_heads(
    linear: nnx.Linear, x: jax.Array, num_heads: int, scale: float | None = None
) -> jax.Array:
    """``split_heads(apply_projection(linear, x) * scale, num_heads)``: (B, H, W, C) ->
    (B, H, W, N, d), computed per platform when the program is lowered.

    On TPU the product is computed channels-first (``heads_channels_first``): the matrix
    unit then writes (B, d·N, H·W), the layout of the Mosaic kernels' frames
    (``ops/pallas/tpu.py``), and the transposes between the two cancel, in the forward
    and in the backward. In libtpu's schedule a 56²×64 layer's step went from 3.9 M to
    3.5 M cycles (layout glue 0.9 M -> 0.6 M), and the "dense" layers at 14² and 7² lost
    nothing (benchmarks/RESULTS.md, 2026-12-07). Elsewhere one 2-D matmul
    (``heads_rows_first``), as ``apply_projection``. The same products either way.
    """
    x, kernel = nnx.nn.dtypes.promote_dtype((x, linear.kernel[...]), dtype=linear.dtype)
    multiplier = None if scale is None else jnp.asarray(scale, x.dtype)

    def branch(form):
        return lambda x, kernel: form(x, kernel, num_heads, multiplier)

    return jax.lax.platform_dependent(
        x, kernel, tpu=branch(heads_channels_first), default=branch(heads_rows_first)
    )


def heads_rows_first(x, kernel, num_heads: int, multiplier=None) -> jax.Array:
    """(B, H, W, C) @ (C, N·d) [· multiplier] as one 2-D matmul -> (B, H, W, N, d)."""
    y = x.reshape(-1, x.shape[-1]) @ kernel
    y = y if multiplier is None else y * multiplier
    return split_heads(y.reshape(*x.shape[:-1], -1), num_heads)


def heads_channels_first(x, kernel, num_heads: int, multiplier=None) -> jax.Array:
    """``heads_rows_first`` computed as W'ᵀ·x per image, W's columns ordered (d, N)."""
    batch, height, width, channels = x.shape
    by_channel = kernel.reshape(channels, num_heads, -1).transpose(0, 2, 1)  # (C, d, N)
    positions = x.reshape(batch, height * width, channels)
    # (B, d, N, P): in memory the (B, d·N, P) frame. d and N stay two axes: merging them
    # is a reshape that a mesh axis over the heads (tensor parallel, explicit axes) refuses.
    y = jnp.einsum("cdn,bpc->bdnp", by_channel, positions)
    y = y if multiplier is None else y * multiplier
    return jnp.transpose(y, (0, 3, 2, 1)).reshape(batch, height, width, num_heads, -1)


def in_dtype(dtype, *params: nnx.Param) -> tuple[jax.Array, ...]:
    """The parameters' values in the compute dtype (unchanged when it is None)."""
    return tuple(p[...] if dtype is None else p[...].astype(dtype) for p in params)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, N, C // N)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def check_input(x: jax.Array, in_features: int, module: str) -> None:
    if x.ndim != 4 or x.shape[-1] != in_features:
        raise ValueError(
            f"{module} expects input (batch, height, width, {in_features}) "
            f"(in_features={in_features}); got shape {x.shape}."
        )


def head_width(out_features: int, num_heads: int, pos_encoding: str = "relative") -> int:
    """d = out_features / num_heads; even where a positional encoding splits it."""
    if out_features % num_heads:
        raise ArgumentError(
            "num_heads",
            num_heads,
            f"must divide the {out_features} channels of {{where}} (out_features={out_features} "
            f"is not divisible by num_heads={num_heads}); change num_heads or the width",
        )
    head_dim = out_features // num_heads
    if pos_encoding != "none" and head_dim % 2:
        raise ArgumentError(
            "num_heads",
            num_heads,
            f"gives heads of odd width {head_dim} in {{where}}: the head width out_features / "
            f"num_heads = {head_dim} must be even for pos_encoding={pos_encoding!r} (half "
            "encodes rows, half columns); change num_heads or the width",
        )
    return head_dim
