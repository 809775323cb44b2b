"""impl="pallas" on TPUs: fused Pallas kernels lowered through Mosaic.

The same function and the same backward as the GPU kernels (``pallas/gpu.py``): an
online softmax per query, nothing of size k² per pixel written to HBM, and a backward
that recomputes the weights from the saved log-sum-exp. The layout is shaped for the
TPU's vector unit, and was rebuilt against libtpu's own schedule (``sasa_flax.tools.tpu_schedule``;
``benchmarks/RESULTS.md``):

Layout: (B, c, N, L) frames per image: channel c of every head on one row of vregs, the
N heads on the sublanes, positions on the 128 lanes. An image is flattened row by row
(no padding columns), so the neighbour (dy, dx) of every pixel is the constant frame
distance ``shift = dy·W + dx``; a neighbour that a row's end wraps to the next row is
masked by the query's column. With 8 heads one vreg holds 128 positions of all heads:
the dot over the head width is a sum of whole vregs (no cross-sublane reduction), and the
online softmax works on full vregs.

Tiles and halos: one program per (image, tile of T positions). It reads its tile with a
halo of ``halo`` positions on each side (halo = reach rounded up to 128) as one
lane-aligned block (``pl.Element`` blocks, which may overlap). Inside, a loop over chunks
of 128 or 256 positions (``chunk_for``) keeps one chunk's queries, accumulators and
softmax state in registers (no spills of whole tiles); the k² neighbour reads of a chunk
are aligned loads followed by a static lane rotation (``pltpu.roll``, 32-bit values).
Rotations bound these kernels in libtpu's schedule (the vector unit's XLU slots busy in
80-95% of bundles), so every choice below saves rotations: a chunk of two vregs rotates
three per read instead of four; bfloat16 frames are read as channel pairs packed in 32
bits (``_pack``: one rotation per pair, widened exactly by a shift or a mask); whether a
neighbour lies in the image is computed from the chunk's own row and column, not read
shifted. A frame is one halo of zeros, the tiles, one halo of zeros.

The relative term is factored: q·r_(dy,dx) = q_row·rel_row[dy] + q_col·rel_col[dx], so a
chunk computes its k row terms and k column terms once (the tables are scalars in SMEM)
and adds two of them per offset; the backward sums ds over dx and over dy the same way.

Kernels (grid (B, tiles), both parallel):
  forward:  per offset, logit = q·k_o + the relative term, masked outside the image under
            "mask" (zero keys and values under "zeros"), online-softmax update of
            (max, normaliser, Σ w·v). Writes y and the log-sum-exp.
  dq:       recomputes p_o = exp(logit_o − lse), ds_o = p_o (dy·v_o − Σ dy·y);
            dq = Σ_o ds_o k_o + the tables' rows weighted by Σ ds, and the tables'
            gradient as one partial sum per (image, head, tile).
  dk, dv:   per key chunk, gathers from the queries that see it (query = key − shift_o),
            reading q, dy and the (lse, Σ dy·y) rows through the same halo window.

VMEM per program is the blocks (double-buffered) and the tables' gradient accumulator,
counted by ``vmem_bytes``; tiles keep it within ``VMEM_BUDGET`` (v4 has 16 MiB per core).

Several devices: every kernel call runs on each device's own (batch, heads) block
(``shards.per_group``, heads on axis 2 of the frames).

The custom VJP is over the frames: the layout changes into and out of them are plain JAX
around it, which XLA differentiates and fuses with the projections that make q, k and v
(``layers.common.project_heads`` computes them channels-first on TPU, so that the
transposes cancel).

Verified without a TPU: TPU interpret mode runs these kernels exactly (tests), and libtpu
compiles them deviceless for v4, v5e, v5p and v6e (tests/test_compile.py); nothing has
been timed on a TPU.

Arguments are validated by ``sasa_flax.ops.local_attention``; call that.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sasa_flax.errors import ImplementationError
from sasa_flax.ops.common import MASKED_LOGIT, accumulation_dtype
from sasa_flax.ops.pallas import shards
from sasa_flax.ops.pallas.costs import kernel_costs
from sasa_flax.ops.pallas.failures import KERNEL_NAME_PREFIX

LANES = 128  # positions per vreg row
# Positions per iteration of a kernel's inner loop: a neighbour read of c·128 positions
# loads c + 1 vregs and rotates them, so wider chunks rotate less per position (rotations
# bound these kernels in libtpu's schedule) but hold c times the registers. Two vregs
# wide where q and v have at most NARROW_CHANNELS channels together (heads of 8: 1.15x
# fewer cycles at 56² in the schedule), else one (heads of 16 gained nothing and spilled
# more).
WIDE_CHUNK = 2 * LANES
NARROW_CHANNELS = 16
PACKED_CHANNELS = 32  # q and v channels up to which bfloat16 frames are packed (_Config)
MAX_TILE = 8192  # positions per program: see choose_tile
# What one program may hold in VMEM, for every generation we compile for: v4 has 16 MiB
# per TensorCore (v5e, v5p and v6e more); the rest is the compiler's own scratch.
VMEM_BUDGET = 13 * 2**20
# Mosaic's own scratch and what the model does not itemise (fit to libtpu's reports).
MOSAIC_SCRATCH = 1.75 * 2**20
# VMEM that libtpu's register allocator spills to, per offset of the unrolled loop and
# channel of q and v (a bound read from its VMEM reports: the dk/dv kernel at k = 11
# spills about 3 MiB with heads of 8, twice that with heads of 16).
SPILL_PER_OFFSET_CHANNEL = 2 * 2**10
SPILL_CHANNELS = 32  # beyond, the spills grew no more (heads of 32 spill as heads of 16)
HEADS_AXIS = 2  # of the (B, c, N, L) frames: what shards.per_group splits with the batch

_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def local_attention(
    q,
    k,
    v,
    rel_row,
    rel_col,
    *,
    kernel_size: int,
    padding: str,
    tile: int | None = None,
    interpret=False,
) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype.

    ``tile``: positions per program, a multiple of 128; by default the tile that reads
    least within VMEM (``choose_tile``). ``interpret``: False to compile for a TPU, or
    ``pltpu.InterpretParams(...)`` to run the kernels exactly on CPU in TPU interpret
    mode (the tests).
    """
    frame = Frame.of(q.shape, kernel_size, tile, value_dim=v.shape[-1], itemsize=q.dtype.itemsize)
    config = _Config(
        kernel_size=kernel_size,
        padding=padding,
        has_key=k is not None,
        has_rel=rel_row is not None,
        frame=frame,
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        dtype=accumulation_dtype(q, v),
        input_dtypes=(q.dtype, None if k is None else k.dtype, v.dtype),
        interpret=interpret,
    )
    rel = None if rel_row is None else (rel_row, rel_col)

    def to_frame(x):
        return None if x is None else frame.to_frame(x)

    # The layout changes stay outside the custom VJP: XLA differentiates them and fuses
    # each with its neighbour (the projections' matmuls, forward and backward) instead of
    # copying whole arrays around the kernels.
    return frame.from_tiles(_attention(to_frame(q), to_frame(k), to_frame(v), rel, config))


# ------------------------------------------------------------------------------ frame


class Frame(NamedTuple):
    """Geometry of the (B, c, N, L) frames shared by all kernels."""

    batch: int
    height: int
    width: int
    heads: int
    radius: int
    tile: int
    halo: int
    chunk: int  # positions per iteration of the kernels' inner loop (``chunk_for``)

    @classmethod
    def of(
        cls,
        q_shape,
        kernel_size: int,
        tile: int | None = None,
        value_dim: int | None = None,
        itemsize: int = 4,
    ) -> Frame:
        batch, height, width, heads, head_dim = q_shape
        value_dim = value_dim or head_dim
        halo = cls.halo_for(height, width, kernel_size)
        if tile is None:
            tile = choose_tile(
                height,
                width,
                kernel_size,
                head_dim,
                value_dim,
                heads=heads,
                itemsize=itemsize,
            )
        elif tile < LANES or tile % LANES:
            raise ValueError(f"tile must be a positive multiple of {LANES} positions; got {tile}.")
        chunk = chunk_for(head_dim, value_dim)
        chunk = chunk if tile % chunk == 0 else LANES
        return cls(batch, height, width, heads, kernel_size // 2, tile, halo, chunk)

    @staticmethod
    def halo_for(height: int, width: int, kernel_size: int) -> int:
        """The reach r·W + r, plus one, rounded up to whole lanes: every neighbour read
        (a chunk and one more vreg, from an aligned lane) then stays inside the tile's
        window."""
        del height
        r = kernel_size // 2
        return _round_up(r * width + r + 1, LANES)

    @property
    def positions(self) -> int:
        return self.height * self.width

    @property
    def num_tiles(self) -> int:
        return pl.cdiv(self.positions, self.tile)

    @property
    def length(self) -> int:
        return self.halo + self.num_tiles * self.tile + self.halo

    def offset_shift(self, dy, dx: int):
        """Frame distance to the neighbour (dy − r, dx − r); ``dy`` may be traced."""
        return (dy - self.radius) * self.width + (dx - self.radius)

    def to_frame(self, x: jax.Array) -> jax.Array:
        """(B, H, W, N, c) -> (B, c, N, L), zeros outside the image."""
        batch, _, _, heads, c = x.shape
        x = jnp.transpose(x.reshape(batch, self.positions, heads, c), (0, 3, 2, 1))
        return self.tiles_to_frame(x, tail=self.num_tiles * self.tile - self.positions)

    def from_tiles(self, x: jax.Array) -> jax.Array:
        """(B, c, N, tiles·T) tile outputs -> (B, H, W, N, c)."""
        batch, c, heads, _ = x.shape
        x = jnp.transpose(x[..., : self.positions], (0, 3, 2, 1))
        return x.reshape(batch, self.height, self.width, heads, c)

    def tiles_to_frame(self, x: jax.Array, tail: int = 0) -> jax.Array:
        """(..., tiles·T) -> (..., L): the tiles in place, zeros around them."""
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(self.halo, self.halo + tail)])

    def rows(self) -> jax.Array:
        """(1, L) float32: the image row of every position of the tiles (``H`` and above
        in the tail past the image, so a neighbour or query there is outside)."""
        rows = jnp.arange(self.num_tiles * self.tile, dtype=jnp.int32) // self.width
        return self.tiles_to_frame(rows.astype(jnp.float32)[None])

    def columns(self) -> jax.Array:
        """(1, L) float32: the image column of every position of the tiles."""
        columns = jnp.arange(self.num_tiles * self.tile, dtype=jnp.int32) % self.width
        return self.tiles_to_frame(columns.astype(jnp.float32)[None])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def chunk_for(head_dim: int, value_dim: int) -> int:
    """Positions per iteration of the kernels' inner loop (see WIDE_CHUNK)."""
    return WIDE_CHUNK if head_dim + value_dim <= NARROW_CHANNELS else LANES


def choose_tile(
    height: int,
    width: int,
    kernel_size: int,
    head_dim: int,
    value_dim: int,
    *,
    heads: int = 8,
    itemsize: int = 4,
) -> int:
    """The multiple of the chunk (``chunk_for``) that reads the fewest positions (tile plus
    two halos, per tile), among those up to MAX_TILE whose VMEM (``vmem_bytes``) stays
    within VMEM_BUDGET. Ties go to the larger tile (fewer programs).

    Raises ``TileError`` when not even 128 positions fit (a window reaching too far: many
    rows of a wide image at a large k); ``impl="auto"`` then runs another implementation
    (``fits``).
    """
    halo = Frame.halo_for(height, width, kernel_size)
    positions = height * width
    chunk = chunk_for(head_dim, value_dim)
    best = None
    for tile in range(chunk, MAX_TILE + 1, chunk):
        need = vmem_bytes(
            tile, halo, head_dim, value_dim, kernel_size, heads=heads, itemsize=itemsize
        )
        if need > VMEM_BUDGET:
            break
        cost = pl.cdiv(positions, tile) * (tile + 2 * halo)
        if best is None or cost <= best[0]:
            best = (cost, tile)
        if tile >= positions:
            break
    if best is None:
        need = (
            vmem_bytes(
                chunk, halo, head_dim, value_dim, kernel_size, heads=heads, itemsize=itemsize
            )
            / 2**20
        )
        raise TileError(
            f"the Mosaic kernels need about {need:.1f} MiB of VMEM per program at "
            f"{height}x{width}, k = {kernel_size}, head width {head_dim} (a halo of {halo} "
            f"positions), over the {VMEM_BUDGET / 2**20:.1f} MiB budget: use "
            "impl='shifted' (or impl='auto', which does) here."
        )
    return best[1]


class TileError(ImplementationError):
    """No tile of the Mosaic kernels fits VMEM at this shape."""


def fits(
    height: int,
    width: int,
    kernel_size: int,
    head_dim: int,
    value_dim: int,
    *,
    heads: int = 8,
    itemsize: int = 4,
) -> bool:
    """Whether some tile of the Mosaic kernels fits VMEM at this shape (``choose_tile``)."""
    halo = Frame.halo_for(height, width, kernel_size)
    chunk = chunk_for(head_dim, value_dim)
    need = vmem_bytes(chunk, halo, head_dim, value_dim, kernel_size, heads=heads, itemsize=itemsize)
    return need <= VMEM_BUDGET


def vmem_bytes(
    tile: int,
    halo: int,
    head_dim: int,
    value_dim: int,
    kernel_size: int,
    *,
    heads: int = 8,
    itemsize: int = 4,
) -> int:
    """What the largest of the three kernels holds in VMEM per program: its blocks, each
    double-buffered by the pipeline (heads padded to a sublane group of 8, the frames at
    ``itemsize``: 4 by default, float32, the larger case), the tables' gradient
    accumulator of dq, the register spills of the unrolled k² offsets
    (SPILL_PER_OFFSET_CHANNEL per offset and channel: libtpu spills more as k and the
    heads grow, not as the tile does, since the inner loop holds one chunk) and
    (MOSAIC_SCRATCH) for Mosaic's own scratch. Checked against libtpu's own VMEM reports
    (``benchmarks/tpu_vmem.py``; tests/test_pallas_tpu.py)."""
    rows = _round_up(heads, 8)
    window = tile + 2 * halo
    vregs = chunk_for(head_dim, value_dim) // LANES  # per chunk row
    d, dv = head_dim, value_dim

    def frames(channels, positions, size=itemsize):
        return channels * rows * positions * size

    shared = 2 * 8 * tile * 4  # the (1, T) float32 rows and columns, padded to 8 sublanes
    forward = (
        frames(d, tile) + frames(d + dv, window) + shared + frames(dv, tile) + frames(1, tile, 4)
    )
    dq = (
        frames(d + dv, tile)
        + frames(2, tile, 4)
        + frames(d + dv, window)
        + shared
        + frames(d, tile)
        + rows * _round_up(kernel_size * d, LANES) * 4
    )
    dkv = frames(2 * d + 2 * dv, tile) + frames(d + dv, window) + frames(2, window, 4) + shared
    accumulator = kernel_size * d * rows * LANES * vregs * 4
    spills = kernel_size**2 * min(d + dv, SPILL_CHANNELS) * SPILL_PER_OFFSET_CHANNEL
    return 2 * max(forward, dq, dkv) + accumulator + spills + MOSAIC_SCRATCH


# ----------------------------------------------------------------------------- kernels


class _Config(NamedTuple):
    kernel_size: int
    padding: str
    has_key: bool
    has_rel: bool
    frame: Frame
    head_dim: int
    value_dim: int
    dtype: jnp.dtype  # of logits, softmax and sums: float32 (float64 inputs: float64)
    input_dtypes: tuple  # of q, k (None without keys), v: the gradients' dtypes
    interpret: object

    @property
    def size(self) -> int:
        return self.kernel_size

    @property
    def packed(self) -> bool:
        """Whether the kernels read q, k, v and dy as pairs of bfloat16 channels packed in
        32 bits (``_pack``): one rotation per pair, and a shift or a mask to widen each to
        float32 (exact), where a bfloat16 row needed VALU unpacking of its own. Where every
        input is bfloat16 and the sums are float32 (the trainer on TPU), and q and v have at
        most PACKED_CHANNELS channels together: with heads of 32 the widened pairs spilled
        past the VMEM budget (libtpu: 14.7 MiB for dq at 14², k = 11, on v4)."""
        inputs = [t for t in self.input_dtypes if t is not None]
        narrow = self.head_dim + self.value_dim <= PACKED_CHANNELS
        return narrow and self.dtype == jnp.float32 and all(t == jnp.bfloat16 for t in inputs)

    def stored(self, channels: int) -> int:
        """Channels of a frame as the kernels read it: pairs where ``packed``."""
        return -(-channels // 2) if self.packed else channels

    @property
    def half(self) -> int:
        return self.head_dim // 2


def _row(config, ref, channel: int, start, chunk) -> jax.Array:
    """(N, C) in the accumulation dtype, C = the frame's chunk: channel ``channel`` of the
    block ``ref`` (1, c, N, ·) at positions ``chunk + start`` .. + C, ``chunk`` a multiple
    of C and ``start`` within [1, 2·halo): an aligned load of C + 128 positions, then a
    lane rotation (a static one where ``start`` is a Python int)."""
    return _shifted(config, ref, channel, start, chunk).astype(config.dtype)


def _shifted(config, ref, channel: int, start, chunk) -> jax.Array:
    """``_row`` in the block's own dtype (32 bits wide)."""
    width = config.frame.chunk
    base, rotation = _aligned(start, chunk, width)
    loaded = ref[0, channel, :, pl.ds(base, width + LANES)]
    if loaded.dtype.itemsize < 4:  # rotations move 32-bit values
        loaded = loaded.astype(config.dtype)
    return pltpu.roll(loaded, rotation, 1)[:, :width]


def _frame_rows(config, ref, count: int, start, chunk) -> list[jax.Array]:
    """The first ``count`` channels of the frame block ``ref`` (q, k, v or dy) at positions
    ``chunk + start`` .., as ``_row``: (N, C) each in the accumulation dtype, one shifted
    read per channel, or per pair of channels where the frames are packed."""
    return _channels(config, lambda j: _shifted(config, ref, j, start, chunk), count, config.packed)


def _channels(config, read, count: int, packed: bool) -> list[jax.Array]:
    """The first ``count`` channels, (N, C) each in the accumulation dtype, from ``read(j)``,
    the j-th row as stored: one channel per row, or two where ``packed`` (``_unpack``)."""
    if not packed:
        return [read(j).astype(config.dtype) for j in range(count)]
    return [row for j in range(-(-count // 2)) for row in _unpack(read(j))][:count]


def _pack(config, frame: jax.Array | None) -> jax.Array | None:
    """(B, c, N, L) bfloat16 -> (B, ⌈c/2⌉, N, L) uint32, channel 2i in the low half and
    2i + 1 (zero past the last) in the high half, where ``config.packed``."""
    if frame is None or not config.packed:
        return frame
    bits = jax.lax.bitcast_convert_type(frame, jnp.uint16).astype(jnp.uint32)
    if bits.shape[1] % 2:
        bits = jnp.pad(bits, [(0, 0), (0, 1), (0, 0), (0, 0)])
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


def _unpack(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 (``_pack``) -> its two bfloat16 channels as float32 (exactly: a bfloat16
    is the upper half of the float32 of the same value)."""
    low = jax.lax.bitcast_convert_type(bits << 16, jnp.float32)
    high = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return low, high


def _aligned(start, chunk, width: int):
    """(the aligned lane to load ``width`` + 128 positions from, the rotation that brings
    ``start`` to lane 0). ``start`` > 0: lax's truncating division and remainder are floor
    ones here (Mosaic lowers them without the sign fix-ups of ``//`` and ``%``)."""
    start, lanes = jnp.asarray(start, jnp.int32), jnp.int32(LANES)
    base = pl.multiple_of(chunk + jax.lax.div(start, lanes) * lanes, LANES)
    loaded = width + lanes
    rotation = jax.lax.rem(loaded - jax.lax.rem(start, lanes), loaded)
    return base, rotation


def _in_image(config, rows_ref, columns_ref, chunk, sign: int):
    """Whether the pixel ``sign``·(dy − r) rows and ``sign``·(dx − r) columns away from
    each position of a chunk lies in the image: (per dy, per dx) lists of (1, 128) bool,
    to be and-ed per offset. Computed from the chunk's own row and column (no shifted
    read: a shifted row costs two lane rotations per offset, and rotations bound these
    kernels in libtpu's schedule); a column test also stops a wrap to the next or
    previous image row."""
    frame = config.frame
    rows, columns = (ref[:, pl.ds(chunk, frame.chunk)] for ref in (rows_ref, columns_ref))

    def within(position, extent):
        return [
            (position + sign * (t - frame.radius) >= 0)
            & (position + sign * (t - frame.radius) < extent)
            for t in range(config.size)
        ]

    return within(rows, frame.height), within(columns, frame.width)


def _tile_rows(config, ref, count: int, chunk, packed: bool | None = None) -> list[jax.Array]:
    """The first ``count`` channels of a tile block (1, c, N, T) at ``chunk``: (N, C)
    each, in the accumulation dtype. ``packed``: whether ``ref`` holds channel pairs
    (default: ``config.packed``, as q, k, v and dy; the statistics never are)."""
    width = config.frame.chunk
    packed = config.packed if packed is None else packed
    return _channels(config, lambda j: ref[0, j, :, pl.ds(chunk, width)], count, packed)


def _dot_table(config, table, t, channels) -> jax.Array:
    """Σ_j channels[j] · table[t, j]: a query's relative term for row (or column) t."""
    return sum(q * table[t, j].astype(config.dtype) for j, q in enumerate(channels))


def _logit(config, content, position, ok):
    """The logit of one offset, (N, 128): "mask" sends out-of-image neighbours to
    MASKED_LOGIT; "zeros" gives them a zero key (the positional term alone)."""
    if config.padding == "mask":
        terms = [t for t in (content, position) if t is not None]
        return jnp.where(ok, sum(terms[1:], terms[0]), MASKED_LOGIT)
    content = None if content is None else jnp.where(ok, content, 0.0)
    if position is None:
        return content
    return position if content is None else content + position


def _neighbours(config, queries, k_ref, chunk, rows_ok, columns_ok, row_term, column_terms, dy):
    """For the k offsets (dy, ·) of a chunk of queries: (window start, in-image mask,
    logit) each. Offsets are unrolled (static lane rotations): libtpu schedules them
    best so (a loop over dy with traced rotations was slower in its schedule)."""
    frame, found = config.frame, []
    for dx in range(config.size):
        start = frame.halo + frame.offset_shift(dy, dx)
        ok = rows_ok[dy] & columns_ok[dx]
        content = None
        if config.has_key:
            keys = _frame_rows(config, k_ref, config.head_dim, start, chunk)
            content = sum(q * key for q, key in zip(queries, keys, strict=True))
        position = row_term + column_terms[dx] if config.has_rel else None
        found.append((start, ok, _logit(config, content, position, ok)))
    return found


def _forward_kernel(
    config, q_ref, k_ref, v_ref, rows_ref, columns_ref, rel_row, rel_col, y_ref, lse_ref
):
    frame, dtype, half, size = config.frame, config.dtype, config.half, config.size

    def chunk_step(index, carry):
        chunk = pl.multiple_of(index * frame.chunk, frame.chunk)
        queries = _tile_rows(config, q_ref, config.head_dim, chunk)
        rows_ok, columns_ok = _in_image(config, rows_ref, columns_ref, chunk, +1)
        column_terms = None
        if config.has_rel:
            column_terms = [_dot_table(config, rel_col, dx, queries[half:]) for dx in range(size)]
        shape = queries[0].shape
        running_max = jnp.full(shape, MASKED_LOGIT, dtype)
        normaliser = jnp.zeros(shape, dtype)
        acc = [jnp.zeros(shape, dtype) for _ in range(config.value_dim)]
        for dy in range(size):
            # One row of offsets at a time: its k logits are independent, then one
            # rescale of the running sums per row (not per offset).
            row_term = _dot_table(config, rel_row, dy, queries[:half]) if config.has_rel else None
            found = _neighbours(
                config, queries, k_ref, chunk, rows_ok, columns_ok, row_term, column_terms, dy
            )
            new_max = functools.reduce(jnp.maximum, [logit for _, _, logit in found], running_max)
            rescale = jnp.exp(running_max - new_max)
            acc = [a * rescale for a in acc]
            normaliser = normaliser * rescale
            for start, ok, logit in found:
                weight = jnp.exp(logit - new_max)
                normaliser = normaliser + weight
                if config.padding == "zeros":  # a neighbour outside has a zero value
                    weight = jnp.where(ok, weight, 0.0)
                values = _frame_rows(config, v_ref, len(acc), start, chunk)
                acc = [a + weight * value for a, value in zip(acc, values, strict=True)]
            running_max = new_max
        for j, a in enumerate(acc):
            y_ref[0, j, :, pl.ds(chunk, frame.chunk)] = (a / normaliser).astype(y_ref.dtype)
        lse_ref[0, 0, :, pl.ds(chunk, frame.chunk)] = running_max + jnp.log(normaliser)
        return carry

    jax.lax.fori_loop(0, frame.tile // frame.chunk, chunk_step, 0)


def _dq_kernel(
    config,
    q_ref,
    dy_ref,
    stats_ref,
    k_ref,
    v_ref,
    rows_ref,
    columns_ref,
    rel_row,
    rel_col,
    dq_ref,
    d_rel_ref,
    accumulator,
):
    frame, dtype, half, size = config.frame, config.dtype, config.half, config.size
    if config.has_rel:
        accumulator[...] = jnp.zeros(accumulator.shape, accumulator.dtype)

    def accumulate(slot, term):
        accumulator[slot] = accumulator[slot] + term.astype(accumulator.dtype)

    def chunk_step(index, carry):
        chunk = pl.multiple_of(index * frame.chunk, frame.chunk)
        queries = _tile_rows(config, q_ref, config.head_dim, chunk)
        d_out = _tile_rows(config, dy_ref, config.value_dim, chunk)
        lse, delta = _tile_rows(config, stats_ref, 2, chunk, packed=False)
        rows_ok, columns_ok = _in_image(config, rows_ref, columns_ref, chunk, +1)
        column_terms = column_sums = None
        if config.has_rel:
            column_terms = [_dot_table(config, rel_col, dx, queries[half:]) for dx in range(size)]
            column_sums = [jnp.zeros(lse.shape, dtype) for _ in range(size)]
        dq = [jnp.zeros(lse.shape, dtype) for _ in range(config.head_dim)]
        for dy in range(size):
            row_term = _dot_table(config, rel_row, dy, queries[:half]) if config.has_rel else None
            row_sum = jnp.zeros(lse.shape, dtype)
            found = _neighbours(
                config, queries, k_ref, chunk, rows_ok, columns_ok, row_term, column_terms, dy
            )
            for dx, (start, ok, logit) in enumerate(found):
                p = jnp.exp(logit - lse)
                values = _frame_rows(config, v_ref, len(d_out), start, chunk)
                dp = sum(g * value for g, value in zip(d_out, values, strict=True))
                if config.padding == "zeros":  # an outside neighbour's value is zero
                    dp = jnp.where(ok, dp, 0.0)
                ds = p * (dp - delta)
                if config.has_key:
                    # "zeros": an outside neighbour's key is zero, whatever the frame holds.
                    ds_key = ds if config.padding == "mask" else jnp.where(ok, ds, 0.0)
                    keys = _frame_rows(config, k_ref, len(dq), start, chunk)
                    dq = [g + ds_key * key for g, key in zip(dq, keys, strict=True)]
                if config.has_rel:
                    row_sum = row_sum + ds
                    column_sums[dx] = column_sums[dx] + ds
            if config.has_rel:  # r_o = (rel_row[dy], rel_col[dx]): Σ ds over a row, a column
                for j in range(half):
                    dq[j] = dq[j] + row_sum * rel_row[dy, j].astype(dtype)
                    accumulate(dy * half + j, row_sum * queries[j])
        if config.has_rel:
            for dx in range(size):
                for j in range(half):
                    dq[half + j] = dq[half + j] + column_sums[dx] * rel_col[dx, j].astype(dtype)
                    accumulate((size + dx) * half + j, column_sums[dx] * queries[half + j])
        for j, g in enumerate(dq):
            dq_ref[0, j, :, pl.ds(chunk, frame.chunk)] = g.astype(dq_ref.dtype)
        return carry

    jax.lax.fori_loop(0, frame.tile // frame.chunk, chunk_step, 0)
    if config.has_rel:
        # One partial sum per head and table entry: entry m in lane m of (N, ≥ k·d).
        lane = jax.lax.broadcasted_iota(jnp.int32, d_rel_ref.shape[2:], 1)
        out = jnp.zeros(d_rel_ref.shape[2:], d_rel_ref.dtype)
        for slot in range(accumulator.shape[0]):
            out = jnp.where(lane == slot, jnp.sum(accumulator[slot], axis=1, keepdims=True), out)
        d_rel_ref[0, 0] = out


def _dkv_kernel(
    config,
    k_ref,
    v_ref,
    q_ref,
    dy_ref,
    stats_ref,
    rows_ref,
    columns_ref,
    rel_row,
    rel_col,
    dk_ref,
    dv_ref,
):
    frame, dtype, half, size = config.frame, config.dtype, config.half, config.size

    def chunk_step(index, carry):
        chunk = pl.multiple_of(index * frame.chunk, frame.chunk)
        # The query that sees a key through (dy, dx) lies -(dy - r) rows and -(dx - r)
        # columns away.
        rows_ok, columns_ok = _in_image(config, rows_ref, columns_ref, chunk, -1)
        shape = (q_ref.shape[2], frame.chunk)
        dk = [jnp.zeros(shape, dtype) for _ in range(config.head_dim * config.has_key)]
        dv = [jnp.zeros(shape, dtype) for _ in range(config.value_dim)]
        for dy in range(size):
            for dx in range(size):
                start = frame.halo - frame.offset_shift(dy, dx)
                ok = rows_ok[dy] & columns_ok[dx]
                queries = _frame_rows(config, q_ref, config.head_dim, start, chunk)
                logit = 0.0
                if config.has_key:
                    keys = _tile_rows(config, k_ref, config.head_dim, chunk)
                    logit = sum(q * key for q, key in zip(queries, keys, strict=True))
                if config.has_rel:
                    logit = logit + _dot_table(config, rel_row, dy, queries[:half])
                    logit = logit + _dot_table(config, rel_col, dx, queries[half:])
                # Keys of this tile inside the image are never masked for a query that
                # sees them; queries outside the image, or wrapped rows, take no part.
                p = jnp.where(ok, jnp.exp(logit - _row(config, stats_ref, 0, start, chunk)), 0.0)
                d_out = _frame_rows(config, dy_ref, config.value_dim, start, chunk)
                dv = [a + p * g for a, g in zip(dv, d_out, strict=True)]
                if config.has_key:
                    values = _tile_rows(config, v_ref, config.value_dim, chunk)
                    dp = sum(g * value for g, value in zip(d_out, values, strict=True))
                    ds = p * (dp - _row(config, stats_ref, 1, start, chunk))
                    dk = [a + ds * q for a, q in zip(dk, queries, strict=True)]
        for j, a in enumerate(dk):
            dk_ref[0, j, :, pl.ds(chunk, frame.chunk)] = a.astype(dk_ref.dtype)
        for j, a in enumerate(dv):
            dv_ref[0, j, :, pl.ds(chunk, frame.chunk)] = a.astype(dv_ref.dtype)
        return carry

    jax.lax.fori_loop(0, frame.tile // frame.chunk, chunk_step, 0)


# ---------------------------------------------------------------------------- specs


def _window_spec(frame: Frame, channels: int, heads: int) -> pl.BlockSpec:
    """Tile t of a (B, channels, N, L) frame with a halo on each side: (1, channels, N,
    halo + T + halo) from lane t·T (aligned). Element blocks may overlap."""
    width = pl.Element(frame.halo + frame.tile + frame.halo)
    return pl.BlockSpec(
        (pl.Element(1), pl.Element(channels), pl.Element(heads), width),
        lambda b, t: (b, 0, 0, _lane_aligned(t * frame.tile)),
    )


def _in_tile(frame: Frame, channels: int, heads: int) -> pl.BlockSpec:
    """Tile t of a (B, channels, N, L) frame, without halos: (1, channels, N, T)."""
    return pl.BlockSpec(
        (pl.Element(1), pl.Element(channels), pl.Element(heads), pl.Element(frame.tile)),
        lambda b, t: (b, 0, 0, _lane_aligned(frame.halo + t * frame.tile)),
    )


def _shared_tile(frame: Frame) -> pl.BlockSpec:
    """Tile t of a (1, L) row every image shares, without halos."""
    return pl.BlockSpec(
        (pl.Element(1), pl.Element(frame.tile)),
        lambda b, t: (0, _lane_aligned(frame.halo + t * frame.tile)),
    )


def _lane_aligned(index):
    """``index`` (a multiple of 128 by construction: halo and tile are) marked as one for
    Mosaic, which otherwise cannot prove that ``halo + t·T`` is a multiple of the lane
    tiling and refuses the block ("Couldn't prove that tiling (128) divides index").
    Lowering and interpret mode accept it either way; only libtpu's compile sees this."""
    return pl.multiple_of(index, 128)


def _frame_specs(config):
    """(window spec, tile spec) factories for q, k, v and dy frames of c channels, as the
    kernels read them (pairs of channels where ``config.packed``)."""

    def window(channels):
        return functools.partial(_window_spec, config.frame, config.stored(channels))

    def tile(channels):
        return functools.partial(_in_tile, config.frame, config.stored(channels))

    return window, tile


def _out_tile(frame: Frame, channels: int, heads: int) -> pl.BlockSpec:
    return pl.BlockSpec((1, channels, heads, frame.tile), lambda b, t: (b, 0, 0, t))


_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)


def _shared_specs(frame: Frame) -> dict[str, pl.BlockSpec]:
    """What every kernel reads beside its frames: the rows and columns of the positions
    (one for all images), the relative tables (SMEM scalars)."""
    return dict(
        rows_ref=_shared_tile(frame), columns_ref=_shared_tile(frame), rel_row=_SMEM, rel_col=_SMEM
    )


def _call(config, kernel, name, inputs, in_specs, out_specs, outputs, cost, scratch=None):
    """``kernel(config, *input refs, *output refs, **scratch refs)`` over (B, c, N, ·)
    frames on a (B, tiles) grid, by the kernels' call protocol (Pallas' own, as jax's
    ``flash_attention.py``): ``inputs``, ``in_specs``, ``out_specs`` and ``scratch`` are
    dicts in the kernel's argument order whose absent entries are None (no keys, no
    tables: the kernel gets None); rank-4 inputs are the frames, the others are shared by
    every image. ``out_specs`` and ``scratch`` hold ``f(heads)``. ``outputs(batch, heads)``
    and ``cost(batch, heads)`` give the output shapes and the ``CostEstimate`` for one
    device's images and heads (``shards.per_group``). Returns the outputs by name (None
    where absent).

    Everything but the arrays follows from ``(config, name)``: the device program is
    built once per pair (``shards.device_program``) and shared by every layer of that
    shape."""
    specs = [in_specs[n] if x is not None else None for n, x in inputs.items()]
    on_device = shards.device_program(
        (config, name),
        lambda: _on_device(config, kernel, name, specs, out_specs, outputs, cost, scratch or {}),
    )

    def out_shapes(batch, heads):
        shapes = outputs(batch, heads)
        return [shapes[n] if out_specs[n] is not None else None for n in out_specs]

    arrays = list(inputs.values())
    results = shards.per_group(
        on_device,
        [x is not None and x.ndim == 4 for x in arrays],
        local_only=config.interpret is not False,  # TPU interpret mode: one CPU device
        heads_axis=HEADS_AXIS,
        merge=False,
        out_shapes=out_shapes,
    )(*arrays)
    return dict(zip(out_specs, results, strict=True))


def _on_device(config, kernel, name, specs, out_specs, outputs, cost, scratch):
    """``_call``'s ``pallas_call`` on one device's frames (None for an absent operand)."""

    def at(heads, spec):
        return spec(heads) if callable(spec) else spec

    def on_device(*frames):
        first = next(x for x in frames if x is not None and x.ndim == 4)
        batch, heads = first.shape[0], first.shape[HEADS_AXIS]
        shapes = outputs(batch, heads)
        return pl.pallas_call(
            functools.partial(kernel, config),
            grid=(batch, config.frame.num_tiles),
            in_specs=[at(heads, spec) for spec in specs],
            out_specs=[at(heads, spec) for spec in out_specs.values()],
            out_shape=[shapes[n] if out_specs[n] is not None else None for n in out_specs],
            scratch_shapes={n: at(heads, shape) for n, shape in scratch.items()},
            compiler_params=_PARALLEL,
            interpret=config.interpret,
            cost_estimate=cost(batch, heads),
            name=name,
        )(*frames)

    return on_device


# ------------------------------------------------------------------------ accounting


def costs(
    q_shape,
    value_dim: int,
    kernel_size: int,
    *,
    has_key: bool,
    itemsize: int,
    tile: int | None = None,
) -> dict[str, pl.CostEstimate]:
    """The kernels' own FLOP, exp and HBM-byte counts (``pallas.costs``) for queries of
    ``q_shape`` (B, H, W, N, d) at ``tile`` (default: ``choose_tile``'s): what each
    ``pallas_call`` passes to XLA as its ``CostEstimate``."""
    frame = Frame.of(q_shape, kernel_size, tile, value_dim=value_dim)
    return kernel_costs(
        programs=frame.batch * frame.heads * frame.num_tiles,
        tile=frame.tile,
        window=frame.tile + 2 * frame.halo,
        kernel_size=kernel_size,
        head_dim=q_shape[-1],
        value_dim=value_dim,
        has_key=has_key,
        itemsize=itemsize,
        out_itemsize=itemsize,
    )


def _costs(config, batch: int, heads: int) -> dict[str, pl.CostEstimate]:
    """``costs`` for one device's ``batch`` images and ``heads`` heads, the frames at q's
    own itemsize (packed pairs move the same bytes per channel)."""
    frame = config.frame
    q_shape = (batch, frame.height, frame.width, heads, config.head_dim)
    return costs(
        q_shape,
        config.value_dim,
        config.kernel_size,
        has_key=config.has_key,
        itemsize=jnp.dtype(config.input_dtypes[0]).itemsize,
        tile=frame.tile,
    )


# ------------------------------------------------------------------------ custom VJP


def _constants(rel, config):
    """What every kernel reads beside the frames: the tables as SMEM scalars in the
    accumulation dtype (float32; float64 for the float64 tests), the positions' rows and
    columns."""
    tables = (None, None) if rel is None else tuple(t.astype(config.dtype) for t in rel)
    return (*tables, config.frame.rows(), config.frame.columns())


def _run_forward(config, q_frame, k_frame, v_frame, rel_row, rel_col, rows, columns):
    frame = config.frame
    d, dv = config.head_dim, config.value_dim
    out_len = frame.num_tiles * frame.tile
    frame_window, frame_tile = _frame_specs(config)
    outputs = _call(
        config,
        _forward_kernel,
        f"{KERNEL_NAME_PREFIX}fwd_tpu",
        dict(
            q_ref=q_frame,
            k_ref=k_frame,
            v_ref=v_frame,
            rows_ref=rows,
            columns_ref=columns,
            rel_row=rel_row,
            rel_col=rel_col,
        ),
        dict(
            q_ref=frame_tile(d),
            k_ref=frame_window(d),
            v_ref=frame_window(dv),
            **_shared_specs(frame),
        ),
        dict(
            y_ref=functools.partial(_out_tile, frame, dv),
            lse_ref=functools.partial(_out_tile, frame, 1),
        ),
        lambda b, n: dict(
            y_ref=jax.ShapeDtypeStruct((b, dv, n, out_len), config.input_dtypes[2]),
            lse_ref=jax.ShapeDtypeStruct((b, 1, n, out_len), config.dtype),
        ),
        lambda b, n: _costs(config, b, n)["forward"],
    )
    return outputs["y_ref"], outputs["lse_ref"]


def _run_backward(config, frames, constants, dy_frame, stats_frame):
    q_frame, k_frame, v_frame = frames
    rel_row, rel_col, rows, columns = constants
    frame = config.frame
    d, dv, k = config.head_dim, config.value_dim, config.kernel_size
    out_len = frame.num_tiles * frame.tile
    window = functools.partial(_window_spec, frame)
    in_tile = functools.partial(_in_tile, frame)
    frame_window, frame_tile = _frame_specs(config)
    out_tile = functools.partial(_out_tile, frame)
    cost = functools.partial(_costs, config)
    slots = _round_up(k * d, LANES)  # lanes of the tables' partial sums
    has_rel = config.has_rel

    def d_rel_spec(heads):
        return pl.BlockSpec((1, 1, heads, slots), lambda b, t: (b, t, 0, 0))

    dq_out = _call(
        config,
        _dq_kernel,
        f"{KERNEL_NAME_PREFIX}dq_tpu",
        dict(
            q_ref=q_frame,
            dy_ref=dy_frame,
            stats_ref=stats_frame,
            k_ref=k_frame,
            v_ref=v_frame,
            rows_ref=rows,
            columns_ref=columns,
            rel_row=rel_row,
            rel_col=rel_col,
        ),
        dict(
            q_ref=frame_tile(d),
            dy_ref=frame_tile(dv),
            stats_ref=functools.partial(in_tile, 2),
            k_ref=frame_window(d),
            v_ref=frame_window(dv),
            **_shared_specs(frame),
        ),
        dict(dq_ref=functools.partial(out_tile, d), d_rel_ref=d_rel_spec if has_rel else None),
        lambda b, n: dict(
            dq_ref=jax.ShapeDtypeStruct((b, d, n, out_len), config.input_dtypes[0]),
            d_rel_ref=jax.ShapeDtypeStruct((b, frame.num_tiles, n, slots), config.dtype),
        ),
        lambda b, n: cost(b, n)["dq"],
        scratch=dict(
            accumulator=(lambda n: pltpu.VMEM((k * d, n, frame.chunk), config.dtype))
            if has_rel
            else None
        ),
    )

    dkv_out = _call(
        config,
        _dkv_kernel,
        f"{KERNEL_NAME_PREFIX}dkv_tpu",
        dict(
            k_ref=k_frame,
            v_ref=v_frame,
            q_ref=q_frame,
            dy_ref=dy_frame,
            stats_ref=stats_frame,
            rows_ref=rows,
            columns_ref=columns,
            rel_row=rel_row,
            rel_col=rel_col,
        ),
        dict(
            k_ref=frame_tile(d),
            v_ref=frame_tile(dv),
            q_ref=frame_window(d),
            dy_ref=frame_window(dv),
            stats_ref=functools.partial(window, 2),
            **_shared_specs(frame),
        ),
        dict(
            dk_ref=functools.partial(out_tile, d) if config.has_key else None,
            dv_ref=functools.partial(out_tile, dv),
        ),
        lambda b, n: dict(
            dk_ref=jax.ShapeDtypeStruct((b, d, n, out_len), config.input_dtypes[1] or config.dtype),
            dv_ref=jax.ShapeDtypeStruct((b, dv, n, out_len), config.input_dtypes[2]),
        ),
        lambda b, n: cost(b, n)["dkv"],
    )
    d_rel = None
    if has_rel:
        # One partial sum per (image, tile, head), summed here: XLA reduces it across
        # devices once, like any parameter's gradient.
        sums = dq_out["d_rel_ref"].sum(axis=(0, 1, 2))[: k * d]
        half = d // 2
        d_rel = (sums[: k * half].reshape(k, half), sums[k * half :].reshape(k, half))
    return dq_out["dq_ref"], dkv_out["dk_ref"], dkv_out["dv_ref"], d_rel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_frame, k_frame, v_frame, rel, config):
    """(B, c, N, L) frames (k_frame None without keys) -> y, (B, dv, N, tiles·T)."""
    return _attention_fwd(q_frame, k_frame, v_frame, rel, config)[0]


def _attention_fwd(q_frame, k_frame, v_frame, rel, config):
    frames = tuple(_pack(config, f) for f in (q_frame, k_frame, v_frame))
    y_tiles, lse_tiles = _run_forward(config, *frames, *_constants(rel, config))
    # The frames (packed or in their own dtype: the same bytes) are the saved inputs, with
    # y and the log-sum-exp: nothing of size k² per pixel.
    return y_tiles, (frames, y_tiles, lse_tiles, rel)


def _attention_bwd(config, saved, dy_tiles):
    frames, y_tiles, lse_tiles, rel = saved
    frame = config.frame
    dy_tiles = dy_tiles.astype(config.input_dtypes[2])
    # Σ_o p_o dy·v_o = dy·y per query, in the accumulation dtype.
    delta = jnp.sum(dy_tiles.astype(config.dtype) * y_tiles.astype(config.dtype), axis=1)
    stats = frame.tiles_to_frame(jnp.stack([lse_tiles[:, 0], delta], axis=1))
    dy_frame = _pack(config, frame.tiles_to_frame(dy_tiles))
    dq, dk, dv, d_rel = _run_backward(config, frames, _constants(rel, config), dy_frame, stats)

    def frame_gradient(tiles, dtype):  # the kernels write the tiles: zeros in the halos
        return None if dtype is None else frame.tiles_to_frame(tiles).astype(dtype)

    grads = [frame_gradient(g, t) for g, t in zip((dq, dk, dv), config.input_dtypes, strict=True)]
    if rel is not None:
        d_rel = tuple(g.astype(t.dtype) for g, t in zip(d_rel, rel, strict=True))
    return (*grads, d_rel)


_attention.defvjp(_attention_fwd, _attention_bwd)
