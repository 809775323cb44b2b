r"""The Triton kernels as ptxas compiles them for H100 (sm_90a) and A100 (sm_80), no GPU.

    .venv-compile/bin/python -m benchmarks.gpu_kernels
    .venv-compile/bin/python -m benchmarks.gpu_kernels --targets h100 --kernel-sizes 3,7,11

Compiles ``SelfAttention2D`` (forward and gradients, bfloat16, impl="pallas") at ResNet-50's
four attention stages for each target with the CUDA plugin (deviceless, ``aot``), with XLA
dumping the PTX it hands to ptxas; runs ptxas -v on each of our kernels' PTX for the
target's architecture, and prints per kernel: registers per thread, spill stores and
loads, stack, threads per block (``.reqntid``) and the occupancy the registers allow (warps
per SM over the SM's 64). Static, from the vendor's compiler: what cannot be known without
a GPU is the time, the dynamic shared memory Triton requests at launch (not in the PTX),
and whether the occupancy is reached (memory latency, the scheduler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets are compiled for, never run

ARCHS = {"h100": "sm_90a", "a100": "sm_80"}
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))
# Per SM, both architectures: 64 K 32-bit registers, at most 64 resident warps; registers
# are given to warps in units of 256.
REGISTERS_PER_SM, WARPS_PER_SM, REGISTER_UNIT = 65536, 64, 256


def ptxas_path() -> str:
    import nvidia.cuda_nvcc

    return os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")


def kernel_report(ptx: str, arch: str) -> dict:
    """ptxas -v on one kernel's PTX: registers, spills, stack; threads per block; the
    warps per SM its registers allow."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(re.sub(r"^\.target\s+\S+", f".target {arch}", ptx, flags=re.M))
    result = subprocess.run(
        [ptxas_path(), "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(f.name)
    info = result.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    stack, spill_stores, spill_loads = (
        int(x)
        for x in re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info
        ).groups()
    )
    threads = int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1))
    warps = threads // 32
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = REGISTERS_PER_SM // (per_warp * warps)
    return dict(
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        stack=stack,
        threads=threads,
        occupancy=min(blocks * warps, WARPS_PER_SM) / WARPS_PER_SM,
    )


def stage_rows(
    target: str, size: int, channels: int, kernel_size: int, batch: int, dump: str
) -> list:
    """Compiles the layer for ``target`` (XLA dumps its PTX in ``dump``, set in XLA_FLAGS
    before the backend starts) and reports our kernels among the new PTX files."""
    from sasa_flax.tools import programs

    before = set(os.listdir(dump))
    programs.compile_layer(
        target,
        size=size,
        channels=channels,
        kernel_size=kernel_size,
        batch_per_chip=batch,
        chips=1,
        impl="pallas",
    )
    rows = []
    for name in sorted(set(os.listdir(dump)) - before):
        if not name.endswith(".ptx"):
            continue
        with open(os.path.join(dump, name)) as f:
            ptx = f.read()
        entry = re.search(r"\.entry\s+(sasa_\w+)\(", ptx)
        if entry is None:
            continue
        rows.append(
            dict(
                target=target,
                stage=f"{size}x{size}x{channels}",
                k=kernel_size,
                kernel=entry.group(1),
                **kernel_report(ptx, ARCHS[target]),
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="h100,a100")
    parser.add_argument("--kernel-sizes", default="7")
    parser.add_argument("--batch-per-chip", type=int, default=8)
    args = parser.parse_args(argv)
    # XLA reads XLA_FLAGS when its backend starts: before the first compile.
    dump = tempfile.mkdtemp(prefix="sasa_gpu_ptx_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"
    print(
        "target stage k kernel: registers, spills (stores/loads bytes), stack, threads, "
        "occupancy by registers (ptxas, compiled not run)"
    )
    for target in args.targets.split(","):
        for size, channels in STAGES:
            for k in (int(x) for x in args.kernel_sizes.split(",")):
                for row in stage_rows(target, size, channels, k, args.batch_per_chip, dump):
                    print(
                        f"{row['target']} {row['stage']} k={row['k']} {row['kernel']}: "
                        f"{row['registers']} registers, spills {row['spill_stores']}/"
                        f"{row['spill_loads']} B, stack {row['stack']} B, "
                        f"{row['threads']} threads, occupancy {row['occupancy']:.0%}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
