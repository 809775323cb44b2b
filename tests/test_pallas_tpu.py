"""The Mosaic (TPU) kernels of impl="pallas", run exactly on CPU in TPU interpret mode.

TPU interpret mode executes the kernel code a TPU would run (blocks, halos, lane
rotations, the online softmax, the dq and dk/dv programs) one grid point at a time, here
with race detection on. Every case is checked against the float64 loop reference
(outputs) and the reference expression evaluated in float64 (every gradient), at the
default tile and at the smallest tile (128 positions), which splits frames into several
tiles so that halos cross tile edges, image borders and row ends.

The default selection runs four cases; the rest of the grid is marked slow.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # races found, if any
from jax.experimental.pallas import tpu as pltpu

from sasa_flax import ops
from sasa_flax.ops import patches
from sasa_flax.ops.pallas import shards, tpu
from tests import reference
from tests.helpers import (
    TERMS,
    default_and_slow,
    make_inputs,
    random_case,
    relative_error,
    y_and_gradients,
)

RACES = pltpu.InterpretParams(detect_races=True)

# (batch, height, width, heads, d, dv), kernel_size: frames of one to four tiles.
SHAPES = [
    ((1, 20, 21, 2, 4, 3), 3),  # four tiles at the smallest tile
    ((2, 6, 5, 2, 8, 8), 5),  # a head width of 8: one sublane group
    ((1, 9, 40, 1, 6, 2), 9),  # reach 4·40 + 4 = 164: a halo of two lane groups
    ((1, 3, 4, 3, 2, 5), 7),  # image smaller than the window
    ((1, 12, 11, 1, 4, 4), 1),  # k = 1
]


def _splits(shape, kernel_size) -> bool:
    """Whether the smallest tile splits the frame into more tiles than the default."""
    smallest = tpu.LANES
    return (
        tpu.Frame.of(shape[:5], kernel_size, smallest).num_tiles
        > 1
        == tpu.Frame.of(shape[:5], kernel_size).num_tiles
    )


# Per frame, six cases in which every pair of values of two parameters (terms, padding,
# dtype, tile) meets at least once; the term sets rotate from frame to frame, so that the
# frames together meet more of the triples. The full product (78 cases, up to a minute
# each in the interpreter with race detection) was a third of the slow selection.
PAIRWISE = [  # (term set, padding, dtype, smallest tile)
    (0, "mask", "float32", False),
    (0, "zeros", "bfloat16", True),
    (1, "mask", "bfloat16", True),
    (1, "zeros", "float32", False),
    (2, "mask", "float32", True),
    (2, "zeros", "bfloat16", False),
]


def _pairwise(index: int, shape, kernel_size) -> list[tuple]:
    """``PAIRWISE`` on frame ``index``: the smallest tile only where it splits the frame
    into more tiles than the default (elsewhere it is the same program)."""
    cases = []
    for terms, padding, dtype, smallest in PAIRWISE:
        case = (
            shape,
            kernel_size,
            TERMS[(terms + index) % len(TERMS)],
            padding,
            dtype,
            smallest and _splits(shape, kernel_size),
        )
        if case not in cases:
            cases.append(case)
    return cases


DEFAULT = [
    (SHAPES[0][0], 3, TERMS[0], "mask", "float32", True),
    (SHAPES[1][0], 5, TERMS[2], "zeros", "bfloat16", False),
    (SHAPES[4][0], 1, TERMS[1], "zeros", "float32", True),
    (SHAPES[3][0], 7, TERMS[0], "mask", "bfloat16", False),
]
PAIRED = [case for i, (shape, k) in enumerate(SHAPES) for case in _pairwise(i, shape, k)]
CASES = PAIRED + [case for case in DEFAULT if case not in PAIRED]


@pytest.mark.parametrize(
    "shape,kernel_size,terms,padding,dtype,smallest", default_and_slow(CASES, DEFAULT)
)
def test_interpreted_kernels_match_the_float64_references(
    shape, kernel_size, terms, padding, dtype, smallest
):
    rng = np.random.default_rng(sum(shape) + kernel_size)
    inputs = make_inputs(rng, shape, kernel_size, terms)
    ours_in = [None if x is None else jnp.asarray(x, dtype) for x in inputs]
    exact_in = [None if x is None else np.asarray(x, np.float64) for x in ours_in]
    cotangent = rng.standard_normal(shape[:4] + (shape[5],))
    tile = tpu.LANES if smallest else None
    attention = functools.partial(tpu.local_attention, tile=tile, interpret=RACES)
    y, grads = y_and_gradients(
        attention,
        ours_in,
        jnp.asarray(cotangent, jnp.float32),
        kernel_size=kernel_size,
        padding=padding,
    )

    y_loop, _ = reference.local_attention(*exact_in, kernel_size, padding)
    with jax.enable_x64(True):
        _, exact_grads = y_and_gradients(
            patches.local_attention,
            [None if x is None else jnp.asarray(x) for x in exact_in],
            jnp.asarray(cotangent),
            kernel_size=kernel_size,
            padding=padding,
        )
    tol = 1e-5 if dtype == "float32" else 2e-2
    # Errors relative to the expected scale floored at 1: where the exact value is 0
    # (e.g. the gradients at k = 1), ours is float32 round-off.
    assert not interpret_pallas_call.races.races_found
    assert y.dtype == jnp.dtype(dtype) and y.shape == y_loop.shape
    assert relative_error(y, y_loop, floor=1.0) < tol
    assert len(grads) == len(exact_grads)
    for ours, exact, given in zip(
        grads, exact_grads, [x for x in ours_in if x is not None], strict=True
    ):
        assert ours.dtype == given.dtype and ours.shape == given.shape
        assert relative_error(ours, exact, floor=1.0) < tol


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_patches(seed):
    """Random shapes, windows (k = 1-9), paddings and term sets (``random_case``), float32,
    at the smallest tile: outputs and every gradient against "patches" in float64."""
    rng, shape, kernel_size, terms, padding = random_case(seed)
    inputs = [
        None if x is None else jnp.asarray(x) for x in make_inputs(rng, shape, kernel_size, terms)
    ]
    cotangent = rng.standard_normal(shape[:4] + (shape[5],))
    attention = functools.partial(tpu.local_attention, tile=tpu.LANES, interpret=RACES)
    y, grads = y_and_gradients(
        attention,
        inputs,
        jnp.asarray(cotangent, jnp.float32),
        kernel_size=kernel_size,
        padding=padding,
    )
    with jax.enable_x64(True):
        exact_y, exact_grads = y_and_gradients(
            patches.local_attention,
            [None if x is None else jnp.asarray(x, jnp.float64) for x in inputs],
            jnp.asarray(cotangent),
            kernel_size=kernel_size,
            padding=padding,
        )
    assert not interpret_pallas_call.races.races_found
    for ours, exact in zip([y, *grads], [exact_y, *exact_grads], strict=True):
        assert relative_error(ours, exact, floor=1.0) < 1e-5


@pytest.mark.parametrize("dtype,padding", [("bfloat16", "mask"), ("float32", "zeros")])
def test_wide_chunks_cross_chunk_and_tile_edges(dtype, padding):
    """Heads of 4 read two vregs of positions per inner iteration (``chunk_for``); at a
    tile of 512 a 24×40 image is two tiles of two such chunks, so neighbours cross chunk,
    tile, row and image edges. bfloat16 reads the frames as packed channel pairs (an odd
    value width leaves half a pair empty); float32 reads them one channel at a time."""
    shape, kernel_size = (1, 24, 40, 2, 4, 3), 5
    assert tpu.Frame.of(shape[:5], kernel_size, 512, value_dim=3).chunk == 2 * tpu.LANES
    rng = np.random.default_rng(5)
    inputs = [jnp.asarray(x, dtype) for x in make_inputs(rng, shape, kernel_size, TERMS[0])]
    cotangent = rng.standard_normal(shape[:4] + (shape[5],))
    attention = functools.partial(tpu.local_attention, tile=512, interpret=RACES)
    y, grads = y_and_gradients(
        attention,
        inputs,
        jnp.asarray(cotangent, jnp.float32),
        kernel_size=kernel_size,
        padding=padding,
    )
    with jax.enable_x64(True):
        exact_y, exact_grads = y_and_gradients(
            patches.local_attention,
            [jnp.asarray(x, jnp.float64) for x in inputs],
            jnp.asarray(cotangent),
            kernel_size=kernel_size,
            padding=padding,
        )
    assert not interpret_pallas_call.races.races_found
    tol = 1e-5 if dtype == "float32" else 2e-2
    for ours, exact in zip([y, *grads], [exact_y, *exact_grads], strict=True):
        assert relative_error(ours, exact, floor=1.0) < tol


def test_packed_pairs_round_trip_every_bfloat16_exactly():
    """``_pack`` then ``_unpack`` returns every bfloat16 bit pattern but NaNs as the same
    float32 value, an odd channel count padded with zeros."""
    bits = np.arange(2**16, dtype=np.uint16)
    values = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
    values = values[~jnp.isnan(values)]
    frame = values[: 3 * (values.size // 3)].reshape(1, 3, 1, -1)  # (B, c, N, L), c odd
    config = tpu._Config(
        3,
        "mask",
        True,
        False,
        None,
        4,
        3,
        jnp.float32,
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        False,
    )
    assert config.packed and config.stored(3) == 2
    packed = tpu._pack(config, frame)
    assert packed.shape == (1, 2, 1, frame.shape[-1]) and packed.dtype == jnp.uint32
    low, high = tpu._unpack(packed)
    widened = frame.astype(jnp.float32)
    np.testing.assert_array_equal(low[:, 0], widened[:, 0])
    np.testing.assert_array_equal(high[:, 0], widened[:, 1])
    np.testing.assert_array_equal(low[:, 1], widened[:, 2])
    np.testing.assert_array_equal(high[:, 1], 0.0)


def test_the_comparison_can_fail(monkeypatch):
    """Kernels that read every neighbour one position off are caught: the interpreter
    runs the kernels' own shifts, and the tolerance is far below such an error."""
    shape, kernel_size = SHAPES[0]
    q, k, v, _, _ = make_inputs(np.random.default_rng(0), shape, kernel_size, TERMS[1])
    y_loop, _ = reference.local_attention(q, k, v, None, None, kernel_size, "mask")
    attention = functools.partial(
        tpu.local_attention, kernel_size=kernel_size, padding="mask", interpret=RACES
    )
    assert relative_error(attention(q, k, v, None, None), y_loop, floor=1.0) < 1e-5
    shift = tpu.Frame.offset_shift
    monkeypatch.setattr(tpu.Frame, "offset_shift", lambda frame, dy, dx: shift(frame, dy, dx) + 1)
    # The kernels are kept traced per config: trace them anew, and forget these after.
    monkeypatch.setattr(shards, "_PROGRAMS", {})
    assert relative_error(attention(q, k, v, None, None), y_loop, floor=1.0) > 1e-2


def test_a_tile_that_is_not_a_multiple_of_128_is_refused():
    q, k, v, rel_row, rel_col = make_inputs(
        np.random.default_rng(0), (1, 4, 4, 1, 4, 4), 3, TERMS[0]
    )
    with pytest.raises(ValueError, match="tile must be a positive multiple of 128"):
        tpu.local_attention(q, k, v, rel_row, rel_col, kernel_size=3, padding="mask", tile=192)


# The stage shapes of every shipped config and Table 4 kernel size at image sizes up to
# 448 (8 heads): stage 1 at 224 (56², head width 8) to 448 (112²), stage 2 (16), stage 3 (32).
STAGE_SHAPES = [(112, 8), (96, 8), (56, 8), (56, 16), (48, 16), (28, 16), (28, 32), (24, 32)]


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("size,head", STAGE_SHAPES)
def test_a_tile_fits_vmem_at_every_stage_shape(size, head, kernel_size):
    """With bfloat16 frames (the trainer's compute dtype on TPU) the chosen tile's VMEM (the
    blocks and the spills, checked against libtpu's reports below) fits VMEM_BUDGET,
    within the smallest TPU VMEM (v4: 16 MiB per core); the tests compiling for v4
    (tests/test_compile.py) confirm it with libtpu at the largest of them. (In float32
    the largest windows do not fit, and impl="auto" runs "shifted" there.)"""
    tile = tpu.choose_tile(size, size, kernel_size, head, head, itemsize=2)
    halo = tpu.Frame.halo_for(size, size, kernel_size)
    assert tile % tpu.LANES == 0
    need = tpu.vmem_bytes(tile, halo, head, head, kernel_size, itemsize=2)
    assert need <= tpu.VMEM_BUDGET < 16 * 2**20  # v4: 16 MiB per core
    # The tile reads no more than the smallest tile does (the choice minimises reads).
    positions = size * size
    reads = lambda t: -(-positions // t) * (t + 2 * halo)  # noqa: E731
    assert reads(tile) <= reads(tpu.LANES)


def test_the_vmem_model_bounds_what_libtpu_allocated():
    """vmem_bytes (bfloat16 frames) against the VMEM libtpu reported for the largest kernel
    of each compile (v4, benchmarks/tpu_vmem.py): never below, at most 2.2x above."""
    for size, k, head, tile, mib in LIBTPU_VMEM:
        halo = tpu.Frame.halo_for(size, size, k)
        ratio = tpu.vmem_bytes(tile, halo, head, head, k, itemsize=2) / (mib * 2**20)
        assert 1.0 <= ratio <= 2.2, (size, k, head, tile, mib, ratio)


# (size, k, head width, tile, MiB of the largest kernel), from libtpu's VMEM reports on v4
# (benchmarks/tpu_vmem.py, 2026-12-07, libtpu 0.0.42.1, the kernels of issue 43: packed
# bfloat16 pairs up to heads of 16, two-vreg chunks for heads of 8).
LIBTPU_VMEM = [
    (56, 3, 8, 3328, 6.22),
    (56, 7, 8, 3328, 7.13),
    (56, 11, 8, 1280, 4.86),
    (56, 7, 8, 512, 2.64),
    (112, 7, 8, 3328, 7.39),
    (112, 11, 8, 1024, 5.43),
    (28, 3, 16, 896, 3.89),
    (28, 7, 16, 896, 5.42),
    (28, 11, 16, 512, 6.79),
    (56, 7, 16, 1664, 8.10),
    (14, 3, 32, 256, 3.75),
    (14, 7, 32, 256, 6.33),
    (14, 11, 32, 128, 11.87),
]


def test_no_tile_fits_raises_naming_the_fix_and_auto_runs_another_implementation():
    """k = 11 with heads of 64 at 112² (no shipped config): no tile of the kernels fits;
    impl="pallas" says so before compiling, impl="auto" runs "shifted" there."""
    assert not tpu.fits(112, 112, 11, 64, 64)
    with pytest.raises(tpu.TileError, match="impl='shifted'"):
        tpu.choose_tile(112, 112, 11, 64, 64)
    assert ops.auto_choice("tpu", 112, 112, 11, head_dim=64) == "shifted"
    assert ops.auto_choice("tpu", 112, 112, 11, head_dim=8) == "pallas"


KERNELS = ("_forward_kernel", "_dq_kernel", "_dkv_kernel")


def _count_kernel_traces(monkeypatch) -> collections.Counter:
    """Counts each kernel body's traces from now on, with no kept programs."""
    traced = collections.Counter()

    def counting(name, kernel):
        def traced_kernel(*args, **kwargs):
            traced[name] += 1
            return kernel(*args, **kwargs)

        return traced_kernel

    for name in KERNELS:
        monkeypatch.setattr(tpu, name, counting(name, getattr(tpu, name)))
    monkeypatch.setattr(shards, "_PROGRAMS", {})  # forgotten again after the test
    return traced


@pytest.mark.parametrize("platform", ["interpret", "tpu"])
def test_the_layers_of_a_stage_share_one_trace_of_each_kernel(monkeypatch, platform):
    """Three layers on frames of one shape and their gradients (a ResNet stage's blocks),
    in TPU interpret mode and exported for a TPU: each kernel body (forward, dq, dk/dv)
    is traced once, not once per layer, nor again to type the outputs (the unrolled
    bodies take seconds to trace: most of a SASA-ResNet step's lowering before). A layer
    of another shape gets its own; ``forget_device_programs`` makes them traced anew."""
    traced = _count_kernel_traces(monkeypatch)
    shape, kernel_size = SHAPES[1]
    rng = np.random.default_rng(0)
    layers = [make_inputs(rng, shape, kernel_size, TERMS[0]) for _ in range(3)]
    interpret = RACES if platform == "interpret" else False
    attention = functools.partial(
        tpu.local_attention, kernel_size=kernel_size, padding="zeros", interpret=interpret
    )

    def loss(layers):
        return sum(jnp.sum(attention(*inputs) ** (i + 1)) for i, inputs in enumerate(layers))

    def trace(layers):
        step = jax.grad(loss)
        if platform == "interpret":
            return jax.make_jaxpr(step)(layers)
        return jax.export.export(jax.jit(step), platforms=["tpu"])(layers)

    once = dict.fromkeys(KERNELS, 1)
    trace(layers)
    assert traced == once
    trace(layers)  # the same shapes again: nothing traced
    assert traced == once
    wider = make_inputs(rng, shape[:2] + (shape[2] + 3,) + shape[3:], kernel_size, TERMS[0])
    trace([wider])
    assert traced == dict.fromkeys(KERNELS, 2)
    shards.forget_device_programs()
    trace(layers)
    assert traced == dict.fromkeys(KERNELS, 3)
