"""Compiling for TPUs and NVIDIA GPUs on a host without them (deviceless ahead-of-time).

The vendors' own compilers run here: libtpu (XLA:TPU and Mosaic, from ``jax[tpu]``) for a
TPU topology made without hardware, and the CUDA plugin (XLA:GPU, Triton, ptxas) for a GPU
described by an XLA ``GpuTargetConfigProto`` (``gpu_targets/``, from openxla/xla
``xla/backends/gpu/target_config/specs/``). What compiles here compiles there; what is
measured here is the compiler's own accounting (``memory_analysis()``), never a time.

    devices = aot.target_devices("v5e", chips=4)       # TPU v5e, 4 chips (2x2)
    report = aot.report(jax.jit(f).lower(...).compile(), aot.TARGETS["v5e"], ...)

``benchmarks/compile_check.py`` is the command; ``tests/test_compile.py`` the CI check.
The host's default backend must stay the CPU (``JAX_PLATFORMS=cpu``): for CUDA that also
skips the plugin's driver probe, which fails without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import config_lib, trainer
from sasa_flax.layers import SelfAttention2D
from sasa_flax.ops import local_attention
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


COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
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


def _compile(lowerable, *args, platform: str = "tpu"):
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


def compile_layer(
    target: str,
    *,
    size: int,
    channels: int,
    kernel_size: int,
    batch_per_chip: int,
    chips: int = 4,
    heads: int = 8,
    dtype: str = "bfloat16",
    padding: str = "mask",
    impl: str = "auto",
) -> Report:
    """``SelfAttention2D`` forward + gradients (input and every parameter) on ``chips``
    chips of ``target``, the batch split over them as the trainer splits it."""

    mesh = trainer.data_mesh(target_devices(target, chips))
    layer = SelfAttention2D(
        channels,
        channels,
        num_heads=heads,
        kernel_size=kernel_size,
        padding=padding,
        impl=impl,
        dtype=jnp.dtype(dtype),
        rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params
    )
    x = jax.ShapeDtypeStruct(
        (batch_per_chip * chips, size, size, channels), jnp.dtype(dtype), sharding=split
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled, seconds, note = _compile(step, abstract, x, platform=TARGETS[target].platform)
    name = f"layer {size}x{size}x{channels} k={kernel_size} {padding} {dtype}"
    return report(compiled, TARGETS[target], name, seconds, batch_per_chip, note)


# How researchers put the layer in a program of their own: each is compiled by
# ``compile_user_program`` with the batch (and for two cases the heads) split over chips.
USER_PROGRAMS = {
    "jit": "jax.jit, NamedSharding inputs on jax.make_mesh's default (Explicit) axes, "
    "no mesh in context",
    "jit_auto_axes": "jax.jit, NamedSharding inputs on a mesh of Auto axes, no mesh in context",
    "set_mesh": "jax.set_mesh(jax.make_mesh(...)) around jit, Explicit axes",
    "set_mesh_replicated": "jax.set_mesh, Explicit axes, the input replicated",
    "shard_map": "the user's own jax.shard_map over the batch, check_vma=True (JAX's default)",
    "heads": "the functional core, q/k/v split over batch (data) and heads (model), 2x2 mesh",
    "tensor_parallel": "the layer on a (data, model) 2x2 mesh, W_Q/W_K/W_V column-split on "
    "model (Megatron style)",
    "batch_not_divisible": "2 images fewer than the batch (a slice inside the program), Auto axes",
    "batch_smaller_than_mesh": "2 images on 4 chips (a slice inside the program), Auto axes",
}


def compile_user_program(
    target: str,
    program: str,
    *,
    size: int = 28,
    channels: int = 128,
    kernel_size: int = 7,
    batch_per_chip: int = 32,
    heads: int = 8,
    impl: str = "auto",
) -> Report:
    """One of ``USER_PROGRAMS``: ``SelfAttention2D`` forward + gradients (or, for "heads",
    the functional core's) in bfloat16 on 4 chips of ``target``, built as a researcher
    would build it, not as our trainer does. ``Report.program`` names the case."""

    if program not in USER_PROGRAMS:
        raise ValueError(f"program must be one of {sorted(USER_PROGRAMS)}; got {program!r}")
    devices, chips = target_devices(target, 4), 4
    two_axes = program in ("heads", "tensor_parallel")
    shape, names = ((2, 2), ("data", "model")) if two_axes else ((4,), ("data",))
    # Explicit axes refuse to slice a batch into a size they do not divide (the user's
    # own program fails there): the slices are taken on Auto axes.
    auto = program in ("jit_auto_axes", "batch_not_divisible", "batch_smaller_than_mesh")
    types = (AxisType.Auto,) * len(shape) if auto else None
    mesh = jax.make_mesh(shape, names, axis_types=types, devices=devices)
    batch = batch_per_chip * chips
    bf16 = jnp.bfloat16

    def on(spec):
        return NamedSharding(mesh, spec)

    def struct(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on(spec))

    if program == "heads":
        d = channels // heads
        q = struct((batch, size, size, heads, d), bf16, P("data", None, None, "model"))
        table = struct((kernel_size, d // 2), bf16, P())

        def core_loss(q, k, v, rel_row, rel_col):
            y = local_attention(q, k, v, rel_row, rel_col, kernel_size=kernel_size, impl=impl)
            return jnp.sum(y.astype(jnp.float32))

        step = jax.jit(jax.value_and_grad(core_loss, argnums=tuple(range(5))))
        args = (q, q, q, table, table)
    else:
        layer = SelfAttention2D(
            channels,
            channels,
            num_heads=heads,
            kernel_size=kernel_size,
            impl=impl,
            dtype=bf16,
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(layer)
        keep = {"batch_not_divisible": batch - 2, "batch_smaller_than_mesh": 2}.get(program)

        def loss(params, x):
            x = x if keep is None else x[:keep]
            return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

        def param_spec(path, _):
            column_split = program == "tensor_parallel" and "kernel" in jax.tree_util.keystr(path)
            return P(None, "model") if column_split else P()

        specs = jax.tree_util.tree_map_with_path(param_spec, params)
        abstract = jax.tree.map(lambda a, spec: struct(a.shape, a.dtype, spec), params, specs)
        x_spec = P() if program == "set_mesh_replicated" else P("data")
        x = struct((batch, size, size, channels), bf16, x_spec)
        value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))

        def per_device(params, x):
            value, (d_params, d_x) = value_and_grads(params, x)
            return jax.lax.psum(value, "data"), (d_params, d_x)

        if program == "shard_map":
            step = jax.jit(
                jax.shard_map(
                    per_device,
                    mesh=mesh,
                    in_specs=(P(), P("data")),
                    out_specs=(P(), (P(), P("data"))),
                )
            )
        else:
            step = jax.jit(value_and_grads)
        args = (abstract, x)
    in_context = program.startswith("set_mesh")
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        compiled, seconds, note = _compile(step, *args, platform=TARGETS[target].platform)
    return report(compiled, TARGETS[target], program, seconds, batch_per_chip, note)


def trainer_setup(config_spec: str, target: str, *, batch_per_chip: int, chips: int = 4):
    """The trainer's own ``Setup`` for ``config_spec`` (e.g. ``configs/imagenet.py:depth=50``)
    on ``chips`` chips of ``target``, in bfloat16 (the trainer's choice on TPU and GPU; on
    this CPU host "auto" would say float32), without opening a dataset."""

    config = config_lib.load_config(config_spec)
    # The eval step keeps the config's own eval_batch_size: what a run evaluates with.
    config.input.batch_size = batch_per_chip * chips
    config.train.compute_dtype = "bfloat16"
    devices = target_devices(target, chips)
    return trainer.model_setup(
        config, devices, dataset=None, steps_per_epoch=1000, total_steps=100_000
    )


def compile_train_steps(setup, target: str) -> tuple[Report, Report]:
    """The trainer's train step and eval step compiled for ``setup``'s mesh (of ``target``
    chips) as the trainer compiles them (``trainer.compile_train_step``, and
    ``trainer.compile_eval_step`` sizing the eval step for this chip's memory); Reports
    for both."""
    batch_per_chip = setup.config.input.batch_size // setup.mesh.size
    abstract = trainer.abstract_state(setup)
    platform, hbm = TARGETS[target].platform, TARGETS[target].hbm_bytes
    notes, seconds = [], []

    def compile_noting(step, *args):
        compiled, took, note = _compile(step, *args, platform=platform)
        notes.append(note)
        seconds.append(took)
        return compiled

    compiled = trainer.compile_train_step(setup, abstract, hbm, compile_fn=compile_noting)
    train_report = report(
        compiled, TARGETS[target], "train step", seconds[-1], batch_per_chip, notes[-1]
    )
    start = time.perf_counter()
    compiled, chunks = trainer.compile_eval_step(setup, abstract, hbm, compile_fn=compile_noting)
    # Per chip, the images of one chunk go through the model at a time.
    per_chunk = setup.config.input.eval_batch_size // setup.mesh.size // chunks
    note = "; ".join(filter(None, [notes[-1], chunks > 1 and f"{chunks} chunks of {per_chunk}"]))
    eval_report = report(
        compiled, TARGETS[target], "eval step", time.perf_counter() - start, per_chunk, note
    )
    return train_report, eval_report
