"""impl="pallas": fused Pallas kernels, one module per accelerator.

- ``gpu``: Triton kernels, (B·N, L, d) frames with the head width on the lanes.
- ``tpu``: Mosaic kernels, (B, d, N, L) frames: heads on the sublanes, positions on the
  128 lanes.

``local_attention`` picks the kernels for the platform the program is lowered for
(``jax.lax.platform_dependent``): Triton on CUDA (and ROCm), Mosaic on TPU, and on CPU
the GPU kernels in Pallas' interpreter (exact, slow: a correctness tool). Every kernel
call is partitioned by XLA itself (``shards``): in any program, on any mesh, each device
runs the kernels on its own images and heads.
"""

from __future__ import annotations

import functools

import jax

from sasa_flax.ops.pallas import gpu, shards, tpu


def compiled(platform: str, **options):
    """The kernels compiled for ``platform`` ("tpu": Mosaic; anything else: Triton), as
    ``f(q, k, v, rel_row, rel_col)`` with ``options`` (kernel_size, padding) bound."""
    kernels = tpu if platform == "tpu" else gpu
    return functools.partial(kernels.local_attention, interpret=False, **options)


def local_attention(q, k, v, rel_row, rel_col, *, kernel_size: int, padding: str) -> jax.Array:
    """See ``sasa_flax.ops.local_attention``. Returns (B, H, W, N, dv) in v's dtype."""
    options = dict(kernel_size=kernel_size, padding=padding)
    interpreted = functools.partial(gpu.local_attention, interpret=True, **options)
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        rel_row,
        rel_col,
        cpu=interpreted,
        tpu=compiled("tpu", **options),
        default=compiled("cuda", **options),
    )


__all__ = ["compiled", "gpu", "local_attention", "shards", "tpu"]
