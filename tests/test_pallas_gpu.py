"""The Pallas kernels (impl="pallas") at tile sizes that split images into many tiles.

The default selection runs the forward at both tiles on one random case, the tile error
and the Triton lowering; the interpreted grids (forward sweep, float64 gradients,
agreement with "patches") are marked slow.

On CPU the kernels run in Pallas' interpret mode, which executes exactly the kernel
code a GPU would (loads, masks, online softmax, the three backward programs) one
program at a time. ``test_local_attention.py`` runs the shared property tests on
"pallas" with its default tile; here tiles of 4 and 16 positions put tile edges
inside rows, at borders and in the padding columns.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sasa_flax.ops.pallas import gpu
from tests import reference
from tests.helpers import (
    FD_STEP,
    TERMS,
    default_and_slow,
    make_inputs,
    of_present_inputs,
    outputs_and_gradients,
    random_case,
    relative_error,
)

TILES = [4, 16]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("seed", default_and_slow(range(10), [0]))
def test_forward_matches_reference(tile, seed):
    rng, shape, kernel_size, terms, padding = random_case(seed)
    q, k, v, rel_row, rel_col = make_inputs(rng, shape, kernel_size, terms)
    y = gpu.local_attention(
        q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding, tile=tile
    )
    y_ref, _ = reference.local_attention(q, k, v, rel_row, rel_col, kernel_size, padding)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert relative_error(y, y_ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "padding,kernel_size,terms", list(itertools.product(["mask", "zeros"], [3, 5], TERMS))
)
def test_gradients_float64(rng, padding, kernel_size, terms):
    """Reverse-mode gradients of every input against finite differences."""
    with jax.enable_x64(True):
        inputs = make_inputs(rng, (2, 4, 5, 2, 4, 3), kernel_size, terms, np.float64)
        f, args = of_present_inputs(
            functools.partial(
                gpu.local_attention, kernel_size=kernel_size, padding=padding, tile=4
            ),
            inputs,
        )
        assert f(*args).dtype == jnp.float64
        check_grads(jax.jit(f), args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=FD_STEP)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", range(10, 18))
def test_gradients_agree_with_patches(dtype, seed):
    """Output and all gradients against the reference expression, random cases."""
    attention = functools.partial(gpu.local_attention, tile=16)
    (fused_y, fused_grads), (ref_y, ref_grads) = outputs_and_gradients(attention, seed, dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert fused_y.dtype == jnp.dtype(dtype)
    assert relative_error(fused_y, np.asarray(ref_y, np.float64)) < tol
    for ours, ref in zip(fused_grads, ref_grads, strict=True):
        assert ours.dtype == ref.dtype
        # Relative to the gradient's scale, floored at the unit scale of the inputs:
        # where the exact gradient is 0 (k = 1, a softmax over one neighbour) ours is
        # float32 round-off (~1e-6), because Σ_o p_o dy·v_o is taken as dy·y
        # (FlashAttention's backward) and the two sums round differently.
        assert relative_error(ours, np.asarray(ref, np.float64), floor=1.0) < tol


def _triton_kernels(fn, *avals) -> int:
    """Lowers ``fn`` for CUDA (no GPU needed) and counts the Triton kernels in it.

    Pallas' Triton lowering runs here in full, with its checks (power-of-two
    blocks, supported ops, dtypes); only Triton's own PTX compilation is left to
    the GPU.
    """
    triton_call = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(fn),
        platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton_call)],
    )(*avals)
    return exported.mlir_module().count(f"@{triton_call}")


@pytest.mark.parametrize(
    "shape,kernel_size,padding,terms,dtype",
    [
        ((8, 56, 56, 8, 8, 8), 7, "mask", TERMS[0], jnp.bfloat16),  # ResNet-50 stage 2
        ((2, 14, 14, 8, 32, 32), 11, "zeros", TERMS[0], jnp.float32),
        ((2, 9, 5, 3, 6, 5), 3, "mask", TERMS[1], jnp.float32),  # widths padded to 8
        ((1, 7, 7, 2, 4, 4), 1, "zeros", TERMS[2], jnp.bfloat16),  # position only
    ],
)
def test_kernels_lower_to_triton_for_gpu(shape, kernel_size, padding, terms, dtype):
    batch, height, width, heads, d, dv = shape
    aval = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    q = aval(batch, height, width, heads, d)
    k = q if "content" in terms else None
    table = aval(kernel_size, d // 2) if "relative" in terms else None
    attention = functools.partial(
        gpu.local_attention, kernel_size=kernel_size, padding=padding, interpret=False
    )

    def loss(q, v, k=None, rel_row=None, rel_col=None):
        return jnp.sum(attention(q, k, v, rel_row, rel_col).astype(jnp.float32))

    args = [q, aval(batch, height, width, heads, dv)] + [k, table, table]
    assert _triton_kernels(lambda *a: attention(a[0], a[2], a[1], a[3], a[4]), *args) == 1
    # Forward (recomputed for the residuals), dq and dk/dv.
    assert _triton_kernels(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args) == 3


def test_tile_must_be_a_power_of_two(rng):
    q, k, v, rel_row, rel_col = make_inputs(rng, (1, 4, 4, 1, 4, 4), 3, TERMS[0])
    with pytest.raises(ValueError, match="tile must be a power of two; got 12"):
        gpu.local_attention(q, k, v, rel_row, rel_col, kernel_size=3, padding="mask", tile=12)
