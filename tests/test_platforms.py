"""Per-platform choices are made when a program is lowered: exported from this CPU host
for CUDA or TPU, a layer gets that platform's implementation (no GPU or TPU needed).

What this proves: the programs lower, with the right kernels, no loop over the batch and
nothing of size k² per pixel in float32. That is, the kernels pass Pallas' lowering rules
(for TPU, e.g. (8, 128) blocks). Triton's PTX compile and Mosaic's layout passes run only
on the hardware.
"""

import math
import re

import jax.numpy as jnp
import pytest

from sasa_flax import ops
from sasa_flax.tools import aot
from tests.helpers import ROOT, default_and_slow, exported_step

TRITON, MOSAIC = aot.KERNEL_TARGETS["cuda"], aot.KERNEL_TARGETS["tpu"]
# ResNet-50's four attention stages: (H = W, channels), 8 heads, k = 7.
STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]


def test_the_documented_choice_table_is_what_auto_chooses():
    """docs/performance.md's table of ``auto``'s choices at ResNet-50's stages (56², 28² |
    14², 7²; k = 7) is ``ops.auto_choice``'s: the one table, and this test keeps no copy."""
    text = (ROOT / "docs" / "performance.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:4]
        for line in text.splitlines()
        if line.startswith(("| CPU ", "| CUDA ", "| TPU "))
    }
    assert sorted(rows) == ["CPU", "CUDA", "TPU"], rows
    for name, platform in [("CPU", "cpu"), ("CUDA", "cuda"), ("TPU", "tpu")]:
        large, small = (re.findall(r'`"(\w+)"`', cell) for cell in rows[name])
        choice = [ops.auto_choice(platform, s, s, 7) for s, _ in STAGES]
        assert large[0] == choice[0] == choice[1], (name, large, choice)
        assert list(dict.fromkeys(small)) == list(dict.fromkeys(choice[2:])), (name, small, choice)


CASES = [(platform, *stage) for platform in ("cuda", "tpu") for stage in STAGES]


@pytest.mark.parametrize(
    "platform,size,channels", default_and_slow(CASES, default=[("cuda", 56, 64), ("tpu", 28, 128)])
)
def test_auto_exported_for_an_accelerator_gets_its_choice_and_no_batch_loop(
    platform, size, channels
):
    module = exported_step(platform, size, channels, "auto")
    choice = ops.auto_choice(platform, size, size, 7)
    # Forward, dq and dk/dv: three kernels, Triton for CUDA and Mosaic for TPU.
    kernels = module.count(f"@{TRITON}") + module.count(f"@{MOSAIC}")
    assert kernels == (3 if choice == "pallas" else 0)
    assert "stablehlo.while" not in module  # no lax.map over the batch, no interpreter
    if choice == "pallas":
        assert largest_float32(module) < weights_size(size, 7)


def largest_float32(module: str) -> int:
    """Elements of the largest float32 tensor any operation of the module computes.

    Scalar fills are left out: differentiating ``platform_dependent`` gives every branch
    an output slot for each other branch's residuals, filled with a broadcast zero (the
    CPU branch's (B, H, W, N, k²) weights among them). The branch index is a constant
    when lowering for one platform, so XLA drops the untaken branches and the fills.
    """
    largest = 0
    for line in module.splitlines():
        op = re.match(r"\s*%[\w#:]+ = \"?([\w.]+)", line)
        if not op or (op.group(1) == "stablehlo.broadcast_in_dim" and "(tensor<f32>)" in line):
            continue
        result = line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1]
        for dims in re.findall(r"tensor<((?:\d+x)+)f32>", result):
            largest = max(largest, math.prod(int(n) for n in dims.rstrip("x").split("x")))
    return largest


def weights_size(size: int, kernel_size: int, batch: int = 128, heads: int = 8) -> int:
    """Elements of the (B, H, W, N, k²) attention weights."""
    return batch * size * size * heads * kernel_size**2


def test_the_weights_check_can_fail():
    """ "shifted" keeps (B, H, W, N, k²) float32 weights for its backward: the check sees them."""
    module = exported_step("tpu", 28, 128, "shifted")
    assert largest_float32(module) >= weights_size(28, 7)


def test_the_cpu_export_keeps_the_cpu_rewrites():
    """The check above can fail: on CPU "shifted" maps over the batch (a while loop)."""
    assert "stablehlo.while" in exported_step("cpu", 28, 128, "auto", batch=2)


@pytest.mark.parametrize("platform,kernel", [("cuda", TRITON), ("tpu", MOSAIC)])
def test_pallas_exported_from_a_cpu_host_is_compiled_not_interpreted(platform, kernel):
    module = exported_step(platform, 16, 32, "pallas", batch=2)
    assert module.count(f"@{kernel}") == 3 and "stablehlo.while" not in module
    other = MOSAIC if kernel == TRITON else TRITON
    assert other not in module


def _position_pair_dots(dtype) -> list[str]:
    """The dot_generals of "dense" at 14² exported for TPU that span (P, P) = 196 × 196
    position pairs: q·k, weights·v and their gradients."""
    module = exported_step("tpu", 14, 256, "dense", batch=8, dtype=dtype)
    return [line for line in module.splitlines() if "dot_general" in line and "196x196" in line]


def test_dense_in_bfloat16_takes_one_pass_of_the_tpu_matrix_unit():
    """No HIGHEST (multi-pass on TPU) on the (P, P) matmuls in bfloat16; float32 keeps it,
    so the check can fail."""
    bfloat16 = _position_pair_dots(jnp.bfloat16)
    assert len(bfloat16) >= 4 and not any("HIGHEST" in line for line in bfloat16)
    float32 = _position_pair_dots(jnp.float32)
    assert float32 and all("HIGHEST" in line for line in float32)
