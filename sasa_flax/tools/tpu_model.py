"""A TPU program's step estimated from libtpu's static schedule (``tpu_schedule`` reads it):
cycles by kind and by layer, each Mosaic kernel's bundles, loops and slot shares, the
chip's time per step and images/s, the compiled memory.

Every figure here is *estimated from libtpu's static schedule, not run*: it ignores stalls,
the input pipeline and the host. For plain XLA programs the sum is within about 1.3× of a
real run (ResNet-50 on v4, ``CALIBRATION``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

from sasa_flax.tools.tpu_schedule import (
    COLLECTIVES,
    Instruction,
    KernelProgram,
    instructions,
    read_kernel_programs,
)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: TensorCore clock, cores that one device (a chip: megacore on
    v4 and v5p) runs on, HBM bandwidth per chip. Clocks as published (v4, v5e) or derived
    from the chip's published bf16 peak and its matrix units (v5p, v6e)."""

    clock_hz: float
    cores_per_chip: int
    hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip(1.05e9, 2, 1.2e12),
    "v5e": Chip(1.5e9, 1, 819e9),
    "v5p": Chip(1.75e9, 2, 2.765e12),
    "v6e": Chip(1.75e9, 1, 1.64e12),
}

# Published ResNet-50 training throughput, images/s per chip, to set the estimate beside:
# MLPerf Training v1.0 / v1.1, TPU v4 (about 2.3-2.4k per chip). None is stored here for
# later generations; their estimates carry v4's ratio as the uncertainty.
CALIBRATION = {"v4": (2350.0, "MLPerf Training v1.x, TPU v4: about 2.3-2.4k img/s per chip")}


# Kinds (attention kernels, attention (XLA), layout glue, projections, convolutions, norms
# and elementwise, optimizer, other), decided from the name scopes and the JAX op in a
# fusion's metadata (the model names its parts: ``jax.named_scope`` in models/resnet.py,
# layers/attention.py, stem.py).
_GLUE_OPS = (
    "transpose",
    "pad",
    "slice",
    "reshape",
    "concatenate",
    "copy",
    "select_n",
    "broadcast_in_dim",
    "convert_element_type",
    "dynamic_slice",
    "dynamic_update_slice",
    "squeeze",
    "expand_dims",
    "rev",
    "gather",
    "scatter",
    "iota",
    # the TPU kernels' frames packed as bfloat16 pairs (ops/pallas/tpu.py)
    "bitcast_convert_type",
    "shift_left",
    "or",
)


def kind_of(instruction: Instruction) -> str:
    if instruction.kind == "kernel":
        return "attention kernels"
    op = instruction.op_name
    last = re.sub(r"\[.*$", "", op.rsplit("/", 1)[-1])
    if "local_attention" in op or "attention_core" in op:
        return (
            "layout glue"
            if last in _GLUE_OPS or last.startswith("reduce_sum")
            else "attention (XLA)"
        )
    if "projection" in op:
        return "projections"
    if "conv_general_dilated" in op:
        return "convolutions"
    if "optimizer" in op or "optax" in op:
        return "optimizer"
    if "dot_general" in op:
        return "projections"
    return "norms and elementwise" if op else "other"


_SCOPE = re.compile(r"\b(stem|head|group\d+_block\d+)\b")


def layer_of(instruction: Instruction) -> str:
    """The model part an instruction belongs to (its name scope), or "other"."""
    match = _SCOPE.search(instruction.op_name)
    if match is None:
        return "optimizer" if kind_of(instruction) == "optimizer" else "other"
    return match.group(1)


@dataclasses.dataclass
class Estimate:
    """One program's step, estimated from libtpu's static schedule (not run)."""

    generation: str
    program: str
    images_per_device: int
    instructions: list[Instruction]
    kernels: dict[str, KernelProgram]  # by body hash
    missing_kernels: int  # calls whose program was not found in the dump
    temp_bytes: int = 0  # the compiled program's memory_analysis(), per device
    peak_bytes: int = 0  # arguments + outputs + temporaries, donated buffers counted once

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    def kernel_cycles(self, instruction: Instruction) -> int:
        """A kernel call's cycles: its schedule, or its declared HBM traffic at the chip's
        bandwidth where that takes longer."""
        program = self.kernels.get(instruction.program)
        scheduled = program.cycles if program else 0
        per_core_bandwidth = self.chip.hbm_bytes_per_s / self.chip.cores_per_chip
        memory = instruction.hbm_bytes / per_core_bandwidth * self.chip.clock_hz
        return max(scheduled, int(memory))

    def cycles_of(self, instruction: Instruction) -> int:
        per_run = (
            self.kernel_cycles(instruction) if instruction.kind == "kernel" else instruction.cycles
        )
        return per_run * instruction.times

    @property
    def cycles(self) -> int:
        return sum(self.cycles_of(i) for i in self.instructions)

    def by(self, key) -> dict[str, int]:
        totals = collections.Counter()
        for i in self.instructions:
            totals[key(i)] += self.cycles_of(i)
        return dict(totals.most_common())

    def by_layer_and_kind(self) -> dict[str, dict[str, int]]:
        """{layer: {kind: cycles}}: where each layer's cycles go."""
        table = collections.defaultdict(collections.Counter)
        for i in self.instructions:
            table[layer_of(i)][kind_of(i)] += self.cycles_of(i)
        return {layer: dict(kinds.most_common()) for layer, kinds in table.items()}

    @property
    def seconds(self) -> float:
        """One step on one device: a TensorCore's cycles; a megacore chip (v4, v5p) runs
        the device's program on its two cores, taken as twice as fast."""
        return self.cycles / self.chip.clock_hz / self.chip.cores_per_chip

    @property
    def images_per_second(self) -> float:
        return self.images_per_device / self.seconds

    def kernel_table(self) -> list[dict]:
        """Per distinct kernel program: calls, bundles, loops, cycles, slot shares."""
        calls = collections.Counter(i.program for i in self.instructions if i.kind == "kernel")
        names = {i.program: i.name for i in self.instructions if i.kind == "kernel"}
        rows = []
        for key, count in calls.most_common():
            program = self.kernels.get(key)
            if program is None:
                continue
            rows.append(
                dict(
                    kernel=names[key],
                    calls=count,
                    bundles=program.bundles,
                    loops=program.loops,
                    cycles_per_call=program.cycles,
                    spill_share=round(program.spill_share, 3),
                    valu_share=round(program.slot_share.get("VALU", 0.0), 3),
                    xlu_share=round(program.slot_share.get("XLU", 0.0), 3),
                    mxu_share=round(program.slot_share.get("MXU", 0.0), 3),
                )
            )
        return rows

    def summary(self) -> dict:
        collectives = collections.Counter(
            i.kind for i in self.instructions if i.kind in COLLECTIVES
        )
        return dict(
            generation=self.generation,
            program=self.program,
            images_per_device=self.images_per_device,
            cycles=self.cycles,
            step_ms=round(self.seconds * 1e3, 2),
            images_per_second=round(self.images_per_second),
            by_kind=self.by(kind_of),
            by_layer=self.by(layer_of),
            by_layer_and_kind=self.by_layer_and_kind(),
            kernels=self.kernel_table(),
            missing_kernels=self.missing_kernels,
            collectives=dict(collectives),
            temp_bytes=self.temp_bytes,
            peak_bytes=self.peak_bytes,
            label="estimated from libtpu's static schedule, not run",
        )


def read(
    compiled,
    directory,
    *,
    generation: str,
    program: str,
    images_per_device: int,
    since: set[str] = frozenset(),
) -> Estimate:
    """The ``Estimate`` of a ``compiled`` program (or its HLO text) whose kernels libtpu
    dumped in ``directory`` (files not in ``since``: those of earlier compiles)."""
    memory = {}
    if not isinstance(compiled, str):
        from sasa_flax.trainer.memory import peak_bytes  # jax: only for a compiled program

        analysis = compiled.memory_analysis()
        memory = dict(temp_bytes=analysis.temp_size_in_bytes, peak_bytes=peak_bytes(analysis))
        compiled = compiled.as_text()
    found = instructions(compiled)
    dumped = read_kernel_programs(directory, since)
    by_body = {}
    for i in found:
        if i.kind == "kernel" and i.name in dumped:
            by_body[i.program] = dumped[i.name]
    missing = sum(1 for i in found if i.kind == "kernel" and i.program not in by_body)
    return Estimate(generation, program, images_per_device, found, by_body, missing, **memory)


def to_json(estimates: list[Estimate]) -> str:
    return json.dumps([e.summary() for e in estimates], indent=1)
