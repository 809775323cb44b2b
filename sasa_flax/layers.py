"""Flax NNX layers on top of the functional core: the SASA layer and the attention stem.

Decisions taken where the paper is silent are marked "Choice:" in the docstrings;
each one that a researcher could reasonably want otherwise is an argument.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_flax.costs import register_cost
from sasa_flax.errors import ArgumentError, check_one_of, check_options
from sasa_flax.ops import block_local_attention, local_attention, patches
from sasa_flax.ops.local_attention import validate_impl, validate_kernel_size, validate_padding

POS_ENCODINGS = ("relative", "absolute", "none")
RELATIVE_TABLES = ("shared", "per_head")
STEM_VARIANTS = ("spatially_aware", "stand_alone", "conv_values")

Dtype = Any


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Every option of ``SelfAttention2D``, checked once, here, when it is made.

    Frozen and typed: a model passes one object to every attention layer it builds, so an
    option cannot reach one layer and miss another. ``SelfAttention2D`` documents each
    field; the model config names them the same (``impl`` is ``attention_impl`` there).
    """

    num_heads: int = 8
    kernel_size: int = 7
    pos_encoding: str = "relative"
    content: bool = True
    padding: str = "mask"
    relative_tables: str = "shared"
    scale_queries: bool = True
    impl: str = "auto"

    def __post_init__(self):
        check_options(self)
        if self.num_heads < 1:
            raise ArgumentError("num_heads", self.num_heads, "must be a positive integer")
        validate_kernel_size(self.kernel_size)
        validate_padding(self.padding)
        check_one_of("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        check_one_of("relative_tables", self.relative_tables, RELATIVE_TABLES)
        validate_impl(self.impl)
        if not self.content and self.pos_encoding == "none":
            raise ArgumentError(
                "content",
                self.content,
                "must be True when pos_encoding='none': content=False with "
                "pos_encoding='none' leaves no attention logit; use pos_encoding='relative' "
                "(the paper's Table 6 ablation) or content=True",
            )


@dataclasses.dataclass(frozen=True)
class StemOptions:
    """Every option of ``AttentionStem`` (which documents them), checked once, here.

    The model config names them with a ``stem_`` prefix (``stem_block_size``, ...).
    """

    variant: str = "spatially_aware"
    num_heads: int = 4
    block_size: int = 4
    pool_size: int = 4
    num_mixtures: int = 4
    value_kernel_size: int = 3

    def __post_init__(self):
        check_options(self)
        check_one_of("variant", self.variant, STEM_VARIANTS)
        for name in ("num_heads", "block_size", "pool_size", "num_mixtures"):
            if getattr(self, name) < 1:
                raise ArgumentError(name, getattr(self, name), "must be a positive integer")
        validate_kernel_size(self.value_kernel_size, "value_kernel_size")

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return int(np.lcm(self.block_size, self.pool_size))

    def check_image_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ArgumentError(
                "image_size",
                (height, width) if height != width else height,
                f"must be a multiple of {multiple} with the attention stem: height and width "
                f"must be multiples of {multiple} (block_size={self.block_size}, "
                f"pool_size={self.pool_size}); resize or crop the images",
            )


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
    far slower (benchmarks/RESULTS.md, the projection fix of 2026-11-26).
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


def _head_width(out_features: int, num_heads: int, pos_encoding: str = "relative") -> int:
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
      options: an ``AttentionOptions``; ``**option_fields`` (any of its fields, e.g.
        ``kernel_size=5``) replace its values. Its fields:
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
        options: AttentionOptions | None = None,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        **option_fields,
    ):
        options = dataclasses.replace(options or AttentionOptions(), **option_fields)
        head_dim = _head_width(out_features, options.num_heads, options.pos_encoding)
        self.options = options
        self.in_features = in_features
        self.out_features = out_features
        self.head_dim = head_dim
        self.dtype = dtype
        num_heads, kernel_size, content = options.num_heads, options.kernel_size, options.content
        pos_encoding, relative_tables = options.pos_encoding, options.relative_tables

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

    num_heads = property(lambda self: self.options.num_heads)
    kernel_size = property(lambda self: self.options.kernel_size)
    pos_encoding = property(lambda self: self.options.pos_encoding)
    content = property(lambda self: self.options.content)
    padding = property(lambda self: self.options.padding)
    scale_queries = property(lambda self: self.options.scale_queries)
    relative_tables = property(lambda self: self.options.relative_tables)
    impl = property(lambda self: self.options.impl)

    def _qkv(self, x: jax.Array):
        """q (scaled), k (with the absolute encoding, or None), v: (B, H, W, N, d)."""
        _check_input(x, self.in_features, "SelfAttention2D")
        _, height, width, _ = x.shape
        q = _split_heads(_project(self.query, x), self.num_heads)
        if self.scale_queries:
            q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        k = _split_heads(_project(self.key, x), self.num_heads) if self.content else None
        v = _split_heads(_project(self.value, x), self.num_heads)
        if self.pos_encoding == "absolute":
            p = jnp.asarray(sinusoidal_2d(height, width, self.head_dim), q.dtype)
            p = jnp.broadcast_to(p[None, :, :, None, :], q.shape)
            k = p if k is None else k + p
        return q, k, v

    def attention_weights(self, x: jax.Array, positions) -> tuple[jax.Array, np.ndarray]:
        """The softmax weights of the query pixels ``positions`` = [(i, j), ...]:
        (B, P, N, k, k), and the (P, k, k) mask of neighbours inside the image. Lean
        (no whole-image patches), for any ``impl``: what ``sasa_flax.visualize`` draws."""
        q, k, _ = self._qkv(x)
        rel = (
            (None, None)
            if self.rel_row is None
            else _in_dtype(self.dtype, self.rel_row, self.rel_col)
        )
        return patches.weights_at(
            q, k, *rel, positions, kernel_size=self.kernel_size, padding=self.padding
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H, W, out_features)."""
        batch, height, width, _ = x.shape
        q, k, v = self._qkv(x)
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


def attention_cost(
    options: AttentionOptions,
    in_features: int,
    out_features: int,
    height: int,
    width: int,
    *,
    factored_relative: bool = False,
) -> tuple[int, int]:
    """(parameters, FLOPs) of a ``SelfAttention2D`` at H×W, in the paper's convention:

        2·H·W·[ (3 or 2)·d_in·d_out        Q, K, V projections (no K without content)
              + k²·d_out · (#logit terms)   q·k and q·r, each a d-wide dot per neighbour
              + k²·d_out ]                  the weighted sum of values

    The relative term is counted as Eq. 3 writes it, a full q·r dot per neighbour. (The
    implementation factors it as q_row·rel_row + q_col·rel_col, k·d_out instead, which
    ``factored_relative=True`` counts; counted that way ResNet-50 with attention would come
    to 6.8 B instead of the paper's 7.0 B, outside Table 1's precision, so the paper counts
    it per neighbour.) Absolute encoding adds p to the keys: one dot, like q·k.
    """
    o, k = options, options.kernel_size
    projections = (3 if o.content else 2) * in_features * out_features
    content_terms = int(o.content or o.pos_encoding == "absolute")
    relative = o.pos_encoding == "relative"
    relative_taps = (k if factored_relative else k * k) if relative else 0
    per_pixel = (
        projections
        + k * k * out_features * content_terms
        + relative_taps * out_features
        + k * k * out_features
    )
    params = projections
    if relative:
        tables = k * (out_features // o.num_heads)  # row and column tables, k × d/2 each
        params += tables * (o.num_heads if o.relative_tables == "per_head" else 1)
    return params, 2 * height * width * per_pixel


@register_cost(SelfAttention2D)
def _attention_rule(layer: SelfAttention2D, in_shape, *, in_image_taps_only: bool):
    del in_image_taps_only  # every neighbour is computed, masked or not
    batch, height, width, _ = in_shape
    params, flops = attention_cost(
        layer.options, layer.in_features, layer.out_features, height, width
    )
    return params, flops, (batch, height, width, layer.out_features)


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

    Memory (an implementation choice, the function is unchanged): the spatially-aware
    values are computed as one mixed matrix per block position (p depends only on the
    position), never as m value maps; at 128² and more the attention runs one strip of
    blocks at a time and is recomputed in the backward (``attend_in_strips``).

    Args:
      in_features, out_features: channels in and out.
      options: a ``StemOptions`` (variant, num_heads, block_size, pool_size,
        num_mixtures, value_kernel_size); ``**option_fields`` replace its values.
      norm: the normalisation after attention, ``norm(features, rngs=...)``; default
        ``nnx.BatchNorm`` with ``bn_momentum`` (a model passes its own, so that its
        BatchNorm settings reach the stem too).
      dtype, param_dtype, rngs: as ``SelfAttention2D``.
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 64,
        options: StemOptions | None = None,
        *,
        norm: Callable[..., nnx.Module] | None = None,
        bn_momentum: float = 0.9,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        **option_fields,
    ):
        options = dataclasses.replace(options or StemOptions(), **option_fields)
        head_dim = _head_width(out_features, options.num_heads)
        self.options = options
        self.in_features = in_features
        self.out_features = out_features
        self.head_dim = head_dim
        self.dtype = dtype
        variant, block_size = options.variant, options.block_size
        num_mixtures, value_kernel_size = options.num_mixtures, options.value_kernel_size

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
        if norm is None:
            norm = functools.partial(
                nnx.BatchNorm, momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype
            )
        self.bn = norm(out_features, rngs=rngs)

    variant = property(lambda self: self.options.variant)
    num_heads = property(lambda self: self.options.num_heads)
    block_size = property(lambda self: self.options.block_size)
    pool_size = property(lambda self: self.options.pool_size)

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
        # p depends only on the position inside the block, so the m value matrices are
        # mixed first, one matrix per block position: the same sum as Σ_m p_m (W_m x),
        # without the (B, H, W, m, out_features) tensor of every W_m x and its gradient.
        mixed = jnp.einsum("abm,mcd->abcd", self.mixture_weights(), self.value_mixture[...])
        if self.dtype is not None:
            x, mixed = x.astype(self.dtype), mixed.astype(self.dtype)
        b = self.block_size
        batch, height, width, channels = x.shape
        blocks = x.reshape(batch, height // b, b, width // b, b, channels)
        v = jnp.einsum("byaxec,aecd->byaxed", blocks, mixed)
        return v.reshape(batch, height, width, self.out_features)

    def attend_in_strips(self, x: jax.Array) -> jax.Array:
        """``attend(x)`` computed one horizontal strip of blocks at a time and
        rematerialised: the same values, a fraction of the memory.

        At 224² the stem's q, k, v and block logits are the largest arrays of the whole
        network (full resolution, float32 logits for 16 keys per pixel), where a conv
        stem keeps one 112² map. The backward pass recomputes them from x
        (``jax.checkpoint``: a small part of the stem's FLOPs) instead of keeping them,
        and ``lax.map`` over strips (whole rows of blocks, every image of the batch, so
        nothing moves between devices) holds one strip's at a time. Strips: the largest
        divisor of H / block_size up to ``STEM_STRIPS``, for images of 128² and more.
        """
        batch, height, width, _ = x.shape
        attend = jax.checkpoint(self.attend)
        strips = _stem_strips(height, width, self.block_size)
        # "conv_values" convolves across strip edges: its values come from the whole image.
        values = self.values(x) if self.variant == "conv_values" else None
        if strips == 1:
            return attend(x, values)

        def in_strips(a):  # (B, H, ...) -> (strips, B, H / strips, ...); None stays None
            if a is None:
                return None
            return a.reshape(batch, strips, height // strips, *a.shape[2:]).swapaxes(0, 1)

        ys = jax.lax.map(lambda xv: attend(*xv), (in_strips(x), in_strips(values)))
        return ys.swapaxes(0, 1).reshape(batch, height, width, self.out_features)

    def attend(self, x: jax.Array, values: jax.Array | None = None) -> jax.Array:
        """Block attention before the norm: (B, H, W, in_features) -> (B, H, W,
        out_features); ``values`` (B, H, W, out_features) if computed already."""
        split = functools.partial(_split_heads, num_heads=self.num_heads)
        q = split(_project(self.query, x))
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        rel_row, rel_col = _in_dtype(self.dtype, self.rel_row, self.rel_col)
        y = block_local_attention(
            q,
            split(_project(self.key, x)),
            split(self.values(x) if values is None else values),
            rel_row,
            rel_col,
            block_size=self.block_size,
        )
        return y.reshape(*x.shape[:3], self.out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H / pool_size, W / pool_size, out_features)."""
        _check_input(x, self.in_features, "AttentionStem")
        self.options.check_image_size(*x.shape[1:3])
        y = self.attend_in_strips(x)
        y = nnx.relu(self.bn(y))
        window = (self.pool_size, self.pool_size)
        return nnx.max_pool(y, window_shape=window, strides=window)


STEM_STRIPS = 8


def _stem_strips(height: int, width: int, block_size: int) -> int:
    """How many strips ``AttentionStem.attend_in_strips`` computes one after another."""
    if height * width < 128 * 128:
        return 1
    rows = height // block_size
    return max(s for s in range(1, STEM_STRIPS + 1) if rows % s == 0)


def stem_cost(
    options: StemOptions, in_features: int, out_features: int, height: int, width: int
) -> tuple[int, int]:
    """(parameters, FLOPs) of an ``AttentionStem`` at H×W (its BatchNorm included), in the
    paper's convention: the terms of ``attention_cost`` with block_size² neighbours;
    spatially-aware values cost m·d_in·d_out per pixel for the m value projections plus
    m·d_out to mix them; "conv_values" a value_kernel_size² convolution. The mixture
    weights p(a, b, m) (once per block position) are not counted."""
    o = options
    head_dim = out_features // o.num_heads
    neighbours = o.block_size**2
    params = 2 * in_features * out_features + 2 * (2 * o.block_size - 1) * (head_dim // 2)
    per_pixel = 2 * in_features * out_features + neighbours * out_features * 3
    if o.variant == "stand_alone":
        params += in_features * out_features
        per_pixel += in_features * out_features
    elif o.variant == "conv_values":
        params += o.value_kernel_size**2 * in_features * out_features
        per_pixel += o.value_kernel_size**2 * in_features * out_features
    else:
        m = o.num_mixtures
        params += m * in_features * out_features + 2 * o.block_size * head_dim + m * head_dim
        per_pixel += m * in_features * out_features + m * out_features
    batch_norm = 2 * out_features
    return params + batch_norm, 2 * height * width * per_pixel


@register_cost(AttentionStem)
def _stem_rule(stem: AttentionStem, in_shape, *, in_image_taps_only: bool):
    del in_image_taps_only
    batch, height, width, _ = in_shape
    params, flops = stem_cost(stem.options, stem.in_features, stem.out_features, height, width)
    pool = stem.options.pool_size
    return params, flops, (batch, height // pool, width // pool, stem.out_features)
