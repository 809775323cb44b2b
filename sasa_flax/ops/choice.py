"""Which implementation ``impl="auto"`` runs, per platform: the rule, the platforms it is
written for, and the TPU choice table it reads (``tpu_choices.json``, written by
``benchmarks/tpu_estimate.py --choices --write``; read-only here).

Every choice is made when a program is lowered (``per_platform``: one
``jax.lax.platform_dependent`` branch per platform), so that a function traced on a CPU
host and exported for CUDA or TPU gets that platform's choice.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable

import jax

from sasa_flax.ops import pallas

# The platforms lowered each for its own; every other ("rocm", ...) takes OTHER's branch.
PLATFORMS = ("cpu", "cuda", "tpu")
OTHER = "other"


def per_platform(branch: Callable[[str], Callable], *args):
    """``branch(platform)(*args)`` for the platform the program is lowered for: one
    ``platform_dependent`` branch per name of PLATFORMS, ``branch(OTHER)`` elsewhere."""
    branches = {platform: branch(platform) for platform in PLATFORMS}
    return jax.lax.platform_dependent(*args, default=branch(OTHER), **branches)


# On TPU and GPU, images of at most this many positions (16², so ResNet-50's 14² and 7²
# stages) attend as one masked dense block: (H·W)² work, but all of it matmuls on the
# matrix units, for at most 256 × 256 logits per head. On TPU the choice table below
# decides first, where it covers the shape; this rule is the fallback.
ACCELERATOR_DENSE_POSITIONS = 256

# The TPU choice table: per generation, ResNet-50's attention stages at 224² and k = 3…11,
# every implementation's estimated cycles for the layer (forward and gradients) and the
# cheapest, read from libtpu's static schedule (``benchmarks/tpu_estimate.py --choices``;
# a compile test regenerates part of it and fails when it is stale).
TPU_CHOICES = pathlib.Path(__file__).with_name("tpu_choices.json")


@functools.cache
def tpu_choices() -> dict:
    if not TPU_CHOICES.exists():
        return {}
    return json.loads(TPU_CHOICES.read_text())["generations"]


def table_key(height: int, width: int, head_dim: int, kernel_size: int) -> str:
    return f"{height}x{width}x{head_dim} k={kernel_size}"


def tpu_table_choice(height: int, width: int, kernel_size: int, head_dim: int) -> str | None:
    """The table's choice at this shape, or None where it has no entry: the implementation
    whose estimate is closest to the best on every generation measured (the one whose
    worst ratio to each generation's best is smallest)."""
    key = table_key(height, width, head_dim, kernel_size)
    rows = [table[key]["cycles"] for table in tpu_choices().values() if key in table]
    if not rows:
        return None
    impls = set.intersection(*(set(r) for r in rows))
    return min(sorted(impls), key=lambda i: max(r[i] / min(r.values()) for r in rows))


def auto_choice(
    platform: str,
    height: int,
    width: int,
    kernel_size: int,
    *,
    head_dim: int = 8,
    value_dim: int | None = None,
    itemsize: int = 4,
) -> str:
    """What ``impl="auto"`` runs on ``platform`` ("cpu", "cuda", "rocm", "tpu") for an
    H×W image, window k and heads of width ``head_dim`` (values ``value_dim``, default the
    same), inputs of ``itemsize`` bytes (the Mosaic kernels' VMEM depends on it). The one
    table of per-platform choices (docs/performance.md, tests):

    - cpu: "dense" when H·W < 4·k², else "shifted": measured side by side with
      ``benchmarks/local_attention.py`` (ratios in benchmarks/RESULTS.md), "shifted"
      beats "patches" everywhere and "dense" beats "shifted" only where the window
      covers most of the image.
    - cuda: "dense" up to ACCELERATOR_DENSE_POSITIONS, else "pallas" (the fused Triton
      kernels, ``ops/pallas/gpu.py``: nothing of size k² per pixel is stored for the
      backward). By rule: compiled to cubin for H100 in CI (deviceless, ``tests/test_compile.py``),
      not yet timed on a GPU.
    - tpu: the choice table (``tpu_choices.json``: the implementation libtpu's schedule
      estimates fastest at ResNet-50's stages: k = 3…11 on v5e, k = 7 on v4) where it covers
      the shape; elsewhere "dense" up to ACCELERATOR_DENSE_POSITIONS, else "pallas" (the
      Mosaic kernels, ``ops/pallas/tpu.py``) where a tile of them fits VMEM
      (``tpu.fits``), else "shifted". Estimated, never timed on a TPU.
    - rocm and anything else: "dense" up to ACCELERATOR_DENSE_POSITIONS, else "shifted"
      (its batched accelerator form): no kernel has been lowered for them.
    """
    positions = height * width
    value_dim = value_dim or head_dim
    if platform == "cpu":
        return "dense" if positions < 4 * kernel_size**2 else "shifted"
    fits = pallas.tpu.fits(height, width, kernel_size, head_dim, value_dim, itemsize=itemsize)
    if platform == "tpu" and value_dim == head_dim:
        chosen = tpu_table_choice(height, width, kernel_size, head_dim)
        if chosen is not None and (chosen != "pallas" or fits):
            return chosen
    if positions <= ACCELERATOR_DENSE_POSITIONS:
        return "dense"
    if platform == "tpu":
        return "pallas" if fits else "shifted"
    return "pallas" if platform == "cuda" else "shifted"
