r"""How long the trainer's train step takes to lower (trace to StableHLO) on this host,
with the kernels' device programs kept per layer shape and without, side by side.

    .venv-compile/bin/python -m benchmarks.lowering                          # v5e, conv stem
    .venv-compile/bin/python -m benchmarks.lowering --targets v5e,h100 --repeats 2

Lowering is what a run does on its host CPU before the compiler sees the program: once per
start (and resume) and once per evaluation program. The TPU kernels' bodies are unrolled
in Python and take seconds each to trace; ``shards.device_program`` keeps each kernel's
jitted device program per (config, kernel), so the layers of a stage share one trace and
one Mosaic / Triton lowering. "not kept" sets the kept count to 0, so every layer traces
its kernels again (the outputs are still typed without tracing, so this is less than the
code before 2026-12-06 paid: RESULTS.md). Measured, on this host, in one process, the two
alternated; nothing is compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets are lowered for, never run

from benchmarks.tpu_estimate import PROGRAMS  # noqa: E402


def lower_seconds(program: str, target: str, batch_per_chip: int, kept: bool) -> tuple[float, int]:
    """Seconds to lower the train step, and how many kernel programs it kept."""
    from sasa_flax import trainer
    from sasa_flax.ops.pallas import shards
    from sasa_flax.tools import programs

    setup = programs.trainer_setup(
        PROGRAMS[program], target, batch_per_chip=batch_per_chip, chips=1
    )
    abstract = trainer.abstract_state(setup)
    train = trainer.jit_train_step(setup, abstract)
    batch = trainer.abstract_batch(setup, batch_per_chip)
    shards.forget_device_programs()  # a fresh process's start, either way
    kept_before = shards._PROGRAMS_KEPT
    shards._PROGRAMS_KEPT = kept_before if kept else 0
    try:
        start = time.perf_counter()
        train.lower(abstract, batch)
        return time.perf_counter() - start, len(shards._PROGRAMS)
    finally:
        shards._PROGRAMS_KEPT = kept_before
        shards.forget_device_programs()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="v5e", help="aot.TARGETS names, e.g. v5e,h100")
    parser.add_argument("--programs", default="sasa_conv_stem", help=",".join(PROGRAMS))
    parser.add_argument("--batch-per-chip", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print("train step lowering on this host, one chip, seconds (kept / not kept)")
    for target in args.targets.split(","):
        for program in args.programs.split(","):
            times, programs = {True: [], False: []}, 0
            for _ in range(args.repeats):
                for kept in (True, False):
                    seconds, count = lower_seconds(program, target, args.batch_per_chip, kept)
                    times[kept].append(seconds)
                    programs = max(programs, count)
            kept, not_kept = min(times[True]), min(times[False])
            print(
                f"{target:5} {program:15} kept {kept:6.1f} s   not kept {not_kept:6.1f} s   "
                f"{not_kept / kept:4.2f}x   ({programs} kernel programs kept)"
            )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
