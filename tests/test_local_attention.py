"""local_attention against the float64 loop reference, its gradients and properties."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sasa_flax import local_attention, local_attention_weights
from tests import reference
from tests.helpers import (
    FD_STEP,
    TERMS,
    default_and_slow,
    make_inputs,
    of_present_inputs,
    outputs_and_gradients,
    relative_error,
)

IMPLS = ["patches", "shifted", "dense", "pallas"]

# (batch, height, width, heads, head_dim, value_dim): square, non-square, and
# smaller than the largest kernel.
SHAPES = [(2, 6, 6, 2, 4, 4), (1, 5, 7, 3, 6, 5), (2, 2, 3, 2, 4, 3)]


SQUARE, NON_SQUARE, SMALLER_THAN_KERNEL = SHAPES
# The default selection: both paddings, k = 1/3/7, a square, a non-square and a
# smaller-than-the-kernel image (2×3 under k = 3 and 7; 6×6 under k = 7), every term set.
DEFAULT_FLOAT32_CASES = [
    ("mask", 3, NON_SQUARE, TERMS[0]),
    ("zeros", 7, SMALLER_THAN_KERNEL, TERMS[0]),
    ("mask", 7, SQUARE, TERMS[1]),
    ("zeros", 1, NON_SQUARE, TERMS[2]),
    ("mask", 3, SMALLER_THAN_KERNEL, TERMS[2]),
    ("zeros", 3, SQUARE, TERMS[1]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "padding,kernel_size,shape,terms",
    default_and_slow(
        itertools.product(["mask", "zeros"], [1, 3, 5, 7], SHAPES, TERMS), DEFAULT_FLOAT32_CASES
    ),
)
def test_matches_reference_float32(rng, impl, padding, kernel_size, shape, terms):
    q, k, v, rel_row, rel_col = make_inputs(rng, shape, kernel_size, terms)
    y = local_attention(
        q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding, impl=impl
    )
    y_ref, _ = reference.local_attention(q, k, v, rel_row, rel_col, kernel_size, padding)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert relative_error(y, y_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "padding,kernel_size,shape",
    default_and_slow(
        itertools.product(["mask", "zeros"], [3, 7], SHAPES[:2]), [("mask", 7, NON_SQUARE)]
    ),
)
def test_matches_reference_bfloat16(rng, impl, padding, kernel_size, shape):
    q, k, v, rel_row, rel_col = make_inputs(rng, shape, kernel_size, TERMS[0])
    to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    y = local_attention(
        *map(to_bf16, (q, k, v, rel_row, rel_col)),
        kernel_size=kernel_size,
        padding=padding,
        impl=impl,
    )
    # The reference sees the same bf16-rounded inputs: we measure the op's own error.
    rounded = [np.asarray(to_bf16(x), np.float64) for x in (q, k, v, rel_row, rel_col)]
    y_ref, _ = reference.local_attention(*rounded, kernel_size, padding)
    assert y.dtype == jnp.bfloat16
    assert relative_error(y, y_ref) < 2e-2


# One gradient check per implementation by default; the hand-written backward passes
# (shifted, pallas) under the masked border, where their bookkeeping is hardest.
DEFAULT_GRADIENT_CASES = [
    ("patches", "zeros", 3, TERMS[2]),
    ("shifted", "mask", 5, TERMS[0]),
    ("dense", "zeros", 3, TERMS[0]),
    ("pallas", "mask", 3, TERMS[0]),
]


@pytest.mark.parametrize(
    "impl,padding,kernel_size,terms",
    default_and_slow(
        (
            (impl, padding, kernel_size, terms)
            for impl, padding, (kernel_size, terms) in itertools.product(
                IMPLS, ["mask", "zeros"], [(3, TERMS[0]), (5, TERMS[0]), (3, TERMS[2])]
            )
        ),
        DEFAULT_GRADIENT_CASES,
    ),
)
def test_gradients_float64(rng, impl, padding, kernel_size, terms):
    with jax.enable_x64(True):
        inputs = make_inputs(rng, (1, 4, 5, 2, 4, 3), kernel_size, terms, np.float64)
        # Differentiate w.r.t. every array argument that is present.
        f, args = of_present_inputs(
            functools.partial(local_attention, kernel_size=kernel_size, padding=padding, impl=impl),
            inputs,
        )
        assert f(*args).dtype == jnp.float64
        # custom_vjp implementations have no forward mode (a JAX limitation).
        modes = ("rev",) if impl in ("shifted", "pallas") else ("fwd", "rev")
        check_grads(jax.jit(f), args, order=1, modes=modes, atol=1e-6, rtol=1e-6, eps=FD_STEP)


@pytest.mark.parametrize("padding", ["mask", "zeros"])
def test_weights_match_reference(rng, padding):
    q, k, v, rel_row, rel_col = make_inputs(rng, (1, 4, 6, 2, 4, 4), 5, TERMS[0])
    weights = local_attention_weights(q, k, rel_row, rel_col, kernel_size=5, padding=padding)
    _, w_ref = reference.local_attention(q, k, v, rel_row, rel_col, 5, padding)
    assert weights.shape == w_ref.shape
    np.testing.assert_allclose(weights, w_ref, atol=1e-6)


def test_masked_border_weights_cover_exactly_the_in_image_neighbours(rng):
    q, k, _, rel_row, rel_col = make_inputs(rng, (1, 6, 6, 1, 4, 4), 5, TERMS[0])
    weights = np.asarray(
        local_attention_weights(q, k, rel_row, rel_col, kernel_size=5, padding="mask")
    )
    corner = weights[0, 0, 0, 0]  # pixel (0, 0): neighbours with dy, dx in -2..2
    in_image = np.zeros((5, 5), bool)
    in_image[2:, 2:] = True  # offsets dy >= 0 and dx >= 0
    assert np.all(corner[~in_image] == 0.0)
    assert np.all(corner[in_image] > 0.0)
    np.testing.assert_allclose(corner.sum(), 1.0, rtol=1e-6)
    edge = weights[0, 3, 5, 0]  # right edge: dx > 0 is outside
    assert np.all(edge[:, 3:] == 0.0) and np.all(edge[:, :3] > 0.0)
    np.testing.assert_allclose(weights.sum(axis=(-1, -2)), 1.0, rtol=1e-6)


def test_zeros_padding_gives_outside_neighbours_weight(rng):
    q, k, _, rel_row, rel_col = make_inputs(rng, (1, 5, 5, 1, 4, 4), 3, TERMS[0])
    weights = np.asarray(
        local_attention_weights(q, k, rel_row, rel_col, kernel_size=3, padding="zeros")
    )
    assert np.all(weights[0, 0, 0, 0] > 0.0)  # all 9, including the 5 outside
    np.testing.assert_allclose(weights.sum(axis=(-1, -2)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_values_come_back_under_mask(rng, impl):
    q, k, _, rel_row, rel_col = make_inputs(rng, (2, 5, 7, 2, 4, 3), 5, TERMS[0])
    v = np.full((2, 5, 7, 2, 3), 1.75, np.float32)
    y = local_attention(q, k, v, rel_row, rel_col, kernel_size=5, padding="mask", impl=impl)
    np.testing.assert_allclose(y, 1.75, rtol=1e-6)
    # With zero padding the zero values outside pull border pixels towards 0,
    # interior pixels (window inside the image) still give the constant back.
    y0 = np.asarray(
        local_attention(q, k, v, rel_row, rel_col, kernel_size=5, padding="zeros", impl=impl)
    )
    np.testing.assert_allclose(y0[:, 2:3, 2:5], 1.75, rtol=1e-6)
    assert np.all(y0[:, 0] < 1.75) and np.all(y0[:, :, 0] < 1.75)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "padding,dy,dx",
    default_and_slow(
        (
            (padding, dy, dx)
            for padding, (dy, dx) in itertools.product(["mask", "zeros"], [(2, 1), (0, 3), (1, 0)])
        ),
        [("mask", 2, 1), ("zeros", 0, 3)],
    ),
)
def test_relative_encoding_is_translation_equivariant(rng, impl, padding, dy, dx):
    size, ks = 12, 5
    r = ks // 2
    q, k, v, rel_row, rel_col = make_inputs(rng, (1, size, size, 2, 4, 4), ks, TERMS[0])
    shift = functools.partial(np.roll, shift=(dy, dx), axis=(1, 2))
    run = functools.partial(local_attention, kernel_size=ks, padding=padding, impl=impl)
    y = np.asarray(run(q, k, v, rel_row, rel_col))
    y_shifted = np.asarray(run(shift(q), shift(k), shift(v), rel_row, rel_col))
    # Pixels whose window lies inside the image before and after the shift, and
    # avoids what np.roll wrapped around.
    rows, cols = slice(r, size - r - dy), slice(r, size - r - dx)
    moved_rows, moved_cols = slice(r + dy, size - r), slice(r + dx, size - r)
    np.testing.assert_allclose(y_shifted[:, moved_rows, moved_cols], y[:, rows, cols], atol=1e-5)
    # And the comparison is not vacuous: the output is not itself shift-invariant.
    assert not np.allclose(
        y_shifted[:, moved_rows, moved_cols], y[:, moved_rows, moved_cols], atol=1e-3
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_heads_are_independent(rng, impl):
    q, k, v, rel_row, rel_col = make_inputs(rng, (1, 5, 6, 3, 4, 4), 3, TERMS[0])
    run = functools.partial(local_attention, kernel_size=3, impl=impl)
    y = np.asarray(run(q, k, v, rel_row, rel_col))
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[..., 2, :] = rng.standard_normal(x[..., 2, :].shape)
    y2 = np.asarray(run(q2, k2, v2, rel_row, rel_col))
    np.testing.assert_array_equal(y2[..., :2, :], y[..., :2, :])
    assert not np.allclose(y2[..., 2, :], y[..., 2, :])


def _per_channel_softmax_attention(q, k, v, kernel_size):
    """The bug of some public ports: one softmax per channel (logit q_c·k_c)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    r = kernel_size // 2
    _, height, width, _, _ = q.shape
    y = np.zeros_like(v)
    for i in range(height):
        for j in range(width):
            rows = range(max(0, i - r), min(height, i + r + 1))
            cols = range(max(0, j - r), min(width, j + r + 1))
            keys = np.stack([k[:, a, c] for a in rows for c in cols])  # (T, B, N, d)
            vals = np.stack([v[:, a, c] for a in rows for c in cols])
            logits = q[:, i, j][None] * keys
            p = np.exp(logits - logits.max(0))
            y[:, i, j] = (p / p.sum(0) * vals).sum(0)
    return y


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_is_a_dot_product_over_the_head_width(rng, impl):
    # Values equal across the channels of a head: one softmax per head gives
    # identical output channels; a per-channel softmax would not.
    q, k, _, _, _ = make_inputs(rng, (1, 5, 5, 2, 4, 4), 3, ("content",))
    v = np.repeat(rng.standard_normal((1, 5, 5, 2, 1)).astype(np.float32), 4, axis=-1)
    y = np.asarray(local_attention(q, k, v, kernel_size=3, impl=impl))
    np.testing.assert_allclose(y, np.repeat(y[..., :1], 4, axis=-1), atol=1e-6)
    # The property can fail: the per-channel bug breaks it.
    buggy = _per_channel_softmax_attention(q, k, v, 3)
    assert not np.allclose(buggy, np.repeat(buggy[..., :1], 4, axis=-1), atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap(rng, impl):
    q, k, v, rel_row, rel_col = make_inputs(rng, (2, 4, 5, 2, 4, 4), 3, TERMS[0])
    run = functools.partial(local_attention, kernel_size=3, padding="mask", impl=impl)
    eager = np.asarray(run(q, k, v, rel_row, rel_col))
    np.testing.assert_allclose(jax.jit(run)(q, k, v, rel_row, rel_col), eager, atol=1e-6)
    # vmap over a leading axis of stacked inputs, tables shared.
    stacked = [np.stack([x, 2 * x]) for x in (q, k, v)]
    batched = jax.vmap(run, in_axes=(0, 0, 0, None, None))(*stacked, rel_row, rel_col)
    np.testing.assert_allclose(batched[0], eager, atol=1e-6)
    np.testing.assert_allclose(batched[1], run(2 * q, 2 * k, 2 * v, rel_row, rel_col), atol=1e-6)


def _args(**overrides):
    q = jnp.zeros((1, 4, 4, 2, 4))
    args = dict(q=q, k=q, v=q, rel_row=jnp.zeros((3, 2)), rel_col=jnp.zeros((3, 2)), kernel_size=3)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(kernel_size=4), "kernel_size must be a positive odd integer"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=3.0), "kernel_size"),
        (dict(padding="same"), "padding must be one of"),
        (dict(impl="fast"), "impl must be one of"),
        (dict(q=jnp.zeros((4, 4, 2, 4))), "q must have shape"),
        (dict(k=jnp.zeros((1, 4, 4, 2, 6))), "k must have the same shape as q"),
        (dict(v=jnp.zeros((1, 4, 5, 2, 4))), "v must have shape"),
        (dict(rel_col=None), "rel_row and rel_col must be given together"),
        (
            dict(rel_row=jnp.zeros((5, 2))),
            r"rel_row must have shape \(kernel_size, head_dim // 2\)",
        ),
        (dict(rel_col=jnp.zeros((3, 3))), "rel_col must have shape"),
        (dict(k=None, rel_row=None, rel_col=None), "every logit would be zero"),
        (
            dict(
                q=jnp.zeros((1, 4, 4, 2, 3)),
                k=None,
                rel_row=jnp.zeros((3, 1)),
                rel_col=jnp.zeros((3, 1)),
            ),
            "must be even",
        ),
        (dict(q=jnp.zeros((1, 4, 4, 2, 4), jnp.int32), k=None), "q must be a floating-point array"),
    ],
)
def test_bad_arguments_raise_a_clear_error(overrides, match):
    args = _args(**overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        local_attention(q, k, v, args.pop("rel_row"), args.pop("rel_col"), **args)


FAST_IMPLS = ["shifted", "dense"]


@pytest.mark.parametrize(
    "size,kernel_size,chosen",
    [(7, 3, "shifted"), (5, 3, "dense"), (13, 7, "dense"), (14, 7, "shifted")],
)
def test_auto_dispatches_to_a_checked_implementation(rng, size, kernel_size, chosen):
    """Dense where H·W < 4·k² (the window covers most of the image), else shifted."""
    q, k, v, rel_row, rel_col = make_inputs(rng, (1, size, size, 2, 4, 4), kernel_size, TERMS[0])
    run = functools.partial(local_attention, q, k, v, rel_row, rel_col, kernel_size=kernel_size)
    np.testing.assert_array_equal(run(impl="auto"), run(impl=chosen))


@pytest.mark.slow
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", range(12))
def test_fast_implementation_agrees_with_patches(impl, dtype, seed):
    """Outputs and all gradients, over random shapes, windows, paddings and terms."""
    attention = functools.partial(local_attention, impl=impl)
    (fast_y, fast_grads), (ref_y, ref_grads) = outputs_and_gradients(attention, seed, dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert fast_y.dtype == ref_y.dtype == jnp.dtype(dtype)
    assert relative_error(fast_y, np.asarray(ref_y, np.float64)) < tol
    for fast, ref in zip(fast_grads, ref_grads, strict=True):
        assert fast.dtype == ref.dtype
        assert relative_error(fast, np.asarray(ref, np.float64)) < tol
