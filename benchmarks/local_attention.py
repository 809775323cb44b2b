r"""One SASA layer against the 3×3 convolution it replaces, side by side in one run.

    python -m benchmarks.local_attention     # ResNet-50 stage shapes, k = 3, 7, 11
    python -m benchmarks.local_attention --shapes 56x64 --kernel-sizes 7 --impls shifted,patches
    python -m benchmarks.local_attention --before 0c3e9ca   # each row also at an older revision

For each stage shape (H×W×C, batch 8 by default, 8 heads) and window k, it times
forward and forward+backward (median of --repeats runs after a warm-up, with
``block_until_ready``) of the whole layer, the product's ``SelfAttention2D`` (Q/K/V
projections, relative tables, local attention), differentiated w.r.t. the input
and every weight; the convolution is
``lax.conv_general_dilated`` with a C×C 3×3 kernel, differentiated the same way.
It reports compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and
achieved GFLOP/s (analytic FLOPs of ``sasa_flax.costs``, paper convention, ×3 for
forward+backward), and prints a markdown table with ratios to the convolution.

``--before REV`` also times every implementation row with the package of git revision
REV (extracted from git and imported as ``sasa_flax_before``), right after the current
one, so the two are compared side by side in one run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax import costs
from sasa_flax.layers import AttentionOptions, SelfAttention2D, attention_cost


def attention_layer(impl: str, kernel_size: int, heads: int, channels: int, dtype, layers=None):
    """The product's own ``SelfAttention2D`` as a pure function of (x, params).

    Returns (layer, params): ``layer(x, params)`` runs the module (W_Q, W_K, W_V,
    relative tables, local attention) from ``nnx.split`` state, so ``jax.grad``
    differentiates w.r.t. the input and every weight, as the trainer does.
    """
    module = (layers.SelfAttention2D if layers else SelfAttention2D)(
        channels,
        channels,
        num_heads=heads,
        kernel_size=kernel_size,
        impl=impl,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(module)

    def layer(x, params):
        return nnx.merge(graphdef, params)(x)

    return layer, params


def load_revision(revision: str):
    """``sasa_flax.layers`` as of git ``revision``, imported as ``sasa_flax_before``."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="sasa-before-"))
    archive = subprocess.run(
        ["git", "archive", revision, "sasa_flax"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    package = root / "sasa_flax_before"
    (root / "sasa_flax").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bsasa_flax\b", "sasa_flax_before", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("sasa_flax_before.layers")


def conv_layer(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def forward_and_backward(layer):
    def loss(*args):
        return jnp.sum(layer(*args) ** 2)

    return jax.grad(loss, argnums=(0, 1))


def measure(fn, args, repeats: int) -> tuple[float, int]:
    """(median seconds, compiled temporary bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def layer_flops(size: int, channels: int, kernel_size: int, heads: int) -> tuple[int, int]:
    """(attention FLOPs, 3×3 conv FLOPs) per image, paper convention."""
    options = AttentionOptions(kernel_size=kernel_size, num_heads=heads)  # the paper's layer
    _, attention = attention_cost(options, channels, channels, size, size)
    conv = costs.conv("c", 3, channels, channels, size, pad=1).flops
    return attention, conv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="56x64,28x128,14x256,7x512", help="SIZExCHANNELS,...")
    parser.add_argument("--kernel-sizes", default="3,7,11")
    parser.add_argument(
        "--impls",
        default=None,
        help="default: pallas,shifted,dense,patches on GPU; shifted,dense,patches on CPU "
        "(pallas runs interpreted there: a correctness tool, not timed)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--before", default="", help="a git revision to time as well")
    args = parser.parse_args()
    before = load_revision(args.before) if args.before else None
    dtype = jnp.dtype(args.dtype)
    on_cpu = jax.default_backend() == "cpu"
    impls = (
        args.impls or ("shifted,dense,patches" if on_cpu else "pallas,shifted,dense,patches")
    ).split(",")
    if on_cpu and "pallas" in impls:
        parser.error("impl pallas runs in Pallas' interpreter on CPU; time it on a GPU.")

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}; dtype {dtype.name}; batch {args.batch}; {args.heads} heads"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"malloc settings: {malloc or 'none'}\n")
    print(
        "| shape | k | impl | fwd ms | fwd+bwd ms | fwd+bwd ÷ conv | temp MB (fwd+bwd) "
        "| GFLOP/s (fwd+bwd) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    key = jax.random.key(0)
    for shape in args.shapes.split(","):
        size, channels = map(int, shape.split("x"))
        x = jax.random.normal(key, (args.batch, size, size, channels), dtype)
        conv_kernel = jax.random.normal(key, (3, 3, channels, channels), dtype) * 0.05
        conv_fwd, _ = measure(conv_layer, (x, conv_kernel), args.repeats)
        conv_both, conv_temp = measure(
            forward_and_backward(conv_layer), (x, conv_kernel), args.repeats
        )
        _, conv_flops = layer_flops(size, channels, 3, args.heads)
        conv_gflops = 3 * conv_flops * args.batch / conv_both / 1e9
        print(
            f"| {size}²×{channels} | 3 | conv 3×3 | {conv_fwd * 1e3:.1f} | {conv_both * 1e3:.1f} "
            f"| 1.00 | {conv_temp / 2**20:.0f} | {conv_gflops:.0f} |"
        )
        for kernel_size in map(int, args.kernel_sizes.split(",")):
            attention_flops, _ = layer_flops(size, channels, kernel_size, args.heads)
            for impl in impls:
                if impl == "dense" and size * size > 4 * kernel_size**2:
                    continue  # (H·W)² logits: gigabytes at 56², and never the faster there
                for layers, label in [(None, impl)] + [(before, f"{impl} @{args.before}")] * bool(
                    before
                ):
                    layer, params = attention_layer(
                        impl, kernel_size, args.heads, channels, dtype, layers
                    )
                    fwd, _ = measure(layer, (x, params), args.repeats)
                    both, temp = measure(forward_and_backward(layer), (x, params), args.repeats)
                    gflops = 3 * attention_flops * args.batch / both / 1e9
                    print(
                        f"| {size}²×{channels} | {kernel_size} | {label} | {fwd * 1e3:.1f} "
                        f"| {both * 1e3:.1f} | {both / conv_both:.2f} | {temp / 2**20:.0f} "
                        f"| {gflops:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
