"""How fast a TPU program would run, read from libtpu's own static schedule: no TPU needed.

A deviceless compile (``aot``) runs libtpu's whole backend, instruction scheduler included.
This module reads back what it decided, for one compiled program:

- **XLA fusions**: each carries ``"estimated_cycles"`` in its backend config
  (``compiled.as_text()``), XLA:TPU's own estimate. Fusions inside a ``while`` loop count
  once per iteration (its ``known_trip_count``).
- **Mosaic kernels** carry none. With ``dump_flags(DIR)`` in ``LIBTPU_INIT_ARGS`` (set
  before libtpu loads: ``benchmarks/tpu_estimate.py`` starts a process for it) libtpu
  writes each distinct kernel's final VLIW program. A kernel's cycles are its scheduled
  bundles, each counted once per iteration of every loop around it: the grid is a loop
  (its exit test compares with the grid size + 2 pipeline steps), and loops inside the
  body multiply again (``kernel_cycles``). libtpu compiles identical kernels once, so each
  call in the HLO is matched to its program by the kernel body it carries. DMA waits the
  static schedule does not show are bounded from below by the HBM traffic the kernel
  declares (its ``CostEstimate``) over the chip's bandwidth: the larger of the two counts.
- **Collectives** are listed, not timed.

What the readers find is summed into a step's estimate by ``tpu_model``: every figure is
*estimated from libtpu's static schedule, not run*.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re

KERNEL_TARGET = "tpu_custom_call"
# What libtpu dumps, per program: only the final schedule (four small files), not every
# pass (~70 files of megabytes each).
_DUMP_FLAGS = (
    "--xla_jf_dump_to={} --xla_jf_dump_llo_text=true --xla_jf_dump_llo_pass_label_regex=final"
)


def dump_flags(directory: str | os.PathLike) -> str:
    """What ``LIBTPU_INIT_ARGS`` must hold, before libtpu loads, for ``read`` to find the
    kernels' schedules in ``directory``."""
    return _DUMP_FLAGS.format(directory)


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass
class KernelProgram:
    """One Mosaic kernel as libtpu scheduled it."""

    name: str
    bundles: int  # scheduled VLIW bundles in the program
    cycles: int  # bundles weighted by the trip counts of the loops around them
    loops: tuple[int, ...]  # trip count of each loop, outermost first
    slot_share: dict[str, float]  # per slot: used / (capacity × bundles)

    @property
    def spill_share(self) -> float:
        """Share of bundles' store slots spent storing spilled registers."""
        return self.slot_share.get("VSTORE:SPILL", 0.0)


_BUNDLE = re.compile(r"^\s*(?:0x[0-9a-f]+|0)\s+(LB:)?\s*[^{]*\{")
_EXIT_TEST = re.compile(
    r"(%p\w+) = scmp\.\w+\.s32\.totalorder (?:\(!?%p\w+\), )?%\w+, (\d+) /\* loop exit test \*/"
)
_BRANCH = re.compile(r"sbr\.rel \(!?(%p\w+)\) target = \$region(\d+)")
_REGION_START = re.compile(r"Start region (\d+)")


def kernel_cycles(final_bundles: str) -> tuple[int, int, tuple[int, ...]]:
    """(cycles, bundles, loop trip counts) of a kernel's final program (libtpu's
    ``*-final_bundles.txt``). A loop runs from a bundle marked ``LB:`` (which starts its
    region) to the branch back to that region; the branch's predicate is the loop exit
    test, which compares the counter with the trip count. Every bundle counts once per
    iteration of each loop it is in."""
    bundles = [line for line in final_bundles.splitlines() if _BUNDLE.match(line)]
    trips = {m.group(1): int(m.group(2)) for m in _EXIT_TEST.finditer(final_bundles)}
    starts = {}  # region -> index of the LB bundle that starts it
    loops = []  # (start, end, trips)
    for index, line in enumerate(bundles):
        if _BUNDLE.match(line).group(1):
            starts.update((region, index) for region in _REGION_START.findall(line))
        for predicate, region in _BRANCH.findall(line):
            if region in starts and predicate in trips and starts[region] <= index:
                loops.append((starts[region], index, trips[predicate]))
    multiplier = [1] * len(bundles)
    for start, end, count in loops:
        for i in range(start, end + 1):
            multiplier[i] *= count
    nest = tuple(count for _, _, count in sorted(loops, key=lambda x: (x[0], -x[1])))
    return sum(multiplier), len(bundles), nest


def _slot_share(utilization: str) -> dict[str, float]:
    lines = utilization.splitlines()
    names = lines[1].replace(",", "").split()
    capacity = [int(x) for x in lines[2].split()]
    start = lines.index("== UTILIZATION:")
    rows = [
        [int(x) for x in line.split()]
        for line in lines[start + 1 :]
        if len(line.split()) == len(capacity) and line.split()[0].isdigit()
    ]
    if not rows:
        return {}
    return {
        name: sum(r[j] for r in rows) / (capacity[j] * len(rows)) for j, name in enumerate(names)
    }


def read_kernel_programs(directory, since: set[str] = frozenset()) -> dict[str, KernelProgram]:
    """Every kernel program libtpu dumped in ``directory`` (files not in ``since``), by
    its HLO instruction name (e.g. ``sasa_local_attention_fwd_tpu.1``)."""
    directory = pathlib.Path(directory)
    programs = {}
    for path in sorted(directory.glob("*-final_bundles.txt")):
        if path.name in since or "schedule-analysis" in path.name:
            continue
        match = re.match(r"\d+-(.+?)-\d+-final_bundles\.txt$", path.name)
        if match is None or KERNEL_NAME not in match.group(1):
            continue
        name = match.group(1)
        cycles, bundles, loops = kernel_cycles(path.read_text())
        pattern = f"*-{name}-*-final_hlo-static-per-bundle-utilization.txt"
        utilization = next((p for p in directory.glob(pattern) if p.name not in since), None)
        share = _slot_share(utilization.read_text()) if utilization else {}
        programs[name] = KernelProgram(name, bundles, cycles, loops, share)
    return programs


KERNEL_NAME = "sasa_"  # our Mosaic kernels' names start so (ops/pallas/tpu.py)


# ------------------------------------------------------------------------------- HLO


@dataclasses.dataclass
class Instruction:
    name: str
    kind: str  # "fusion", "kernel", a collective's op name
    cycles: int  # estimated: XLA's for a fusion, the schedule's for a kernel
    op_name: str  # the JAX op that made it (metadata), with its name scopes
    times: int = 1  # executions per step (loops)
    hbm_bytes: int = 0  # a kernel's declared HBM traffic
    program: str = ""  # a kernel's dumped program


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?body=%?([\w.\-]+)")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)")
_LESS_THAN = re.compile(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLED = re.compile(r"(?:to_apply|branch_computations|calls)=\{?%?([\w.\-, %]+)\}?")


def _computations(text: str) -> dict[str, list[str]]:
    computations, current = {}, None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    computations["__entry__"] = computations[current]
            continue
        if line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    return computations


def _executions(computations: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call of the entry: ``while`` bodies
    their trip count times (XLA's known count, else read from the condition, else 1),
    called computations as their caller."""
    times = {"__entry__": 1}
    entry = next(
        name
        for name, body in computations.items()
        if body is computations["__entry__"] and name != "__entry__"
    )
    times[entry] = 1
    pending = [entry]
    while pending:
        name = pending.pop()
        for line in computations.get(name, ()):
            if " fusion(" in line:
                continue  # a fusion's computation is costed on its call line
            callees = []
            loop = _WHILE.search(line)
            if loop:
                trips = _TRIP.search(line)
                condition = _CONDITION.search(line)
                counted = (
                    int(trips.group(1))
                    if trips
                    else _condition_trips(
                        computations.get(condition.group(1), ()) if condition else ()
                    )
                )
                callees.append((loop.group(1), counted))
            for group in _CALLED.findall(line):
                callees += [(c.strip(" %"), 1) for c in group.split(",") if c.strip(" %")]
            for callee, trips in callees:
                if callee in computations and callee not in times:
                    times[callee] = times[name] * trips
                    pending.append(callee)
    return times


def _condition_trips(condition: list[str]) -> int:
    """A while loop's trip count from its condition, where XLA left no known_trip_count
    (``lax.map`` over the attention stem's strips): ``counter < N`` with N a constant, the
    counter starting at 0 as JAX's loops do. 1 when the condition is anything else."""
    constants = dict(m.groups() for line in condition for m in [_CONSTANT.search(line)] if m)
    for line in condition:
        match = _LESS_THAN.search(line)
        if match and match.group(1) in constants:
            return int(constants[match.group(1)])
    return 1


COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")


def instructions(text: str) -> list[Instruction]:
    """The fusions, kernel calls and collectives of compiled HLO ``text``, with their
    estimated cycles (kernels' filled in by ``read``) and executions per step."""
    computations = _computations(text)
    times = _executions(computations)
    found = []
    for computation, lines in computations.items():
        if computation == "__entry__" or computation not in times:
            continue
        for line in lines:
            name = line.strip().split(" ", 1)[0].lstrip("%")
            op_name = re.search(r'op_name="([^"]*)"', line)
            op_name = op_name.group(1) if op_name else ""
            if f'custom_call_target="{KERNEL_TARGET}"' in line:
                body = re.search(r'"body":"([^"]*)"', line)
                declared = re.search(r'"bytes_accessed":"(\d+)"', line)
                found.append(
                    Instruction(
                        name,
                        "kernel",
                        0,
                        op_name,
                        times[computation],
                        int(declared.group(1)) if declared else 0,
                        program=hashlib.sha1(
                            (body.group(1) if body else name).encode()
                        ).hexdigest(),
                    )
                )
                continue
            cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
            if cycles:
                cycles = int(cycles.group(1))
                found.append(Instruction(name, "fusion", cycles, op_name, times[computation]))
                continue
            for op in COLLECTIVES:
                if re.search(rf"\s{op}(?:-start)?\(", line):
                    found.append(Instruction(name, op, 0, op_name, times[computation]))
    return found


def files(directory) -> set[str]:
    """The files in ``directory`` now: pass as ``since`` to read only later compiles'."""
    return {p.name for p in pathlib.Path(directory).glob("*")}
