"""Device memory: what a compiled step needs and how many images fit. One rule, used by
the trainer (which checks its steps before any runs) and by the compile tools
(``tools/aot.py``, which report it for chips that are not here)."""

from __future__ import annotations

import re

import jax

GIB = 2**30
# Of a chip's memory, what a program may plan to use: the rest is headroom for the
# runtime, fragmentation and the input pipeline's device buffers.
HEADROOM = 0.9


def budget(memory_bytes: int) -> float:
    """The bytes a program may plan to use on a device of ``memory_bytes``."""
    return HEADROOM * memory_bytes


def peak_bytes(memory) -> int:
    """A compiled program's peak per device from its ``memory_analysis()``: arguments,
    outputs and temporaries, donated buffers counted once."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def images_that_fit(fixed_bytes: float, bytes_per_image: float, memory_bytes: int) -> int:
    """How many images at once fit a device of ``memory_bytes``: the temporaries taken as
    linear in the images (``bytes_per_image`` each, from one compile), the rest
    (``fixed_bytes``: state, batch, outputs) as it is. An estimate, 0 when none fits."""
    room = budget(memory_bytes) - fixed_bytes
    return max(0, int(room // max(bytes_per_image, 1.0)))


def required_bytes(message: str) -> int | None:
    """The temporaries an XLA out-of-memory refusal says the program needs, if it says."""
    match = re.search(r"required for HLO temporaries \(([0-9.]+)([KMG])\)", message)
    if match is None:
        return None
    return int(float(match.group(1)) * 2 ** {"K": 10, "M": 20, "G": 30}[match.group(2)])


def device_memory(mesh: jax.sharding.Mesh) -> int | None:
    """Bytes of memory of this process's first device of ``mesh``, where its platform says
    (TPU and GPU; not the CPU). Every process compiles the same program for the same kind
    of device, so all of them decide alike."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    return (local.memory_stats() or {}).get("bytes_limit")
