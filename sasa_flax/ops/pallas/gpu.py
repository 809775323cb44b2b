"""impl="pallas" on GPUs: fused Pallas kernels lowered through Triton (online softmax,
no attention matrix stored). Its TPU sibling is ``pallas/tpu.py``.

Layout. Each image is zero-padded by r = k // 2 on every side and flattened row by
row, with width Wp = W + 2r, into one "frame" per (batch, head). In that frame the
neighbour (dy, dx) of any pixel is a constant distance away,

    shift(dy, dx) = (dy - r) * Wp + (dx - r),

so every kernel reads a tile of T consecutive frame positions and, for each of the
k² offsets, the tile ``shift`` positions away: contiguous loads of (T, d), no
gathers, no k×k neighbourhood anywhere. Tiles cover whole padded rows, so about
2r / Wp of the work lands on padding columns and is discarded (11% at 56², k = 7).
A window never wraps to the next row because the padding columns separate rows.

Kernels (one program per (batch·head, tile)):
  forward:  for each offset, the logit q·(k_o + r_o) (the relative term folded into
            the key read), masked outside the image under ``"mask"``, then an online
            softmax update of (max, normaliser, weighted sum). Writes y and the
            log-sum-exp; never the (T, k²) weights.
  dq:       recomputes p_o = exp(logit_o - lse), accumulates dq = Σ_o ds_o (k_o + r_o)
            and the per-offset Σ ds_o q for the relative tables (summed outside).
  dk, dv:   one program per key tile gathers from the queries that see it: query at
            key - shift_o, so dk = Σ_o ds_o q_o and dv = Σ_o p_o dy_o, without atomics.
with ds_o = p_o (dy·v_o - Σ dy·y), as in FlashAttention's backward.

Lowering. On GPU the kernels lower through Pallas' Triton backend, which wants
power-of-two tiles: head widths are zero-padded to a power of two (the extra
columns contribute exact zeros).

Verified without a GPU: ``tests/test_pallas_gpu.py`` lowers them to Triton IR for CUDA
(``jax.export``); XLA:GPU and ptxas compile them deviceless for H100 and A100
(tests/test_compile.py; registers, spills and occupancy from ``benchmarks/gpu_kernels.py``);
nothing has been run or timed on a GPU. On CPU they run in Pallas' interpret mode: exact,
and slow (a correctness tool, not a CPU implementation).
TPUs run the Mosaic kernels of ``pallas/tpu.py`` instead: these index frames at
unaligned dynamic starts, which Mosaic refuses.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from sasa_flax.ops.common import (
    MASKED_LOGIT,
    accumulation_dtype,
    offset_vectors,
    relative_table_grads,
)
from sasa_flax.ops.pallas import shards
from sasa_flax.ops.pallas.costs import kernel_costs
from sasa_flax.ops.pallas.failures import KERNEL_NAME_PREFIX

# Query/key positions per program. 128 keeps a (T, 64) float32 tile in registers
# on a GPU; tests pass small tiles to exercise many tiles and their edges.
DEFAULT_TILE = 128

# Selects Pallas' Triton lowering on GPU (jax 0.10 defaults to Mosaic GPU, whose bulk
# copies take at most 256 rows: our kernels index whole frames).
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=1)


def local_attention(
    q,
    k,
    v,
    rel_row,
    rel_col,
    *,
    kernel_size: int,
    padding: str,
    tile: int = DEFAULT_TILE,
    interpret: bool | None = None,
) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype.

    ``tile``: frame positions per program, a power of two. ``interpret``: run the
    kernels in Pallas' interpreter; by default (None) decided per platform when the
    program is lowered: interpreted on CPU, compiled through Triton for CUDA.
    """
    if tile < 1 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two; got {tile}.")
    rel = None if rel_row is None else (rel_row, rel_col)
    frame = Frame.of(q.shape, kernel_size, tile)

    def run(interpreted: bool):
        config = _Config(
            kernel_size=kernel_size,
            padding=padding,
            has_rel=rel is not None,
            frame=frame,
            dtype=accumulation_dtype(q, v),
            head_dim=q.shape[-1],
            value_dim=v.shape[-1],
            input_dtypes=(q.dtype, None if k is None else k.dtype, v.dtype),
            interpret=interpreted,
        )
        return lambda q, k, v, rel: _attention(q, k, v, rel, config)

    if interpret is not None:
        return run(interpret)(q, k, v, rel)
    # Decided when the program is lowered, not when it is traced: exported or lowered
    # for CUDA from a CPU host, the kernels compile through Triton; on CPU they are
    # interpreted.
    return jax.lax.platform_dependent(q, k, v, rel, cpu=run(True), default=run(False))


class Frame(NamedTuple):
    """Geometry of the padded, flattened image shared by all kernels."""

    batch: int
    height: int
    width: int
    heads: int
    radius: int
    tile: int

    @classmethod
    def of(cls, q_shape, kernel_size, tile):
        batch, height, width, heads, _ = q_shape
        return cls(batch, height, width, heads, kernel_size // 2, tile)

    @property
    def padded_width(self) -> int:
        return self.width + 2 * self.radius

    @property
    def num_tiles(self) -> int:
        # Tiles cover the H padded rows that hold queries (and in-image keys).
        return pl.cdiv(self.height * self.padded_width, self.tile)

    @property
    def first(self) -> int:
        """Frame index of tile 0's first position: the front margin r, then r padded rows."""
        return self.radius + self.radius * self.padded_width

    @property
    def length(self) -> int:
        """Frame length: tiles plus a margin of the largest shift on both sides."""
        return 2 * self.first + self.num_tiles * self.tile

    def shift(self, offset):
        """Frame distance from a pixel to its neighbour number ``offset`` (row-major)."""
        size = 2 * self.radius + 1
        # lax.div/rem (C semantics; offset ≥ 0): Python's floor // and % add sign fix-ups
        # that Triton's lowering rejects.
        dy, dx = jax.lax.div(offset, size), jax.lax.rem(offset, size)
        return (dy - self.radius) * self.padded_width + (dx - self.radius)

    def to_frame(self, x: jax.Array, width: int | None = None) -> jax.Array:
        """(B, H, W, N, c) -> (B, N, length, c'), zeros outside the image; c' = ``width``
        or c. Batch and heads stay separate dimensions, so that either may be split over
        devices (``shards``)."""
        r, (batch, _, _, heads, c) = self.radius, x.shape
        x = jnp.pad(x, [(0, 0), (r, r), (r, r), (0, 0), (0, (width or c) - c)])
        x = jnp.moveaxis(x, 3, 1).reshape(batch, heads, -1, width or c)
        tail = self.length - r - x.shape[2]
        return jnp.pad(x, [(0, 0), (0, 0), (r, tail), (0, 0)])

    def from_tiles(self, x: jax.Array, channels: int) -> jax.Array:
        """(B, N, num_tiles·T, c) tile outputs -> (B, H, W, N, channels)."""
        r, pw, (batch, heads) = self.radius, self.padded_width, x.shape[:2]
        x = x[:, :, : self.height * pw, :channels]
        x = x.reshape(batch, heads, self.height, pw, channels)[:, :, :, r : r + self.width]
        return jnp.moveaxis(x, 1, 3)

    def tiles_to_frame(self, x: jax.Array) -> jax.Array:
        """(B, N, num_tiles·T) per-position tile outputs -> (B, N, length)."""
        tail = self.length - self.first - x.shape[-1]
        return jnp.pad(x, [(0, 0), (0, 0), (self.first, tail)])

    def inside(self) -> jax.Array:
        """(length,) 1.0 at frame positions of in-image pixels, else 0.0."""
        ones = jnp.ones((1, self.height, self.width, 1, 1), jnp.float32)
        return self.to_frame(ones)[0, 0, :, 0]


class _Config(NamedTuple):
    kernel_size: int
    padding: str
    has_rel: bool
    frame: Frame
    dtype: jnp.dtype  # of logits, softmax and sums: float32, or float64 for float64 inputs
    head_dim: int  # d and dv before padding to powers of two
    value_dim: int
    input_dtypes: tuple  # of q, k (None without keys), v: the gradients' dtypes
    interpret: bool

    @property
    def has_key(self) -> bool:
        return self.input_dtypes[1] is not None


def _padded_width(n: int) -> int:
    """Head widths go to the next power of two (Triton's tiles must be)."""
    return pl.next_power_of_2(n)


def _full_key(config, key, offset_vector):
    """k_o + r_o, the vector a query is dotted with for offset o: (T, d), or (1, d)
    when there are no keys (position only)."""
    if not config.has_key:
        return offset_vector
    return key + offset_vector if config.has_rel else key


def _load(config, ref, g, start):
    """(T, c) rows start, ..., start + T - 1 of frame g, in the accumulation dtype."""
    return ref[g, pl.ds(start, config.frame.tile), :].astype(config.dtype)


def _offset_row(offsets_ref, o):
    return offsets_ref[pl.ds(o, 1), :]  # (1, d), already in the accumulation dtype


# ----------------------------------------------------------------------------- forward


def _forward_kernel(config, q_ref, k_ref, v_ref, offsets_ref, inside_ref, y_ref, lse_ref):
    frame, tile = config.frame, config.frame.tile
    g, start = pl.program_id(0), frame.first + pl.program_id(1) * tile
    q = _load(config, q_ref, g, start)
    dv = v_ref.shape[-1]

    def step(o, carry):
        running_max, normaliser, acc = carry
        at = start + frame.shift(o)
        key = _load(config, k_ref, g, at) if config.has_key else None
        logit = jnp.sum(q * _full_key(config, key, _offset_row(offsets_ref, o)), axis=-1)
        if config.padding == "mask":
            logit = jnp.where(inside_ref[pl.ds(at, tile)] > 0, logit, MASKED_LOGIT)
        new_max = jnp.maximum(running_max, logit)
        rescale, weight = jnp.exp(running_max - new_max), jnp.exp(logit - new_max)
        acc = acc * rescale[:, None] + weight[:, None] * _load(config, v_ref, g, at)
        return new_max, normaliser * rescale + weight, acc

    init = (
        jnp.full((tile,), MASKED_LOGIT, config.dtype),
        jnp.zeros((tile,), config.dtype),
        jnp.zeros((tile, dv), config.dtype),
    )
    running_max, normaliser, acc = jax.lax.fori_loop(0, config.kernel_size**2, step, init)
    y_ref[...] = (acc / normaliser[:, None]).astype(y_ref.dtype)
    lse_ref[...] = running_max + jnp.log(normaliser)


def _call(config, kernel, name, inputs, out_specs, outputs):
    """``kernel(config, *input refs, *output refs)`` over the (B, N, ...) frames of
    ``inputs`` (whole arrays, indexed by the program ids), on each device's block of
    (batch, heads) (``shards.per_group``), by the kernels' call protocol (Pallas' own):
    an absent input is None (no keys) and the kernel gets None. Frames are the operands
    of rank 3 or more; the offsets' table and the in-image mask are shared. ``outputs(groups)``:
    the output shapes for one device's b·n groups. Everything but the arrays follows from
    ``(config, name)``: the device program is built once per pair (``shards.device_program``)."""
    given = tuple(x is not None for x in inputs)
    on_groups = shards.device_program(
        (config, name), lambda: _on_groups(config, kernel, name, given, out_specs, outputs)
    )
    return shards.per_group(
        on_groups,
        [x is not None and x.ndim >= 3 for x in inputs],
        out_shapes=lambda batch, heads: outputs(batch * heads),
    )(*inputs)


def _on_groups(config, kernel, name, given, out_specs, outputs):
    """``_call``'s ``pallas_call`` on one device's b·n groups."""

    def on_groups(*frames):
        groups = next(x for x in frames if x is not None and x.ndim >= 3).shape[0]
        return pl.pallas_call(
            functools.partial(kernel, config),
            grid=(groups, config.frame.num_tiles),
            in_specs=[pl.no_block_spec if present else None for present in given],
            out_specs=out_specs,
            out_shape=outputs(groups),
            interpret=config.interpret,
            compiler_params=_TRITON,
            name=name,
        )(*frames)

    return on_groups


def _run_forward(config, q_frame, k_frame, v_frame, offsets, inside):
    frame = config.frame
    length, dv = frame.num_tiles * frame.tile, v_frame.shape[-1]
    return _call(
        config,
        _forward_kernel,
        f"{KERNEL_NAME_PREFIX}fwd",
        (q_frame, k_frame, v_frame, offsets, inside),
        [
            pl.BlockSpec((None, frame.tile, dv), lambda g, t: (g, t, 0)),
            pl.BlockSpec((None, frame.tile), lambda g, t: (g, t)),
        ],
        lambda groups: [
            jax.ShapeDtypeStruct((groups, length, dv), config.dtype),
            jax.ShapeDtypeStruct((groups, length), config.dtype),
        ],
    )


# ---------------------------------------------------------------------------- backward


def _dq_kernel(
    config,
    q_ref,
    k_ref,
    v_ref,
    offsets_ref,
    inside_ref,
    dy_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    doff_ref,
):
    frame, tile = config.frame, config.frame.tile
    g, start = pl.program_id(0), frame.first + pl.program_id(1) * tile
    q, dy = _load(config, q_ref, g, start), _load(config, dy_ref, g, start)
    lse = lse_ref[g, pl.ds(start, tile)]
    delta = delta_ref[g, pl.ds(start, tile)]

    def step(o, dq):
        at = start + frame.shift(o)
        key = _load(config, k_ref, g, at) if config.has_key else None
        full_key = _full_key(config, key, _offset_row(offsets_ref, o))
        logit = jnp.sum(q * full_key, axis=-1)
        if config.padding == "mask":
            logit = jnp.where(inside_ref[pl.ds(at, tile)] > 0, logit, MASKED_LOGIT)
        p = jnp.exp(logit - lse)
        ds = p * (jnp.sum(dy * _load(config, v_ref, g, at), axis=-1) - delta)
        # Queries outside the image have dy = 0 and delta = 0, hence ds = 0: they
        # add nothing to the relative tables' gradient.
        doff_ref[pl.ds(o, 1), :] = jnp.sum(ds[:, None] * q, axis=0, keepdims=True)
        return dq + ds[:, None] * full_key

    dq = jax.lax.fori_loop(0, config.kernel_size**2, step, jnp.zeros_like(q))
    dq_ref[...] = dq


def _dkv_kernel(
    config, q_ref, k_ref, v_ref, offsets_ref, inside_ref, dy_ref, lse_ref, delta_ref, dk_ref, dv_ref
):
    frame, tile = config.frame, config.frame.tile
    g, start = pl.program_id(0), frame.first + pl.program_id(1) * tile
    key = _load(config, k_ref, g, start) if config.has_key else None
    value = _load(config, v_ref, g, start)

    def step(o, carry):
        dk, dv = carry
        at = start - frame.shift(o)  # the query that sees this key through offset o
        q, dy = _load(config, q_ref, g, at), _load(config, dy_ref, g, at)
        logit = jnp.sum(q * _full_key(config, key, _offset_row(offsets_ref, o)), axis=-1)
        # Keys of this tile that are in the image are never masked for a query that
        # sees them; keys outside it are not inputs (their rows are discarded).
        p = jnp.exp(logit - lse_ref[g, pl.ds(at, tile)]) * inside_ref[pl.ds(at, tile)]
        dv = dv + p[:, None] * dy
        if config.has_key:
            ds = p * (jnp.sum(dy * value, axis=-1) - delta_ref[g, pl.ds(at, tile)])
            dk = dk + ds[:, None] * q
        return dk, dv

    init = (jnp.zeros(dk_ref.shape, config.dtype), jnp.zeros_like(value))
    dk, dv = jax.lax.fori_loop(0, config.kernel_size**2, step, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


def _run_backward(config, residuals, dy_frame, lse_frame, delta_frame):
    q_frame, k_frame, v_frame, offsets, inside = residuals
    frame = config.frame
    tiles, tile = frame.num_tiles, frame.tile
    d, dv = q_frame.shape[-1], v_frame.shape[-1]
    offsets_rows = pl.next_power_of_2(config.kernel_size**2)
    per_tile = lambda c: pl.BlockSpec((None, tile, c), lambda g, t: (g, t, 0))  # noqa: E731
    positions = lambda groups, c: jax.ShapeDtypeStruct((groups, tiles * tile, c), config.dtype)  # noqa: E731
    inputs = (q_frame, k_frame, v_frame, offsets, inside, dy_frame, lse_frame, delta_frame)
    dq, d_offsets = _call(
        config,
        _dq_kernel,
        f"{KERNEL_NAME_PREFIX}dq",
        inputs,
        [per_tile(d), pl.BlockSpec((None, None, offsets_rows, d), lambda g, t: (g, t, 0, 0))],
        lambda groups: [
            positions(groups, d),
            jax.ShapeDtypeStruct((groups, tiles, offsets_rows, d), config.dtype),
        ],
    )
    dk, dv_out = _call(
        config,
        _dkv_kernel,
        f"{KERNEL_NAME_PREFIX}dkv",
        inputs,
        [per_tile(d), per_tile(dv)],
        lambda groups: [positions(groups, d), positions(groups, dv)],
    )
    # One partial sum per (image, head, tile), summed here: XLA reduces it across
    # devices once, like any parameter's gradient.
    return dq, dk, dv_out, d_offsets.sum(axis=(0, 1, 2))[: config.kernel_size**2]


# ------------------------------------------------------------------------ custom VJP


def _prepare(q, k, v, rel, config):
    frame = config.frame
    d, dv = _padded_width(config.head_dim), _padded_width(config.value_dim)
    q_frame = frame.to_frame(q, d)
    k_frame = frame.to_frame(k, d) if k is not None else None  # no keys: the kernels get None
    v_frame = frame.to_frame(v, dv)
    # r_o per offset, zero-padded to (next power of two ≥ k², d) for Triton's blocks;
    # all zero without relative tables (the kernels then never add them).
    offsets = jnp.zeros((pl.next_power_of_2(config.kernel_size**2), d), config.dtype)
    if rel is not None:
        r_o = offset_vectors(rel, config.kernel_size, config.dtype)
        offsets = offsets.at[: r_o.shape[0], : r_o.shape[1]].set(r_o)
    return q_frame, k_frame, v_frame, offsets, frame.inside()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, rel, config):
    return _attention_fwd(q, k, v, rel, config)[0]


def _attention_fwd(q, k, v, rel, config):
    residuals = _prepare(q, k, v, rel, config)
    y_tiles, lse_tiles = _run_forward(config, *residuals)
    y = config.frame.from_tiles(y_tiles, config.value_dim)
    # The frames are the saved inputs: q, k and v themselves are not kept as well.
    return y.astype(v.dtype), (residuals, y, lse_tiles, rel)


def _attention_bwd(config, saved, dy):
    residuals, y, lse_tiles, rel = saved
    frame = config.frame
    q_dtype, k_dtype, v_dtype = config.input_dtypes
    dy = dy.astype(config.dtype)
    delta = jnp.sum(dy * y, axis=-1, keepdims=True)  # Σ_o p_o dy·v_o, per query
    dy_frame = frame.to_frame(dy, residuals[2].shape[-1])
    delta_frame = frame.to_frame(delta)[..., 0]
    dq, dk, dv, d_offsets = _run_backward(
        config, residuals, dy_frame, frame.tiles_to_frame(lse_tiles), delta_frame
    )
    grads_q = frame.from_tiles(dq, config.head_dim).astype(q_dtype)
    grads_k = None if k_dtype is None else frame.from_tiles(dk, config.head_dim).astype(k_dtype)
    grads_v = frame.from_tiles(dv, config.value_dim).astype(v_dtype)
    d_rel = None if rel is None else relative_table_grads(d_offsets, rel)
    return grads_q, grads_k, grads_v, d_rel


_attention.defvjp(_attention_fwd, _attention_bwd)


def costs(
    q_shape,
    value_dim: int,
    kernel_size: int,
    *,
    has_key: bool,
    itemsize: int,
    tile: int = DEFAULT_TILE,
) -> dict[str, pl.CostEstimate]:
    """The kernels' own FLOP, exp and byte counts (``pallas.costs``) for queries of
    ``q_shape`` (B, H, W, N, d): head widths padded to powers of two, float32 outputs,
    each program's window its tile plus the largest shift on both sides."""
    frame = Frame.of(q_shape, kernel_size, tile)
    reach = frame.first  # r·Wp + r
    return kernel_costs(
        programs=frame.batch * frame.heads * frame.num_tiles,
        tile=tile,
        window=tile + 2 * reach,
        kernel_size=kernel_size,
        head_dim=_padded_width(q_shape[-1]),
        value_dim=_padded_width(value_dim),
        has_key=has_key,
        itemsize=itemsize,
        out_itemsize=4,
    )
