"""impl="pallas" on TPUs: fused Pallas kernels lowered through Mosaic.

The same function and the same backward as the GPU kernels (``pallas/gpu.py``):
an online softmax per query, nothing of size k² per pixel written to HBM, and a
backward that recomputes the weights from the saved log-sum-exp. The layout is shaped
for the TPU's vector unit instead of copied from the GPU:

Layout: (B·N, c, L) frames, channels on sublanes, positions on the 128 lanes. Each
image is zero-padded by r = k // 2 columns on both sides and flattened row by row
(row width Wp = W + 2r), so the neighbour (dy, dx) of every pixel is the constant
frame distance

    shift(dy, dx) = dy·Wp + dx,   |shift| ≤ reach = r·Wp + r,

and a head of width 8 is exactly one sublane group of a vreg holding 128 positions.
Sums over the head width are sublane reductions (cheap); nothing is reduced along
lanes except the relative tables' gradient, once per offset and tile.

Tiles and halos: one program per (batch·head, tile of T positions). It reads its
tile with a halo of ``halo`` positions on each side (halo = reach rounded up to 128,
T a multiple of halo) as one lane-aligned block: ``pl.Element`` blocks, which may
overlap, starting at lane t·T. The k² neighbour reads are then static rotations of
that window (``pltpu.roll``, 32-bit values) followed by an aligned slice: no dynamic or
unaligned lane offsets. A frame is one halo of zeros, the tiles, one halo of zeros.

Kernels (the grid is (B·N, tiles), both dimensions parallel):
  forward:  per offset, logit = Σ_d q·(k_o + r_o) (the relative term folded into the
            key read), masked outside the image under "mask", online-softmax update
            of (max, normaliser, Σ w·v). Writes y and the log-sum-exp (a (1, T) row).
  dq:       recomputes p_o = exp(logit_o − lse), ds_o = p_o (dy·v_o − Σ dy·y);
            dq = Σ_o ds_o (k_o + r_o) and the per-offset Σ_T ds_o q for the tables.
  dk, dv:   per key tile, gathers from the queries that see it (query = key − shift_o),
            reading q, dy and the (lse, Σ dy·y) rows through the same halo window.

VMEM per program (blocks, temporaries and the register spills of the unrolled k² loop)
is bounded by ``vmem_bytes``, a model fitted to libtpu's own VMEM reports; tiles keep it
within ``VMEM_BUDGET`` (14 MiB: v4 has 16 MiB per core, later generations more).

Several devices: every kernel call runs on each device's own (batch, heads) block
(``shards.per_group``); outside the calls the frames are (B, N, c, L), so that batch
and heads may each be split.

Verified without a TPU: TPU interpret mode runs these kernels exactly (tests), and libtpu
compiles them deviceless for v4 and v5e (tests/test_compile.py); nothing has been timed
on a TPU.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sasa_flax.ops.common import (
    MASKED_LOGIT,
    accumulation_dtype,
    offset_vectors,
    relative_table_grads,
)
from sasa_flax.ops.pallas import shards
from sasa_flax.ops.pallas.costs import kernel_costs

LANES = 128
MAX_TILE = 2048  # positions per program: see choose_tile
# What one program may hold in VMEM, for every generation we compile for: v4 has 16 MiB
# per TensorCore (v5e, v5p and v6e more); the rest is the compiler's own scratch.
VMEM_BUDGET = 14 * 2**20
# vmem_bytes' model, fitted to what libtpu (0.0.42.1) allocates per kernel on v4 (its VMEM
# report: blocks, temporaries and register spills) over 28 compiles, k = 3 to 11, head
# widths 8 to 64, tiles 128 to 2048 (benchmarks/tpu_vmem.py; benchmarks/RESULTS.md):
# bytes ≈ e^c · k^a · T^b · halo^h · rows^r, times MARGIN, which covers the largest
# under-prediction seen (1.41).
_VMEM_FIT = dict(c=3.976, a=1.408, b=0.927, h=0.189, r=0.639)
VMEM_MARGIN = 1.5

_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def local_attention(
    q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str, tile: int | None = None,
    interpret=False,
) -> jax.Array:  # fmt: skip
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype.

    ``tile``: positions per program, a multiple of the halo (``Frame.halo_for``);
    by default the tile that reads least (``choose_tile``). ``interpret``: False to
    compile for a TPU, or ``pltpu.InterpretParams(...)`` to run the kernels exactly on
    CPU in TPU interpret mode (the tests).
    """
    frame = Frame.of(q.shape, kernel_size, tile, value_dim=v.shape[-1])
    config = _Config(
        kernel_size=kernel_size,
        padding=padding,
        has_key=k is not None,
        has_rel=rel_row is not None,
        frame=frame,
        dtype=accumulation_dtype(q, v),
        input_dtypes=(q.dtype, None if k is None else k.dtype, v.dtype),
        interpret=interpret,
    )
    rel = None if rel_row is None else (rel_row, rel_col)
    return _attention(q, k, v, rel, config)


# ------------------------------------------------------------------------------ frame


class Frame(NamedTuple):
    """Geometry of the (B·N, c, L) frames shared by all kernels."""

    batch: int
    height: int
    width: int
    heads: int
    radius: int
    tile: int
    halo: int

    @classmethod
    def of(
        cls, q_shape, kernel_size: int, tile: int | None = None, value_dim: int | None = None
    ) -> Frame:
        batch, height, width, heads, head_dim = q_shape
        halo = cls.halo_for(height, width, kernel_size)
        if tile is None:
            tile = choose_tile(height, width, kernel_size, head_dim, value_dim or head_dim)
        elif tile < halo or tile % halo:
            raise ValueError(
                f"tile must be a positive multiple of the halo, {halo} positions at "
                f"{height}x{width}, k = {kernel_size}; got {tile}."
            )
        return cls(batch, height, width, heads, kernel_size // 2, tile, halo)

    @staticmethod
    def halo_for(height: int, width: int, kernel_size: int) -> int:
        """The reach r·Wp + r rounded up to whole lanes."""
        del height
        r = kernel_size // 2
        return max(LANES, _round_up(r * (width + 2 * r) + r, LANES))

    @property
    def padded_width(self) -> int:
        return self.width + 2 * self.radius

    @property
    def positions(self) -> int:
        """Frame positions holding query rows (with their padding columns)."""
        return self.height * self.padded_width

    @property
    def num_tiles(self) -> int:
        return pl.cdiv(self.positions, self.tile)

    @property
    def length(self) -> int:
        return self.halo + self.num_tiles * self.tile + self.halo

    def shift(self, offset: int) -> int:
        """Static frame distance from a pixel to its neighbour number ``offset``."""
        size = 2 * self.radius + 1
        dy, dx = divmod(offset, size)
        return (dy - self.radius) * self.padded_width + (dx - self.radius)

    def to_frame(self, x: jax.Array) -> jax.Array:
        """(B, H, W, N, c) -> (B, N, c, L), zeros outside the image. Batch and heads stay
        separate dimensions, so that either may be split over devices (``shards``)."""
        r, (batch, _, _, heads, c) = self.radius, x.shape
        x = jnp.pad(x, [(0, 0), (0, 0), (r, r), (0, 0), (0, 0)])
        x = jnp.transpose(x, (0, 3, 4, 1, 2)).reshape(batch, heads, c, -1)
        tail = self.length - self.halo - self.positions
        return jnp.pad(x, [(0, 0), (0, 0), (0, 0), (self.halo, tail)])

    def from_tiles(self, x: jax.Array) -> jax.Array:
        """(B, N, c, tiles·T) tile outputs -> (B, H, W, N, c)."""
        r, (batch, heads, c, _) = self.radius, x.shape
        x = x[..., : self.positions].reshape(batch, heads, c, self.height, self.padded_width)
        return jnp.transpose(x[..., r : r + self.width], (0, 3, 4, 1, 2))

    def tiles_to_frame(self, x: jax.Array) -> jax.Array:
        """(B, N, c, tiles·T) -> (B, N, c, L): the tiles in place, zeros around them."""
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(self.halo, self.halo)])

    def inside(self) -> jax.Array:
        """(1, 1, L) float32: 1.0 at the positions of in-image pixels, else 0.0."""
        ones = jnp.ones((1, self.height, self.width, 1, 1), jnp.float32)
        return self.to_frame(ones)[0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def choose_tile(height: int, width: int, kernel_size: int, head_dim: int, value_dim: int) -> int:
    """The multiple of the halo that reads the fewest positions (tile plus two halos,
    per tile), among those up to MAX_TILE whose VMEM (``vmem_bytes``: blocks, temporaries
    and the register spills of the unrolled k² loop) stays within VMEM_BUDGET. Ties go to
    the larger tile (fewer programs).

    Raises ``TileError`` when not even one halo fits (a window reaching too far: many
    rows of a wide image at a large k); ``impl="auto"`` then runs another implementation
    (``fits``).
    """
    halo = Frame.halo_for(height, width, kernel_size)
    positions = height * (width + 2 * (kernel_size // 2))
    best = None
    for tile in range(halo, max(halo, MAX_TILE) + 1, halo):
        if vmem_bytes(tile, halo, head_dim, value_dim, kernel_size) > VMEM_BUDGET:
            break
        cost = pl.cdiv(positions, tile) * (tile + 2 * halo)
        if best is None or cost <= best[0]:
            best = (cost, tile)
        if tile >= positions:
            break
    if best is None:
        need = vmem_bytes(halo, halo, head_dim, value_dim, kernel_size) / 2**20
        raise TileError(
            f"the Mosaic kernels need about {need:.1f} MiB of VMEM per program at "
            f"{height}x{width}, k = {kernel_size}, head width {head_dim} (a halo of {halo} "
            f"positions), over the {VMEM_BUDGET / 2**20:.0f} MiB every TPU generation has: "
            "use --config.model.attention_impl=shifted (or impl='auto', which does) here."
        )
    return best[1]


class TileError(ValueError):
    """No tile of the Mosaic kernels fits VMEM at this shape."""


def fits(height: int, width: int, kernel_size: int, head_dim: int, value_dim: int) -> bool:
    """Whether some tile of the Mosaic kernels fits VMEM at this shape (``choose_tile``)."""
    halo = Frame.halo_for(height, width, kernel_size)
    return vmem_bytes(halo, halo, head_dim, value_dim, kernel_size) <= VMEM_BUDGET


def vmem_bytes(tile: int, halo: int, head_dim: int, value_dim: int, kernel_size: int) -> int:
    """What the largest of the three kernels holds in VMEM per program, from the model
    fitted to libtpu's own VMEM reports (``_VMEM_FIT``), with its margin. rows: the wider
    of the head and value widths, rounded up to a sublane group of 8."""
    rows = _round_up(max(head_dim, value_dim), 8)
    f = _VMEM_FIT
    estimate = math.exp(f["c"]) * kernel_size ** f["a"] * tile ** f["b"] * halo ** f["h"]
    return int(VMEM_MARGIN * estimate * rows ** f["r"])


# ----------------------------------------------------------------------------- kernels


class _Config(NamedTuple):
    kernel_size: int
    padding: str
    has_key: bool
    has_rel: bool
    frame: Frame
    dtype: jnp.dtype  # of logits, softmax and sums: float32 (float64 inputs: float64)
    input_dtypes: tuple  # of q, k (None without keys), v: the gradients' dtypes
    interpret: object

    @property
    def offsets(self) -> range:
        return range(self.kernel_size**2)


def _window(config, ref) -> jax.Array:
    """(c, halo + T + halo) in the accumulation dtype: a tile and its two halos."""
    return ref[0].astype(config.dtype)


def _at(config, window: jax.Array, shift: int) -> jax.Array:
    """(c, T): window positions halo + shift + [0, T). A static lane rotation of the
    32-bit window, then an aligned slice."""
    frame = config.frame
    start = frame.halo + shift
    rotated = pltpu.roll(window, (window.shape[1] - start) % window.shape[1], 1)
    return rotated[:, : frame.tile]


def _full_key(config, key, offsets, o):
    """k_o + r_o, what a query is dotted with for offset o: (d, T), or (d, 1) without keys."""
    r_o = offsets[:, o : o + 1] if config.has_rel else None
    if not config.has_key:
        return r_o
    return key + r_o if config.has_rel else key


def _masked(config, logit, inside):
    if config.padding == "mask":
        return jnp.where(inside > 0, logit, MASKED_LOGIT)
    return logit


def _neighbour_inputs(config, refs):
    """The forward's and dq's shared inputs, in ``_run_forward``/``_run_backward``'s
    order: (keys or None, values, inside) windows, the (d, k²) offset vectors, and the
    remaining refs (the outputs)."""
    refs = list(refs)
    keys = _window(config, refs.pop(0)) if config.has_key else None
    values = _window(config, refs.pop(0))
    inside = _window(config, refs.pop(0))
    offsets = refs.pop(0)[...].astype(config.dtype)
    return keys, values, inside, offsets, refs


def _forward_kernel(config, *refs):
    q_ref, *refs = refs
    keys, values, inside, offsets, (y_ref, lse_ref) = _neighbour_inputs(config, refs)
    frame, dtype = config.frame, config.dtype
    q = q_ref[0].astype(dtype)
    running_max = jnp.full((1, frame.tile), MASKED_LOGIT, dtype)
    normaliser = jnp.zeros((1, frame.tile), dtype)
    acc = jnp.zeros((values.shape[0], frame.tile), dtype)
    for o in config.offsets:  # static: unrolled, every shift a constant
        shift = frame.shift(o)
        key = _at(config, keys, shift) if config.has_key else None
        logit = jnp.sum(q * _full_key(config, key, offsets, o), axis=0, keepdims=True)
        logit = _masked(config, logit, _at(config, inside, shift))
        new_max = jnp.maximum(running_max, logit)
        rescale, weight = jnp.exp(running_max - new_max), jnp.exp(logit - new_max)
        acc = acc * rescale + weight * _at(config, values, shift)
        normaliser = normaliser * rescale + weight
        running_max = new_max
    y_ref[...] = (acc / normaliser).astype(y_ref.dtype)
    lse_ref[...] = running_max + jnp.log(normaliser)


def _dq_kernel(config, *refs):
    q_ref, dy_ref, stats_ref, *refs = refs
    keys, values, inside, offsets, (dq_ref, d_offsets_ref) = _neighbour_inputs(config, refs)
    frame, dtype = config.frame, config.dtype
    q, dy = q_ref[0].astype(dtype), dy_ref[0].astype(dtype)
    stats = stats_ref[0]
    lse, delta = stats[0:1], stats[1:2]
    column = jax.lax.broadcasted_iota(jnp.int32, (1, d_offsets_ref.shape[1]), 1)
    dq = jnp.zeros_like(q)
    d_offsets = jnp.zeros(d_offsets_ref.shape, dtype)
    for o in config.offsets:
        shift = frame.shift(o)
        key = _at(config, keys, shift) if config.has_key else None
        full_key = _full_key(config, key, offsets, o)
        logit = jnp.sum(q * full_key, axis=0, keepdims=True)
        p = jnp.exp(_masked(config, logit, _at(config, inside, shift)) - lse)
        ds = p * (jnp.sum(dy * _at(config, values, shift), axis=0, keepdims=True) - delta)
        dq = dq + ds * full_key
        if config.has_rel:  # queries outside the image have ds = 0 (dy = 0, delta = 0)
            per_offset = jnp.sum(ds * q, axis=1, keepdims=True)  # (d, 1)
            d_offsets = d_offsets + jnp.where(column == o, per_offset, 0.0)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    d_offsets_ref[...] = d_offsets


def _dkv_kernel(config, *refs):
    refs = list(refs)
    key_ref = refs.pop(0) if config.has_key else None
    value_ref = refs.pop(0)
    queries = _window(config, refs.pop(0))
    d_out = _window(config, refs.pop(0))
    stats = _window(config, refs.pop(0))
    inside = _window(config, refs.pop(0))
    offsets = refs.pop(0)[...].astype(config.dtype)
    dk_ref = refs.pop(0) if config.has_key else None
    (dv_ref,) = refs
    frame, dtype = config.frame, config.dtype
    key = key_ref[0].astype(dtype) if config.has_key else None
    value = value_ref[0].astype(dtype)
    dk = jnp.zeros_like(key) if config.has_key else None
    dv = jnp.zeros_like(value)
    for o in config.offsets:
        shift = -frame.shift(o)  # the query that sees this key through offset o
        q, dy = _at(config, queries, shift), _at(config, d_out, shift)
        stat = _at(config, stats, shift)
        logit = jnp.sum(q * _full_key(config, key, offsets, o), axis=0, keepdims=True)
        # Keys of this tile inside the image are never masked for a query that sees
        # them; keys outside it are not inputs (their rows are discarded). Queries
        # outside the image take no part.
        p = jnp.where(_at(config, inside, shift) > 0, jnp.exp(logit - stat[0:1]), 0.0)
        dv = dv + p * dy
        if config.has_key:
            ds = p * (jnp.sum(dy * value, axis=0, keepdims=True) - stat[1:2])
            dk = dk + ds * q
    if config.has_key:
        dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- specs


def _window_spec(frame: Frame, rows: int, shared: bool = False) -> pl.BlockSpec:
    """Tile t of a (G, rows, L) frame with a halo on each side: (1, rows, halo + T + halo)
    from lane t·T (aligned); of the (1, rows, L) array shared by every group when
    ``shared``. Element blocks may overlap, so each window is one copy."""
    width = pl.Element(frame.halo + frame.tile + frame.halo)
    group = (lambda g: 0) if shared else (lambda g: g)
    return pl.BlockSpec(
        (pl.Element(1), pl.Element(rows), width),
        lambda g, t: (group(g), 0, _lane_aligned(t * frame.tile)),
    )


def _in_tile(frame: Frame, rows: int) -> pl.BlockSpec:
    """Tile t of a (G, rows, L) frame, without halos: (1, rows, T)."""
    return pl.BlockSpec(
        (pl.Element(1), pl.Element(rows), pl.Element(frame.tile)),
        lambda g, t: (g, 0, _lane_aligned(frame.halo + t * frame.tile)),
    )


def _lane_aligned(index):
    """``index`` (a multiple of 128 by construction: halo and tile are) marked as one for
    Mosaic, which otherwise cannot prove that ``halo + t·T`` is a multiple of the lane
    tiling and refuses the block ("Couldn't prove that tiling (128) divides index").
    Lowering and interpret mode accept it either way; only libtpu's compile sees this."""
    return pl.multiple_of(index, 128)


def _out_tile(frame: Frame, rows: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, rows, frame.tile), lambda g, t: (g, 0, t))


def _whole(shape) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda g, t: (0,) * len(shape))


def _call(config, kernel, name, inputs, in_specs, out_specs, outputs, cost, shared=2):
    """``kernel`` over (B, N, c, ·) frames, the last ``shared`` inputs whole arrays that
    every program reads. ``outputs(groups)`` and ``cost(groups)`` give the output shapes
    and the ``CostEstimate`` for the b·n groups of one device (``shards.per_group``)."""
    frame = config.frame

    def on_groups(*frames):
        groups = frames[0].shape[0]
        return pl.pallas_call(
            functools.partial(kernel, config),
            grid=(groups, frame.num_tiles),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=outputs(groups),
            compiler_params=_PARALLEL,
            interpret=config.interpret,
            cost_estimate=cost(groups),
            name=name,
        )(*frames)

    grouped = [True] * (len(inputs) - shared) + [False] * shared
    interpreted = config.interpret is not False  # TPU interpret mode: one CPU device
    return shards.per_group(on_groups, grouped, local_only=interpreted)(*inputs)


# ------------------------------------------------------------------------ accounting


def costs(
    q_shape, value_dim: int, kernel_size: int, *, has_key: bool, itemsize: int,
    tile: int | None = None,
) -> dict[str, pl.CostEstimate]:  # fmt: skip
    """The kernels' own FLOP, exp and HBM-byte counts (``pallas.costs``) for queries of
    ``q_shape`` (B, H, W, N, d) at ``tile`` (default: ``choose_tile``'s): what each
    ``pallas_call`` passes to XLA as its ``CostEstimate``."""
    frame = Frame.of(q_shape, kernel_size, tile, value_dim=value_dim)
    return kernel_costs(
        programs=frame.batch * frame.heads * frame.num_tiles, tile=frame.tile,
        window=frame.tile + 2 * frame.halo, kernel_size=kernel_size,
        head_dim=q_shape[-1], value_dim=value_dim, has_key=has_key,
        itemsize=itemsize, out_itemsize=itemsize,
    )  # fmt: skip


def _costs(config, groups: int, q_frame, v_frame) -> dict[str, pl.CostEstimate]:
    """``costs`` for ``groups`` (images × heads) frames: one device's share."""
    frame = config.frame
    q_shape = (groups, frame.height, frame.width, 1, q_frame.shape[2])
    return costs(
        q_shape, v_frame.shape[2], config.kernel_size, has_key=config.has_key,
        itemsize=q_frame.dtype.itemsize, tile=frame.tile,
    )  # fmt: skip


# ------------------------------------------------------------------------ custom VJP


def _prepare(q, k, v, rel, config):
    frame = config.frame
    d = q.shape[-1]
    offsets = jnp.zeros((d, config.kernel_size**2), config.dtype)
    if rel is not None:
        offsets = offset_vectors(rel, config.kernel_size, config.dtype).T  # (d, k²)
    k_frame = None if k is None else frame.to_frame(k)
    return frame.to_frame(q), k_frame, frame.to_frame(v), offsets, frame.inside()


def _run_forward(config, q_frame, k_frame, v_frame, offsets, inside):
    frame = config.frame
    d, dv = q_frame.shape[2], v_frame.shape[2]
    window = functools.partial(_window_spec, frame)
    inputs, in_specs = [q_frame], [_in_tile(frame, d)]
    if k_frame is not None:
        inputs.append(k_frame)
        in_specs.append(window(d))
    inputs += [v_frame, inside, offsets]
    in_specs += [window(dv), window(1, shared=True), _whole(offsets.shape)]
    out_len = frame.num_tiles * frame.tile
    return _call(
        config, _forward_kernel, "sasa_local_attention_fwd_tpu", inputs, in_specs,
        [_out_tile(frame, dv), _out_tile(frame, 1)],
        lambda groups: [jax.ShapeDtypeStruct((groups, dv, out_len), v_frame.dtype),
                        jax.ShapeDtypeStruct((groups, 1, out_len), config.dtype)],
        lambda groups: _costs(config, groups, q_frame, v_frame)["forward"],
    )  # fmt: skip


def _run_backward(config, residuals, dy_frame, stats_frame):
    q_frame, k_frame, v_frame, offsets, inside = residuals
    frame = config.frame
    d, dv = q_frame.shape[2], v_frame.shape[2]
    out_len = frame.num_tiles * frame.tile
    k2 = config.kernel_size**2
    cost = functools.partial(_costs, config, q_frame=q_frame, v_frame=v_frame)
    window = functools.partial(_window_spec, frame)
    shared_inputs = [inside, offsets]
    shared_specs = [window(1, shared=True), _whole(offsets.shape)]

    inputs = [q_frame, dy_frame, stats_frame]
    in_specs = [_in_tile(frame, d), _in_tile(frame, dv), _in_tile(frame, 2)]
    if k_frame is not None:
        inputs.append(k_frame)
        in_specs.append(window(d))
    inputs += [v_frame] + shared_inputs
    in_specs += [window(dv)] + shared_specs
    dq, d_offsets = _call(
        config, _dq_kernel, "sasa_local_attention_dq_tpu", inputs, in_specs,
        [_out_tile(frame, d),
         pl.BlockSpec((None, None, d, k2), lambda g, t: (g, t, 0, 0))],
        lambda groups: [
            jax.ShapeDtypeStruct((groups, d, out_len), q_frame.dtype),
            jax.ShapeDtypeStruct((groups, frame.num_tiles, d, k2), config.dtype)],
        lambda groups: cost(groups)["dq"],
    )  # fmt: skip

    inputs, in_specs, outputs, out_specs = [], [], [], []
    if k_frame is not None:
        inputs.append(k_frame)
        in_specs.append(_in_tile(frame, d))
        outputs.append((d, k_frame.dtype))
        out_specs.append(_out_tile(frame, d))
    inputs += [v_frame, q_frame, dy_frame, stats_frame] + shared_inputs
    in_specs += [_in_tile(frame, dv), window(d), window(dv), window(2)] + shared_specs
    outputs.append((dv, v_frame.dtype))
    out_specs.append(_out_tile(frame, dv))
    dkv = _call(
        config, _dkv_kernel, "sasa_local_attention_dkv_tpu", inputs, in_specs, out_specs,
        lambda groups: [jax.ShapeDtypeStruct((groups, c, out_len), dtype)
                        for c, dtype in outputs],
        lambda groups: cost(groups)["dkv"],
    )  # fmt: skip
    dk, dv_out = (dkv[0], dkv[1]) if k_frame is not None else (None, dkv[0])
    # One partial sum per (image, head, tile), summed here: XLA reduces it across
    # devices once, like any parameter's gradient.
    return dq, dk, dv_out, d_offsets.sum(axis=(0, 1, 2)).T  # (k², d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, rel, config):
    return _attention_fwd(q, k, v, rel, config)[0]


def _attention_fwd(q, k, v, rel, config):
    residuals = _prepare(q, k, v, rel, config)
    y_tiles, lse_tiles = _run_forward(config, *residuals)
    # The frames are the saved inputs (in their own dtype), with y and the
    # log-sum-exp: nothing of size k² per pixel.
    return config.frame.from_tiles(y_tiles), (residuals, y_tiles, lse_tiles, rel)


def _attention_bwd(config, saved, dy):
    residuals, y_tiles, lse_tiles, rel = saved
    frame = config.frame
    q_dtype, k_dtype, v_dtype = config.input_dtypes
    dy_frame = frame.to_frame(dy.astype(v_dtype))
    dy_tiles = dy_frame[..., frame.halo : frame.halo + y_tiles.shape[-1]]
    # Σ_o p_o dy·v_o = dy·y per query, in the accumulation dtype.
    delta = jnp.sum(dy_tiles.astype(config.dtype) * y_tiles.astype(config.dtype), axis=2)
    stats = frame.tiles_to_frame(jnp.stack([lse_tiles[:, :, 0], delta], axis=2))
    dq, dk, dv, d_offsets = _run_backward(config, residuals, dy_frame, stats)
    grads_q = frame.from_tiles(dq).astype(q_dtype)
    grads_k = None if k_dtype is None else frame.from_tiles(dk).astype(k_dtype)
    grads_v = frame.from_tiles(dv).astype(v_dtype)
    d_rel = None if rel is None else relative_table_grads(d_offsets, rel)
    return grads_q, grads_k, grads_v, d_rel


_attention.defvjp(_attention_fwd, _attention_bwd)
