r"""A cost model to plan with until hardware numbers exist: an ESTIMATE, not a timing.

    python -m benchmarks.roofline                       # ResNet-50 stages, k = 3, 7, 11
    python -m benchmarks.roofline --shapes 56x64 --kernel-sizes 7 --json

For each implementation of the attention core (q, k, v and the relative tables to y,
forward and backward: the gradients of all of them) at each stage shape (batch 128,
bfloat16, 8 heads) it counts the FLOPs and the HBM bytes moved:

- ``pallas-tpu`` / ``pallas-gpu``: the kernels' own accounting (``ops/pallas/costs.py``:
  forward, dq and dk/dv kernels), plus XLA's count for the layout changes around them
  (building the frames of q, k, v and dy, reading y, dq, dk and dv back out);
- ``shifted``, ``dense``, ``patches``: XLA's cost analysis of the program compiled for
  this host's CPU (``shifted`` in its accelerator form: batched, no CPU rewrites). XLA
  fuses differently for a TPU or GPU, so its byte counts are indicative;
- ``conv 3×3`` (the layer attention replaces) and ``projections`` (the layer's three
  1×1 convolutions, W_Q, W_K, W_V, which every implementation adds), the same way.

From these it prints the roofline lower bound, max(FLOPs / peak, bytes / bandwidth), on
each accelerator of ``HARDWARE`` and its ratio to the 3×3 convolution's bound. The peak
used is the matrix unit's. The attention kernels do elementwise math on the vector
units, whose peak is lower (H100: 67 TFLOP/s FP32 against 989 bf16 on tensor cores;
TPUs do not publish theirs): for them the FLOP side of the bound is optimistic, and
the byte side is what to read. Nothing here ran on a TPU or GPU.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from sasa_flax.ops import dense, patches, shifted
from sasa_flax.ops.pallas import gpu, tpu

# name: (matrix-unit peak FLOP/s in bf16, HBM bytes/s, source)
HARDWARE = {
    "TPU v4": (275e12, 1.2e12, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 1,200 GB/s"),
    "TPU v5e": (197e12, 819e9, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 819 GB/s"),
    "H100 SXM": (
        989e12,
        3.35e12,
        "NVIDIA H100 datasheet: 989 TFLOP/s dense bf16 (tensor cores), 3.35 TB/s",
    ),
}
IMPLS = ("pallas-tpu", "pallas-gpu", "shifted", "dense", "patches")


def _avals(batch, size, channels, heads, kernel_size, dtype):
    d = channels // heads
    x = jax.ShapeDtypeStruct((batch, size, size, heads, d), dtype)
    table = jax.ShapeDtypeStruct((kernel_size, d // 2), dtype)
    return x, table


def _xla_cost(fn, *avals) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of ``fn`` compiled for this host (not run)."""
    analysis = jax.jit(fn).lower(*avals).compile().cost_analysis()
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def _fwd_bwd(attention):
    """The attention core and the gradients of every input, for a Σ y·c loss."""

    def loss(q, k, v, rel_row, rel_col):
        return jnp.sum(attention(q, k, v, rel_row, rel_col).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def xla_costs(impl, batch, size, channels, heads, kernel_size, dtype):
    x, table = _avals(batch, size, channels, heads, kernel_size, dtype)
    options = dict(kernel_size=kernel_size, padding="mask")
    if impl == "shifted":  # the accelerator form, not the CPU rewrites lowering here picks

        def attention(q, k, v, rel_row, rel_col):
            return shifted._attention(q, k, v, (rel_row, rel_col), kernel_size, "mask", False)
    else:
        attention = functools.partial(
            {"dense": dense, "patches": patches}[impl].local_attention, **options
        )
    return _xla_cost(_fwd_bwd(attention), x, x, x, table, table)


def kernel_costs(impl, batch, size, channels, heads, kernel_size, dtype):
    """Kernel accounting plus XLA's count for the frames around the kernels."""
    d = channels // heads
    itemsize = jnp.dtype(dtype).itemsize
    shape = (batch, size, size, heads, d)
    if impl == "pallas-tpu":
        frame = tpu.Frame.of(shape, kernel_size)
        kernels = tpu.costs(shape, d, kernel_size, has_key=True, itemsize=itemsize)
        to_frame, from_tiles = frame.to_frame, frame.from_tiles
        tiles = (batch, heads, d, frame.num_tiles * frame.tile)
        out_dtype = dtype
    else:
        kernels = gpu.costs(shape, d, kernel_size, has_key=True, itemsize=itemsize)
        frame = gpu.Frame.of(shape, kernel_size, gpu.DEFAULT_TILE)
        width = gpu._padded_width(d)
        to_frame = functools.partial(frame.to_frame, width=width)
        from_tiles = functools.partial(frame.from_tiles, channels=d)
        tiles = (batch, heads, frame.num_tiles * frame.tile, width)
        out_dtype = jnp.float32
    flops = sum(c.flops for c in kernels.values())
    kernel_bytes = sum(c.bytes_accessed for c in kernels.values())

    def layout(q, k, v, dy, y, dq, dk, dv):  # frames in, tile outputs out
        return [to_frame(a) for a in (q, k, v, dy)] + [from_tiles(a) for a in (y, dq, dk, dv)]

    x = jax.ShapeDtypeStruct(shape, dtype)
    out = jax.ShapeDtypeStruct(tiles, out_dtype)
    _, layout_bytes = _xla_cost(layout, x, x, x, x, out, out, out, out)
    return float(flops), float(kernel_bytes + layout_bytes)


def conv_costs(batch, size, channels, dtype, kernel_size=3):
    x = jax.ShapeDtypeStruct((batch, size, size, channels), dtype)
    w = jax.ShapeDtypeStruct((kernel_size, kernel_size, channels, channels), dtype)

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y.astype(jnp.float32))

    return _xla_cost(jax.grad(loss, argnums=(0, 1)), x, w)


def bound_seconds(flops: float, nbytes: float, hardware: str) -> float:
    peak, bandwidth, _ = HARDWARE[hardware]
    return max(flops / peak, nbytes / bandwidth)


def rows(shapes, kernel_sizes, batch, heads, dtype, impls):
    """Every row: shape, k, impl, FLOPs, bytes, and per hardware the bound and ÷ conv."""
    out = []
    for size, channels in shapes:
        conv = conv_costs(batch, size, channels, dtype)
        projection = conv_costs(batch, size, channels, dtype, kernel_size=1)
        projections = tuple(3 * c for c in projection)  # W_Q, W_K, W_V
        entries = [("conv 3×3", None, conv), ("projections (3 × 1×1)", None, projections)]
        for kernel_size in kernel_sizes:
            for impl in impls:
                counter = kernel_costs if impl.startswith("pallas") else xla_costs
                cost = counter(impl, batch, size, channels, heads, kernel_size, dtype)
                entries.append((impl, kernel_size, cost))
        for impl, kernel_size, (flops, nbytes) in entries:
            row = {
                "shape": f"{size}x{size}x{channels}",
                "k": kernel_size,
                "impl": impl,
                "gflop": flops / 1e9,
                "gbytes": nbytes / 1e9,
            }
            for hardware in HARDWARE:
                seconds = bound_seconds(flops, nbytes, hardware)
                row[f"{hardware} ms"] = seconds * 1e3
                row[f"{hardware} ÷ conv"] = seconds / bound_seconds(*conv, hardware)
            out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="56x64,28x128,14x256,7x512", help="SIZExCHANNELS,...")
    parser.add_argument("--kernel-sizes", default="3,7,11")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    table = rows(
        shapes,
        [int(k) for k in args.kernel_sizes.split(",")],
        args.batch,
        args.heads,
        jnp.bfloat16,
        args.impls.split(","),
    )
    if args.json:
        print(json.dumps({"estimate": True, "hardware": HARDWARE, "rows": table}, indent=1))
        return
    print(
        "ESTIMATE (roofline lower bounds from counted FLOPs and bytes; nothing was run on "
        f"an accelerator). Attention core fwd+bwd, batch {args.batch}, bfloat16, "
        f"{args.heads} heads, padding 'mask'.\n"
    )
    for name, (_, _, source) in HARDWARE.items():
        print(f"- {name}: {source}")
    names = list(HARDWARE)
    print(
        "\n| shape | k | impl | GFLOP | GB | "
        + " | ".join(f"{h} ms (÷ conv)" for h in names)
        + " |"
    )
    print("| --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for row in table:
        bounds = " | ".join(f"{row[f'{h} ms']:.2f} ({row[f'{h} ÷ conv']:.1f}×)" for h in names)
        k = row["k"] if row["k"] is not None else ""
        print(
            f"| {row['shape']} | {k} | {row['impl']} | {row['gflop']:.1f} | {row['gbytes']:.2f} "
            f"| {bounds} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
