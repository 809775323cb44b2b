"""Flax NNX layers on top of the functional core: the SASA layer and the attention stem.

Decisions taken where the paper is silent are marked "Choice:" in the docstrings;
each one that a researcher could reasonably want otherwise is an argument.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_flax.ops import block_local_attention, local_attention
from sasa_flax.ops.local_attention import (
    IMPLEMENTATIONS,
    validate_kernel_size,
    validate_padding,
)

POS_ENCODINGS = ("relative", "absolute", "none")
RELATIVE_TABLES = ("shared", "per_head")
STEM_VARIANTS = ("spatially_aware", "stand_alone", "conv_values")

Dtype = Any


def sinusoidal_2d(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed 2-D sinusoidal encoding of absolute pixel positions (paper Table 5).

    The first ``dim // 2`` channels encode the row, the rest the column, each with
    the Transformer's interleaved sin/cos at geometrically spaced frequencies.

    Returns:
      float32 (height, width, dim).
    """

    def encode(positions: int, channels: int) -> np.ndarray:  # (positions, channels)
        pair = np.arange(channels) // 2
        inv_freq = 1.0 / (10000.0 ** (2.0 * pair / max(channels, 1)))
        angles = np.arange(positions)[:, None] * inv_freq[None, :]
        return np.where(np.arange(channels) % 2 == 0, np.sin(angles), np.cos(angles))

    half = dim // 2
    rows = np.broadcast_to(encode(height, half)[:, None, :], (height, width, half))
    cols = np.broadcast_to(encode(width, dim - half)[None, :, :], (height, width, dim - half))
    return np.concatenate([rows, cols], axis=-1).astype(np.float32)


def _projection(in_features, out_features, dtype, param_dtype, rngs) -> nnx.Linear:
    """A bias-free pointwise (1×1) projection: W_Q, W_K or W_V."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _project(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """``linear(x)`` for (..., C) inputs, computed as one 2-D matmul.

    Same parameters and result as calling the module, whose dot_general contracts the
    last axis of a 4-D input. On CPU (jax 0.10.2) XLA runs that form and its gradient
    far slower: one SelfAttention2D at 56²×64, k = 7, batch 8, forward+backward took
    520 ms with it and 309 ms with this (benchmarks/RESULTS.md).
    """
    x, kernel = nnx.nn.dtypes.promote_dtype((x, linear.kernel[...]), dtype=linear.dtype)
    y = x.reshape(-1, x.shape[-1]) @ kernel
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _in_dtype(dtype, *params: nnx.Param) -> tuple[jax.Array, ...]:
    """The parameters' values in the compute dtype (unchanged when it is None)."""
    return tuple(p[...] if dtype is None else p[...].astype(dtype) for p in params)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, N, C // N)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _check_input(x: jax.Array, in_features: int, module: str) -> None:
    if x.ndim != 4 or x.shape[-1] != in_features:
        raise ValueError(
            f"{module} expects input (batch, height, width, {in_features}) "
            f"(in_features={in_features}); got shape {x.shape}."
        )


def _check_heads(out_features: int, num_heads: int) -> int:
    if num_heads < 1 or out_features % num_heads:
        raise ValueError(
            f"out_features={out_features} must be divisible by num_heads={num_heads}; "
            "choose num_heads among its divisors."
        )
    return out_features // num_heads


class SelfAttention2D(nnx.Module):
    """Stand-alone local self-attention (paper Eq. 3), a drop-in for a k×k convolution.

    (B, H, W, in_features) -> (B, H, W, out_features). Each pixel attends over its
    k×k neighbourhood with ``num_heads`` heads of width d = out_features / num_heads;
    heads are concatenated with no output projection (the next 1×1 conv mixes them).

    Parameters: dense bias-free 1×1 projections W_Q, W_K, W_V of in×out (no W_K when
    ``content=False``) and, for relative encoding, row and column tables of
    k × d/2 each: 3·in·out + k·d in all with the defaults, so the count hardly
    depends on k (paper Table 4).

    Args:
      in_features, out_features: channels in and out.
      num_heads: N; must divide ``out_features``.
      kernel_size: odd spatial extent k of the neighbourhood.
      pos_encoding: ``"relative"`` (learned row/column offset embeddings, Eq. 3;
        translation-equivariant), ``"absolute"`` or ``"none"`` (Table 5).
        Choice: for ``"absolute"`` the fixed 2-D sinusoid p_ab of the key's pixel
        position (d channels, rows then columns) is added to every head's keys, so
        the logit is q·(k_ab + p_ab): the same form as the relative term with
        absolute positions and nothing learned.
      content: if False, no W_K and no q·k term: logits are q·r alone (Table 6).
        Needs a positional encoding (with ``"absolute"`` the keys are p_ab alone).
      padding: ``"mask"`` (out-of-image neighbours excluded from the softmax) or
        ``"zeros"`` (zero keys/values that take part). Choice: mask by default;
        the paper is silent and zero padding biases border pixels.
      scale_queries: multiply q by d^-1/2 (Choice: on, as in Transformers; the
        paper does not say).
      relative_tables: ``"shared"`` by all heads (Choice, the paper's reading) or
        ``"per_head"`` (N times the table parameters).
      impl: the ``local_attention`` implementation.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
      rngs: ``nnx.Rngs`` for initialisation.

    Initialisation (Choice): projections LeCun normal (fan-in, unit gain: they are
    linear maps with no nonlinearity before the softmax); relative tables
    N(0, d^-1/2), as HaloNet and timm do, so that at initialisation the positional
    logits are smaller than the content logits.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_heads: int = 8,
        kernel_size: int = 7,
        pos_encoding: str = "relative",
        content: bool = True,
        padding: str = "mask",
        scale_queries: bool = True,
        relative_tables: str = "shared",
        impl: str = "auto",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = _check_heads(out_features, num_heads)
        validate_kernel_size(kernel_size)
        validate_padding(padding)
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}; got {pos_encoding!r}.")
        if relative_tables not in RELATIVE_TABLES:
            raise ValueError(
                f"relative_tables must be one of {RELATIVE_TABLES}; got {relative_tables!r}."
            )
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {impl!r}.")
        if not content and pos_encoding == "none":
            raise ValueError(
                "content=False with pos_encoding='none' leaves no logit at all; use "
                "pos_encoding='relative' (the paper's position-only ablation) or content=True."
            )
        if pos_encoding != "none" and head_dim % 2:
            raise ValueError(
                f"the head width out_features / num_heads = {head_dim} must be even for "
                f"pos_encoding={pos_encoding!r} (half encodes rows, half columns); change "
                "out_features or num_heads."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        self.pos_encoding = pos_encoding
        self.content = content
        self.padding = padding
        self.scale_queries = scale_queries
        self.relative_tables = relative_tables
        self.impl = impl
        self.dtype = dtype

        linear = functools.partial(_projection, in_features, out_features, dtype, param_dtype, rngs)
        self.query = linear()
        self.key = linear() if content else None
        self.value = linear()
        if pos_encoding == "relative":
            shape = (kernel_size, head_dim // 2)
            if relative_tables == "per_head":
                shape = (num_heads, *shape)
            init = nnx.initializers.normal(stddev=head_dim**-0.5)
            self.rel_row = nnx.Param(init(rngs.params(), shape, param_dtype))
            self.rel_col = nnx.Param(init(rngs.params(), shape, param_dtype))
        else:
            self.rel_row = self.rel_col = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H, W, out_features)."""
        _check_input(x, self.in_features, "SelfAttention2D")
        batch, height, width, _ = x.shape
        q = _split_heads(_project(self.query, x), self.num_heads)
        if self.scale_queries:
            q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        k = _split_heads(_project(self.key, x), self.num_heads) if self.content else None
        v = _split_heads(_project(self.value, x), self.num_heads)
        if self.pos_encoding == "absolute":
            p = jnp.asarray(sinusoidal_2d(height, width, self.head_dim), q.dtype)
            p = jnp.broadcast_to(p[None, :, :, None, :], q.shape)
            k = p if k is None else k + p
        attend = functools.partial(
            local_attention, kernel_size=self.kernel_size, padding=self.padding, impl=self.impl
        )
        if self.rel_row is None:
            y = attend(q, k, v)
        else:
            rel_row, rel_col = _in_dtype(self.dtype, self.rel_row, self.rel_col)
            if self.relative_tables == "shared":
                y = attend(q, k, v, rel_row, rel_col)
            else:
                y = _per_head(attend, q, k, v, rel_row, rel_col)
        return y.reshape(batch, height, width, self.out_features)


def _per_head(attend, q, k, v, rel_row, rel_col):
    """Runs ``attend`` once per head (vmapped), each head with its own tables."""

    def one_head(q, k, v, rel_row, rel_col):  # q: (B, H, W, d) -> one-head call
        expand = lambda t: None if t is None else t[..., None, :]
        return attend(expand(q), expand(k), expand(v), rel_row, rel_col)[..., 0, :]

    k_axis = None if k is None else 3
    return jax.vmap(one_head, in_axes=(3, k_axis, 3, 0, 0), out_axes=3)(q, k, v, rel_row, rel_col)


class AttentionStem(nnx.Module):
    """The attention stem (paper §3.2, A.1, Table 7): (B, H, W, 3) -> (B, H/4, W/4, 64).

    Attention within each non-overlapping ``block_size``² block (4×4), then
    BatchNorm, ReLU and a ``pool_size``² max pool with stride ``pool_size`` (4×4),
    which takes 224² to 56² as the convolutional stem does. Logits are those of
    Eq. 3 inside the block: q·k plus learned relative row/column embeddings of the
    in-block offset (2·block_size − 1 rows each), q scaled by d^-1/2.

    Variants (``variant``), differing only in the values:
      ``"spatially_aware"`` (the paper's best): v~_ab = (Σ_m p(a,b,m) W_V^m) x_ab with
        p(a,b,m) = softmax_m((emb_row[a] + emb_col[b]) · ν_m), (a, b) the absolute
        position inside the block; p is shared across heads.
      ``"stand_alone"``: plain v = W_V x (Eq. 3 in the stem).
      ``"conv_values"``: values from a spatial convolution of the input
        (``value_kernel_size``², SAME padding over the whole image, no bias).

    Choices where the paper is silent: 64 output channels, 4 heads, m = 4
    (the paper says the mixture is shared across 4 heads); the position
    embeddings emb_row / emb_col have the head width d = 16 and are initialised
    N(0, 1) with ν_m = 0, so p starts uniform rather than near one-hot; W_V^m are
    LeCun-normal over the input channels each; a 3×3 value convolution for
    ``"conv_values"``; BatchNorm momentum 0.9 (the ResNet body's setting);
    H and W must be multiples of the block and pool sizes.
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        *,
        variant: str = "spatially_aware",
        num_heads: int = 4,
        block_size: int = 4,
        pool_size: int = 4,
        num_mixtures: int = 4,
        value_kernel_size: int = 3,
        bn_momentum: float = 0.9,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if variant not in STEM_VARIANTS:
            raise ValueError(f"variant must be one of {STEM_VARIANTS}; got {variant!r}.")
        head_dim = _check_heads(out_features, num_heads)
        if head_dim % 2:
            raise ValueError(
                f"the head width out_features / num_heads = {head_dim} must be even "
                "(half for row offsets, half for column offsets)."
            )
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures must be at least 1; got {num_mixtures}.")
        self.in_features = in_features
        self.out_features = out_features
        self.variant = variant
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.pool_size = pool_size
        self.dtype = dtype

        linear = functools.partial(_projection, in_features, out_features, dtype, param_dtype, rngs)
        self.query = linear()
        self.key = linear()
        table_init = nnx.initializers.normal(stddev=head_dim**-0.5)
        table_shape = (2 * block_size - 1, head_dim // 2)
        self.rel_row = nnx.Param(table_init(rngs.params(), table_shape, param_dtype))
        self.rel_col = nnx.Param(table_init(rngs.params(), table_shape, param_dtype))
        # One assignment per attribute: NNX fixes an attribute first set to None as static.
        self.value = linear() if variant == "stand_alone" else None
        self.value_conv = (
            nnx.Conv(
                in_features,
                out_features,
                (value_kernel_size, value_kernel_size),
                padding="SAME",
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if variant == "conv_values"
            else None
        )
        if variant == "spatially_aware":
            per_matrix = nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
            )
            self.value_mixture = nnx.Param(
                per_matrix(rngs.params(), (num_mixtures, in_features, out_features), param_dtype)
            )
            emb = nnx.initializers.normal(stddev=1.0)
            self.emb_row = nnx.Param(emb(rngs.params(), (block_size, head_dim), param_dtype))
            self.emb_col = nnx.Param(emb(rngs.params(), (block_size, head_dim), param_dtype))
            # ν_m = 0: p starts uniform over the m matrices; its gradient
            # Σ_ab ∂L/∂logit · emb_ab is non-zero because the embeddings are random.
            self.mixture_logit_vectors = nnx.Param(jnp.zeros((num_mixtures, head_dim), param_dtype))
        else:
            self.value_mixture = self.emb_row = self.emb_col = self.mixture_logit_vectors = None
        self.bn = nnx.BatchNorm(
            out_features, momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def mixture_weights(self) -> jax.Array:
        """p(a, b, m): (block_size, block_size, num_mixtures), summing to 1 over m."""
        emb = self.emb_row[...][:, None, :] + self.emb_col[...][None, :, :]
        return jax.nn.softmax(emb @ self.mixture_logit_vectors[...].T, axis=-1)

    def values(self, x: jax.Array) -> jax.Array:
        """The variant's values, (B, H, W, out_features)."""
        if self.variant == "stand_alone":
            return _project(self.value, x)
        if self.variant == "conv_values":
            return self.value_conv(x)
        height, width = x.shape[1:3]
        p = self.mixture_weights()
        # Absolute position inside the block of every pixel: (H, W, m).
        p = p[np.arange(height) % self.block_size][:, np.arange(width) % self.block_size]
        w = self.value_mixture[...]
        if self.dtype is not None:
            x, w, p = x.astype(self.dtype), w.astype(self.dtype), p.astype(self.dtype)
        per_matrix = jnp.einsum("bhwc,mcd->bhwmd", x, w)
        return jnp.einsum("bhwmd,hwm->bhwd", per_matrix, p)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H / pool_size, W / pool_size, out_features)."""
        _check_input(x, self.in_features, "AttentionStem")
        height, width = x.shape[1:3]
        multiple = np.lcm(self.block_size, self.pool_size)
        if height % multiple or width % multiple:
            raise ValueError(
                f"AttentionStem needs height and width that are multiples of {multiple} "
                f"(block_size={self.block_size}, pool_size={self.pool_size}); got "
                f"{height}×{width}. Resize or crop the images."
            )
        split = functools.partial(_split_heads, num_heads=self.num_heads)
        q = split(_project(self.query, x))
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        rel_row, rel_col = _in_dtype(self.dtype, self.rel_row, self.rel_col)
        y = block_local_attention(
            q,
            split(_project(self.key, x)),
            split(self.values(x)),
            rel_row,
            rel_col,
            block_size=self.block_size,
        )
        y = y.reshape(*x.shape[:3], self.out_features)
        y = nnx.relu(self.bn(y))
        window = (self.pool_size, self.pool_size)
        return nnx.max_pool(y, window_shape=window, strides=window)
