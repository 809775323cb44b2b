"""The roofline cost model (benchmarks/roofline.py): its arithmetic, not a timing.

The kernels' own FLOP and byte accounting is cross-checked against XLA's count of the same
math ("shifted") and against the least any implementation must move, and the TPU export is
checked to carry that accounting to XLA.
"""

import jax.numpy as jnp
import pytest

from benchmarks import roofline
from sasa_flax.ops.pallas import tpu
from tests.helpers import exported_step


def test_the_bound_is_the_slower_of_compute_and_memory():
    peak, bandwidth, _ = roofline.HARDWARE["TPU v5e"]
    assert roofline.bound_seconds(peak, 0, "TPU v5e") == pytest.approx(1.0)
    assert roofline.bound_seconds(0, bandwidth, "TPU v5e") == pytest.approx(1.0)
    assert roofline.bound_seconds(peak, 2 * bandwidth, "TPU v5e") == pytest.approx(2.0)


@pytest.fixture(scope="module")
def table():
    rows = roofline.rows(
        [(14, 64)],
        [5],
        batch=2,
        heads=8,
        dtype=jnp.bfloat16,
        impls=("pallas-tpu", "pallas-gpu", "shifted"),
    )
    return {row["impl"]: row for row in rows}


def test_rows_are_relative_to_the_convolution(table):
    for hardware in roofline.HARDWARE:
        assert table["conv 3×3"][f"{hardware} ÷ conv"] == pytest.approx(1.0)
        ratio = table["pallas-tpu"][f"{hardware} ms"] / table["conv 3×3"][f"{hardware} ms"]
        assert table["pallas-tpu"][f"{hardware} ÷ conv"] == pytest.approx(ratio)


def test_kernel_accounting_agrees_with_xla_and_the_least_bytes(table):
    # The same math as XLA counts it for "shifted": the kernels count padding columns
    # and tile tails too, so more, but the same order (a lost k² factor would be 25×).
    for kernels in ("pallas-tpu", "pallas-gpu"):
        assert 1.0 <= table[kernels]["gflop"] / table["shifted"]["gflop"] < 3.0
    # At the least, q, k, v and dy are read and y, dq, dk, dv written once.
    tensor = 2 * 14 * 14 * 64 * 2  # batch 2, bfloat16
    assert table["pallas-tpu"]["gbytes"] * 1e9 >= 8 * tensor


def test_the_tpu_export_carries_the_kernels_accounting():
    module = exported_step("tpu", 28, 128, "pallas", batch=2)
    for cost in tpu.costs((2, 28, 28, 8, 16), 16, 7, has_key=True, itemsize=2).values():
        assert f"bytes_accessed\\22:{cost.bytes_accessed}" in module
