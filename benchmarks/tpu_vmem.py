r"""What the Mosaic kernels really hold in VMEM, from libtpu's own report, against the
model ``choose_tile`` uses (``sasa_flax/ops/pallas/tpu.py``: ``vmem_bytes``).

    .venv-compile/bin/python -m benchmarks.tpu_vmem --target v4
    .venv-compile/bin/python -m benchmarks.tpu_vmem --target v5e --cases 112x11x8x640,56x7x8

Each case SIZExKxHEAD[xTILE] (default tile: ``choose_tile``'s) compiles the kernels'
forward and backward for one chip of ``--target`` (deviceless), with libtpu dumping its
LLO (``--xla_jf_dump_to``); the dump's ``vmem_report`` gives each kernel's VMEM
(blocks, temporaries, register spills). Prints, per case, each kernel's MiB, the model's
bound and their ratio (the model is meant never to be below: ratio >= 1). These are the
compiler's allocations, compiled not run. The dump must be configured before libtpu
loads, so this runs as its own process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

DEFAULT_CASES = (
    "56x3x8x1024,56x3x8x2048,56x5x8x1024,56x5x8x2048,56x7x8x256,56x7x8x768,56x7x8x1792,"
    "56x9x8x384,56x9x8x1152,56x11x8x384,56x11x8x1152,112x7x8x1536,112x9x8x512,"
    "112x9x8x1536,112x11x8x640,28x3x16x2048,28x7x16x1024,28x11x16x256,28x11x16x768,"
    "56x7x16x512,56x7x16x1280,14x3x32x512,14x7x32x384,14x11x32x256,28x7x32x256,"
    "7x7x64x128,56x7x64x256"
)


def kernel_vmem(report_html: str) -> dict[str, int]:
    """{kernel: bytes} from one libtpu vmem_report (an HTML page with a JSON object)."""
    start = report_html.index("{", report_html.index("const DATA ="))
    data, _ = json.JSONDecoder().raw_decode(report_html[start:])
    found = {}
    for name, breakdown in data["hlo_breakdowns"].items():
        if "sasa_local_attention" in name:
            kernel = re.sub(r"\.\d+$", "", name).removeprefix("sasa_local_attention_")
            found[kernel.removesuffix("_tpu")] = breakdown["total_size"]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="v4", help="a TPU of sasa_flax.tools.aot.TARGETS")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="SIZExKxHEAD[xTILE],...")
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args(argv)

    dump = tempfile.mkdtemp(prefix="sasa-llo-")
    os.environ["LIBTPU_INIT_ARGS"] = (
        f"--xla_jf_dump_to={dump} --xla_jf_dump_llo_text=true "
        "--xla_jf_dump_llo_pass_label_regex=final"  # the report, not every pass
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from sasa_flax.ops.pallas import tpu
    from sasa_flax.tools import aot, programs

    device = aot.target_devices(args.target, 1)
    on_chip = jax.sharding.NamedSharding(
        jax.sharding.Mesh(device, ("x",)), jax.sharding.PartitionSpec()
    )
    print("| case | tile | window | fwd MiB | dq MiB | dkv MiB | model MiB | model / largest |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = float("inf")
    for case in args.cases.split(","):
        size, k, head, *tile = (int(x) for x in case.split("x"))
        tile = tile[0] if tile else tpu.choose_tile(size, size, k, head, head, itemsize=2)
        halo = tpu.Frame.halo_for(size, size, k)
        q = jax.ShapeDtypeStruct((2, size, size, args.heads, head), jnp.bfloat16, sharding=on_chip)
        table = jax.ShapeDtypeStruct((k, head // 2), jnp.bfloat16, sharding=on_chip)

        def kernels(*arrays, k=k, tile=tile):
            return tpu.local_attention(*arrays, kernel_size=k, padding="mask", tile=tile)

        before = set(glob.glob(f"{dump}/*vmem_report.html"))
        try:
            probe = programs.summed_gradient(kernels, tuple(range(5)))
            jax.jit(probe).lower(q, q, q, table, table).compile()
            failed = ""
        except Exception as e:  # noqa: BLE001 - the compiler's words, then go on
            failed = " ".join(re.findall(r"Used [0-9.]+[KM] of [0-9.]+[KM]", str(e))) or "failed"
        reports = sorted(set(glob.glob(f"{dump}/*vmem_report.html")) - before)
        found = {}
        for path in reports:
            with open(path) as f:
                found.update(kernel_vmem(f.read()))
        model = tpu.vmem_bytes(tile, halo, head, head, k, itemsize=2)  # bfloat16 frames
        mib = lambda n: f"{n / 2**20:.2f}" if n else "-"  # noqa: E731
        largest = max(found.values(), default=0)
        ratio = model / largest if largest else float("nan")
        if largest:
            worst = min(worst, ratio)
        print(
            f"| {size}² k={k} head {head} {failed} | {tile} | {tile + 2 * halo} | "
            f"{mib(found.get('fwd'))} | {mib(found.get('dq'))} | {mib(found.get('dkv'))} | "
            f"{mib(model)} | {ratio:.2f} |",
            flush=True,
        )
    print(f"\nlowest model / largest kernel: {worst:.2f} (below 1 would be a bound that fails)")
    return 0 if worst >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
