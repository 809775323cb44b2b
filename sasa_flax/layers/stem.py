"""``AttentionStem``, the attention stem (paper §3.2, A.1, Table 7), and its cost.

Decisions taken where the paper is silent are marked "Choice"/"Choices" in the docstring;
the ones a researcher could reasonably want otherwise are options (``StemOptions``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax.costs import register_cost
from sasa_flax.layers.common import (
    Dtype,
    apply_projection,
    check_input,
    head_width,
    in_dtype,
    make_projection,
)
from sasa_flax.layers.options import StemOptions
from sasa_flax.ops.block_attention import attention_in_blocks, from_blocks, to_blocks


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
        head_dim = head_width(out_features, options.num_heads)
        self.options = options
        self.in_features = in_features
        self.out_features = out_features
        self.head_dim = head_dim
        self.dtype = dtype
        variant, block_size = options.variant, options.block_size
        num_mixtures, value_kernel_size = options.num_mixtures, options.value_kernel_size

        linear = functools.partial(
            make_projection, in_features, out_features, dtype, param_dtype, rngs
        )
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

    def mixture_weights(self) -> jax.Array:
        """p(a, b, m): (block_size, block_size, num_mixtures), summing to 1 over m."""
        emb = self.emb_row[...][:, None, :] + self.emb_col[...][None, :, :]
        return jax.nn.softmax(emb @ self.mixture_logit_vectors[...].T, axis=-1)

    def values(self, x: jax.Array) -> jax.Array:
        """The variant's values, (B, H, W, out_features)."""
        if self.options.variant == "stand_alone":
            return apply_projection(self.value, x)
        if self.options.variant == "conv_values":
            return self.value_conv(x)
        # p depends only on the position inside the block, so the m value matrices are
        # mixed first, one matrix per block position: the same sum as Σ_m p_m (W_m x),
        # without the (B, H, W, m, out_features) tensor of every W_m x and its gradient.
        mixed = self._mixed_matrices()
        if self.dtype is not None:
            x = x.astype(self.dtype)
        b = self.options.block_size
        batch, height, width, channels = x.shape
        blocks = x.reshape(batch, height // b, b, width // b, b, channels)
        v = jnp.einsum("byaxec,aecd->byaxed", blocks, mixed)
        return v.reshape(batch, height, width, self.out_features)

    def _mixed_matrices(self) -> jax.Array:
        """Σ_m p(a, b, m) W_V^m per block position: (b, b, in_features, out_features),
        in the compute dtype."""
        mixed = jnp.einsum("abm,mcd->abcd", self.mixture_weights(), self.value_mixture[...])
        return mixed if self.dtype is None else mixed.astype(self.dtype)

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
        strips = _stem_strips(height, width, self.options.block_size)
        # "conv_values" convolves across strip edges: its values come from the whole image.
        values = self.values(x) if self.options.variant == "conv_values" else None
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
        out_features); ``values`` (B, H, W, out_features) if computed already.

        Computed in the blocked layout (``ops.block_attention.to_blocks``): the input (3
        channels) is moved into it once and q, k and v are projected there, one matrix per
        block position for the spatially-aware values; only the output moves back. In
        libtpu's schedule the stem's step at 16 images went from 253 M to 92 M cycles
        against moving q, k and v (64 channels each) into blocks (benchmarks/RESULTS.md,
        2026-12-07)."""
        o, b = self.options, self.options.block_size
        blocks = to_blocks(x, b)  # (in_features, b², M)

        def project(linear):
            inputs, kernel = nnx.nn.dtypes.promote_dtype(
                (blocks, linear.kernel[...]), dtype=linear.dtype
            )
            return jnp.einsum("co,cpm->opm", kernel, inputs)

        q = project(self.query)
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        if values is not None or o.variant == "conv_values":
            v = to_blocks(self.values(x) if values is None else values, b)
        elif o.variant == "stand_alone":
            v = project(self.value)
        else:  # one mixed matrix per block position, as ``values``
            mixed = self._mixed_matrices().reshape(b * b, self.in_features, -1)
            inputs = blocks if self.dtype is None else blocks.astype(self.dtype)
            v = jnp.einsum("pco,cpm->opm", mixed, inputs)
        rel_row, rel_col = in_dtype(self.dtype, self.rel_row, self.rel_col)
        y = attention_in_blocks(
            q, project(self.key), v, rel_row, rel_col, block_size=b, num_heads=o.num_heads
        )
        return from_blocks(y, x.shape[:3], b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H / pool_size, W / pool_size, out_features)."""
        check_input(x, self.in_features, "AttentionStem")
        self.options.check_image_size(*x.shape[1:3])
        y = self.attend_in_strips(x)
        y = nnx.relu(self.bn(y))
        window = (self.options.pool_size, self.options.pool_size)
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
