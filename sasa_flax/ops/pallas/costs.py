"""What the fused kernels compute and move, by their own accounting (both platforms).

Counted per query position and offset, for every program's tile (padding columns and
the tile tail included), with each program reading its tile plus a halo window once:
on TPU the blocks are exactly that; on GPU it assumes a program's k² shifted reads of
the same window hit in cache after the first. The Mosaic (TPU) calls pass it to XLA as
``pl.CostEstimate``; the Triton ones do not (Pallas' Triton lowering takes none); both are
read by ``benchmarks/roofline``. Not the model's FLOP count: that is ``sasa_flax.costs``.
"""

from __future__ import annotations

from jax.experimental import pallas as pl


def kernel_costs(
    *,
    programs: int,
    tile: int,
    window: int,
    kernel_size: int,
    head_dim: int,
    value_dim: int,
    has_key: bool,
    itemsize: int,
    out_itemsize: int,
) -> dict[str, pl.CostEstimate]:
    """FLOPs, exps and HBM bytes of the forward, dq and dk/dv kernels.

    ``window``: positions a program reads around its tile (tile + 2·halo); ``itemsize``
    of the frames (q, k, v, dy), ``out_itemsize`` of what the kernels write (y, dq, dk,
    dv); the log-sum-exp and (lse, Σ dy·y) rows and the in-image mask are float32.
    """
    queries = programs * tile
    k2 = kernel_size**2
    d, dv, dk = head_dim, value_dim, head_dim * has_key
    # forward, per query and offset: q·(k + r) 3d, online softmax ~6, acc·rescale + w·v 3dv
    forward = k2 * queries * (3 * d + 3 * dv + 6)
    forward_bytes = programs * (
        d * tile * itemsize
        + (dk + dv) * window * itemsize
        + window * 4
        + dv * tile * out_itemsize
        + tile * 4
    )
    # dq: logit 3d, ds 2dv + 3, dq 2d, the tables' Σ ds·q 2d; dk/dv: logit 3d, dv 2dv,
    # ds 2dv + 3, dk 2d
    dq = k2 * queries * (7 * d + 2 * dv + 5)
    dq_bytes = programs * (
        (d + dv) * tile * itemsize
        + 8 * tile
        + (dk + dv) * window * itemsize
        + window * 4
        + d * tile * out_itemsize
        + d * k2 * 4
    )
    dkv = k2 * queries * (5 * d + 4 * dv + 5)
    dkv_bytes = programs * (
        (dk + dv) * tile * itemsize
        + (d + dv) * window * itemsize
        + 3 * window * 4
        + (dk + dv) * tile * out_itemsize
    )
    exps = k2 * queries
    return {
        "forward": pl.CostEstimate(int(forward), int(2 * exps), int(forward_bytes)),
        "dq": pl.CostEstimate(int(dq), int(exps), int(dq_bytes)),
        "dkv": pl.CostEstimate(int(dkv), int(exps), int(dkv_bytes)),
    }
