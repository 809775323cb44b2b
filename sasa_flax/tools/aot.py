"""Compiling for TPUs and NVIDIA GPUs on a host without them (deviceless ahead-of-time).

The vendors' own compilers run here: libtpu (XLA:TPU and Mosaic, from ``jax[tpu]``) for a
TPU topology made without hardware, and the CUDA plugin (XLA:GPU, Triton, ptxas) for a GPU
described by an XLA ``GpuTargetConfigProto`` (``gpu_targets/``, from openxla/xla
``xla/backends/gpu/target_config/specs/``). What compiles here compiles there; what is
measured here is the compiler's own accounting (``memory_analysis()``), never a time.

    devices = aot.target_devices("v5e", chips=4)       # TPU v5e, 4 chips (2x2)
    report = aot.report(jax.jit(f).lower(...).compile(), aot.TARGETS["v5e"], ...)

The programs compiled so (a layer, users' programs, the trainer's steps) are
``programs.py``'s; ``benchmarks/compile_check.py`` is the command; ``tests/test_compile.py``
the CI check.
The host's default backend must stay the CPU (``JAX_PLATFORMS=cpu``): for CUDA that also
skips the plugin's driver probe, which fails without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
import time

import numpy as np
from jax.experimental import topologies

from sasa_flax.tools.tpu_schedule import COLLECTIVES
from sasa_flax.trainer.memory import GIB, budget, images_that_fit

KERNEL_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for: TPU ``topologies`` (chip count → topology name), or for CUDA
    a ``target_config`` file in ``gpu_targets/``. ``hbm_bytes`` per device."""

    name: str
    platform: str  # "tpu" | "cuda"
    hbm_bytes: int
    topologies: tuple[tuple[int, str], ...] = ()
    target_config: str = ""


def _tpu(name, gib, four, eight):
    return Target(name, "tpu", int(gib * GIB), topologies=((4, four), (8, eight)))


TARGETS = {
    t.name: t
    for t in (
        # 16 of the chip's 32 GiB: compiled for one TensorCore (see target_devices).
        _tpu("v4", 16, "v4:2x2x1", "v4:2x2x2"),
        _tpu("v5e", 16, "v5e:2x2", "v5e:2x4"),
        _tpu("v5p", 95, "v5p:2x2x1", "v5p:2x2x2"),
        _tpu("v6e", 32, "v6e:2x2", "v6e:2x4"),
        Target("h100", "cuda", 80 * GIB, target_config="h100_sxm.txtpb"),
        Target("h200", "cuda", 141 * GIB, target_config="h200.txtpb"),
        Target("a100", "cuda", 80 * GIB, target_config="a100_sxm_80.txtpb"),
    )
}


def compiler_missing(platform: str) -> str | None:
    """Why ``platform``'s compiler cannot run here, or None if it can."""
    if platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            return 'libtpu is not installed: pip install -r requirements-compile.txt ("jax[tpu]")'
        return None
    # The plugin, its PJRT library (jax_plugins.xla_cuda12) and ptxas (nvidia-cuda-nvcc).
    missing = [
        m
        for m in ("jax_cuda12_plugin", "jax_plugins.xla_cuda12", "nvidia.cuda_nvcc")
        if _find(m) is None
    ]
    if missing:
        return f"{', '.join(missing)} not installed: pip install -r requirements-compile.txt"
    return None


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


@functools.cache
def target_devices(name: str, chips: int = 4) -> tuple:
    """``chips`` devices of target ``name`` (see TARGETS), for a ``jax.sharding.Mesh``."""

    target = TARGETS[name]
    if reason := compiler_missing(target.platform):
        raise RuntimeError(f"cannot compile for {name}: {reason}")
    if target.platform == "tpu":
        # libtpu takes a host-wide lock on load, for the chips; compiling needs none, and
        # the compile tests run in two processes at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # Topologies are whole hosts (4 chips); fewer chips are the first of one host.
        names = dict(target.topologies)
        if chips not in (1, 2, *names):
            raise ValueError(f"chips must be 1, 2 or one of {sorted(names)}; got {chips}.")
        topology = topologies.get_topology_desc(topology_name=names[max(chips, 4)], platform="tpu")
        # A deviceless v4 topology has one device per TensorCore (two per chip), not the
        # megacore devices of a real v4 host: the first core of each chip stands for it.
        return tuple(d for d in topology.devices if getattr(d, "core_on_chip", 0) == 0)[:chips]
    config = (pathlib.Path(__file__).parent / "gpu_targets" / target.target_config).read_text()
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{chips}", target_config=config
    )
    return tuple(topology.devices)


@dataclasses.dataclass
class Report:
    """What the compiler says about one program (bytes are per chip)."""

    target: str
    program: str
    compile_s: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    kernels: int  # Mosaic / Triton calls in the compiled program
    # Per kernel operand and result of rank 3 or more: the images × heads it holds, read
    # from the frames' shapes ((B·N, L, d) on GPU, (B, c, N, L) on TPU): what one chip's
    # kernels run on.
    kernel_leading_dims: tuple[int, ...]
    collectives: dict[str, int]  # op name -> count in the compiled program
    collective_sizes: tuple[tuple[str, int], ...]  # (op, elements of its largest array)
    batch_per_chip: int
    hbm_bytes: int
    note: str = ""  # how it was compiled, where not as the trainer would on the device

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, donated buffers counted once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= budget(self.hbm_bytes)

    @property
    def temp_bytes_per_image(self) -> float:
        return self.temp_bytes / self.batch_per_chip

    @property
    def largest_batch_per_chip(self) -> int:
        """An estimate (``memory.images_that_fit``, the trainer's rule): temporaries taken
        as linear in the batch, from this one compile; the state as it is."""
        fixed = self.argument_bytes + self.output_bytes - self.alias_bytes
        return images_that_fit(fixed, self.temp_bytes_per_image, self.hbm_bytes)

    def row(self) -> dict:
        gib = lambda n: round(n / GIB, 2)  # noqa: E731
        return dict(
            target=self.target,
            program=self.program,
            batch_per_chip=self.batch_per_chip,
            compile_s=round(self.compile_s, 1),
            temp_gib=gib(self.temp_bytes),
            peak_gib=gib(self.peak_bytes),
            hbm_gib=gib(self.hbm_bytes),
            fits=self.fits,
            temp_mib_per_image=round(self.temp_bytes_per_image / 2**20, 1),
            largest_batch_per_chip=self.largest_batch_per_chip,
            kernels=self.kernels,
            collectives=self.collectives,
            note=self.note,
        )


_COLLECTIVE_LINE = re.compile(rf"=\s*(.*?)\s({'|'.join(COLLECTIVES)})(?:-start)?\(")
_ARRAY_TYPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def collective_sizes(text: str) -> list[tuple[str, int]]:
    """Every collective in compiled HLO ``text`` as (op, elements of its largest array):
    an all-reduce of a parameter's gradient is parameter-sized; one that carries
    activations has a batch or spatial dimension in it, and is far larger."""
    found = []
    for line in text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if match is None:
            continue
        sizes = [
            int(np.prod([int(n) for n in dims.split(",") if n], dtype=np.int64))
            for dims in _ARRAY_TYPE.findall(match.group(1))
        ]
        found.append((match.group(2), max(sizes, default=0)))
    return found


def report(
    compiled, target: Target, program: str, compile_s: float, batch_per_chip: int, note: str = ""
) -> Report:
    """A ``Report`` of ``compiled`` (a ``jax.stages.Compiled`` for ``target``)."""
    text = compiled.as_text()
    kernel_lines = [
        line
        for line in text.splitlines()
        if f'custom_call_target="{KERNEL_TARGETS[target.platform]}"' in line
    ]
    shapes = [
        [int(n) for n in m.group(1).split(",")]
        for line in kernel_lines
        for m in re.finditer(r"\b(?:bf16|f16|f32|f64)\[(\d+(?:,\d+){2,})\]", line)
    ]
    # TPU frames keep the heads on axis 2 (ops/pallas/tpu.py, HEADS_AXIS).
    leading = tuple(
        dims[0] * dims[2] if target.platform == "tpu" and len(dims) == 4 else dims[0]
        for dims in shapes
    )
    # An op's name follows its (possibly tuple) shape and a space: "... all-reduce(".
    collectives = {op: len(re.findall(rf"\s{op}(?:-start)?\(", text)) for op in COLLECTIVES}
    memory = compiled.memory_analysis()
    return Report(
        target=target.name,
        program=program,
        compile_s=compile_s,
        temp_bytes=memory.temp_size_in_bytes,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        kernels=len(kernel_lines),
        kernel_leading_dims=leading,
        collectives={k: v for k, v in collectives.items() if v},
        collective_sizes=tuple(collective_sizes(text)),
        batch_per_chip=batch_per_chip,
        hbm_bytes=target.hbm_bytes,
    )


# XLA:GPU's own GEMM fusions (not our kernels) sometimes find no tiling when compiled
# without a GPU: without a device to autotune on, XLA takes one default tile config,
# and for some fused dots (the projections' input gradient at 14² and 7², H100 target)
# there is none. A GPU's autotuner tries others and falls back to cuBLAS; that this
# happens only without a device is to be confirmed on a GPU (benchmarks/RESULTS.md).
_GEMM_TILING_ERROR = "Couldn't find output tile sizes"
GEMM_FALLBACK = {"xla_gpu_enable_triton_gemm": False}


def compile_for(lowerable, *args, platform: str = "tpu"):
    """(compiled, seconds, note): on CUDA, a program that XLA's Triton GEMM fusions cannot
    tile without a device is compiled again with cuBLAS GEMMs, and ``note`` says so."""
    lowered = lowerable.lower(*args)
    start = time.perf_counter()
    try:
        return lowered.compile(), time.perf_counter() - start, ""
    except Exception as e:
        if platform != "cuda" or _GEMM_TILING_ERROR not in str(e):
            raise
    compiled = lowered.compile(compiler_options=GEMM_FALLBACK)
    return compiled, time.perf_counter() - start, "Triton GEMM off (deviceless tiling failed)"
