"""block_local_attention (the stem's operator) against the float64 loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sasa_flax import block_local_attention
from tests import reference
from tests.helpers import FD_STEP


def make_inputs(rng, block_size, positional, shape=(2, 8, 4, 2, 4), dtype=np.float32):
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    tables = (None, None)
    if positional:
        tables = tuple(
            rng.standard_normal((2 * block_size - 1, shape[-1] // 2)).astype(dtype)
            for _ in range(2)
        )
    return q, k, v, *tables


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("positional", [True, False])
def test_matches_reference(rng, block_size, positional):
    q, k, v, rel_row, rel_col = make_inputs(rng, block_size, positional)
    y = block_local_attention(q, k, v, rel_row, rel_col, block_size=block_size)
    y_ref = reference.block_local_attention(q, k, v, rel_row, rel_col, block_size)
    assert np.max(np.abs(np.asarray(y) - y_ref)) / np.max(np.abs(y_ref)) < 1e-5


def test_gradients_float64(rng):
    with jax.enable_x64(True):
        args = make_inputs(rng, 2, True, shape=(1, 4, 4, 2, 4), dtype=np.float64)
        f = lambda *a: block_local_attention(*a, block_size=2)
        check_grads(
            jax.jit(f),
            tuple(map(jnp.asarray, args)),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
            eps=FD_STEP,
        )


def test_blocks_do_not_see_each_other(rng):
    q, k, v, rel_row, rel_col = make_inputs(rng, 2, True)
    y = np.asarray(block_local_attention(q, k, v, rel_row, rel_col, block_size=2))
    v2 = v.copy()
    v2[:, 2:4, 0:2] += 1.0  # one block changes
    y2 = np.asarray(block_local_attention(q, k, v2, rel_row, rel_col, block_size=2))
    changed = np.zeros(y.shape[1:3], bool)
    changed[2:4, 0:2] = True
    np.testing.assert_array_equal(y2[:, ~changed], y[:, ~changed])
    assert not np.allclose(y2[:, changed], y[:, changed])


def test_size_not_a_multiple_of_the_block_is_refused(rng):
    q, k, v, *_ = make_inputs(rng, 3, False)
    with pytest.raises(ValueError, match="multiples of block_size=3"):
        block_local_attention(q, k, v, block_size=3)


def test_the_shared_argument_rules_apply_and_name_the_block(rng):
    """The q/k/v/table rules are local attention's (written once), worded for blocks."""
    q, k, v, rel_row, rel_col = make_inputs(rng, 2, True)
    with pytest.raises(ValueError, match=r"\(2 \* block_size - 1, head_dim // 2\) = \(3, "):
        block_local_attention(q, k, v, rel_row[:2], rel_col, block_size=2)
    with pytest.raises(ValueError, match="v must be a floating-point array"):
        block_local_attention(q, k, v.astype(np.int32), block_size=2)
    with pytest.raises(ValueError, match="given together"):
        block_local_attention(q, k, v, rel_row, None, block_size=2)
    with pytest.raises(ValueError, match="positive integer"):
        block_local_attention(q, k, v, block_size=0)
