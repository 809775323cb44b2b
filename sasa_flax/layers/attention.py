"""``SelfAttention2D``, the SASA layer (paper Eq. 3), and its cost in the paper's convention.

Decisions taken where the paper is silent are marked "Choice:" in the docstrings; each one
that a researcher could reasonably want otherwise is an option (``AttentionOptions``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sasa_flax.costs import register_cost
from sasa_flax.layers.common import (
    Dtype,
    check_input,
    head_width,
    in_dtype,
    make_projection,
    project_heads,
)
from sasa_flax.layers.options import AttentionOptions
from sasa_flax.ops import local_attention, patches


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
        head_dim = head_width(out_features, options.num_heads, options.pos_encoding)
        self.options = options
        self.in_features = in_features
        self.out_features = out_features
        self.head_dim = head_dim
        self.dtype = dtype
        num_heads, kernel_size, content = options.num_heads, options.kernel_size, options.content
        pos_encoding, relative_tables = options.pos_encoding, options.relative_tables

        linear = functools.partial(
            make_projection, in_features, out_features, dtype, param_dtype, rngs
        )
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

    def _qkv(self, x: jax.Array):
        """q (scaled), k (with the absolute encoding, or None), v: (B, H, W, N, d)."""
        check_input(x, self.in_features, "SelfAttention2D")
        o = self.options
        _, height, width, _ = x.shape
        with jax.named_scope("projection"):
            # Scaled inside the projection, in the layout it is computed in: on TPU an
            # array with d on the lanes is padded to 128 of them, and a product over it
            # (and its gradient) cost as much as the projection (libtpu's schedule).
            scale = self.head_dim**-0.5 if o.scale_queries else None
            q = project_heads(self.query, x, o.num_heads, scale)
            k = project_heads(self.key, x, o.num_heads) if o.content else None
            v = project_heads(self.value, x, o.num_heads)
        if o.pos_encoding == "absolute":
            p = jnp.asarray(sinusoidal_2d(height, width, self.head_dim), q.dtype)
            p = jnp.broadcast_to(p[None, :, :, None, :], q.shape)
            k = p if k is None else k + p
        return q, k, v

    def _tables(self) -> tuple[jax.Array | None, jax.Array | None]:
        """The relative row and column tables in the compute dtype, or (None, None)."""
        if self.rel_row is None:
            return None, None
        return in_dtype(self.dtype, self.rel_row, self.rel_col)

    def attention_weights(self, x: jax.Array, positions) -> tuple[jax.Array, np.ndarray]:
        """The softmax weights of the query pixels ``positions`` = [(i, j), ...]:
        (B, P, N, k, k), and the (P, k, k) mask of neighbours inside the image. Lean
        (no whole-image patches), for any ``impl``: what ``sasa_flax.visualize`` draws."""
        q, k, _ = self._qkv(x)
        o = self.options
        return patches.weights_at(
            q, k, *self._tables(), positions, kernel_size=o.kernel_size, padding=o.padding
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_features) -> (B, H, W, out_features)."""
        batch, height, width, _ = x.shape
        q, k, v = self._qkv(x)
        o = self.options
        attend = functools.partial(
            local_attention, kernel_size=o.kernel_size, padding=o.padding, impl=o.impl
        )
        rel_row, rel_col = self._tables()
        if rel_row is None:
            y = attend(q, k, v)
        elif o.relative_tables == "shared":
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
