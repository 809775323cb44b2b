r"""Compile for TPUs and NVIDIA GPUs without them: the vendors' compilers, deviceless.

    python -m venv --system-site-packages .venv-compile
    .venv-compile/bin/pip install --no-deps -r requirements-compile.txt
    .venv-compile/bin/python -m benchmarks.compile_check --targets v5e,h100
    .venv-compile/bin/python -m benchmarks.compile_check --targets v4,v5e,v5p,v6e,h100,a100 \
        --what layers --kernel-sizes 3,5,7,9,11 --paddings mask,zeros --dtypes bfloat16,float32

``--what layers``: ``SelfAttention2D`` forward + gradients at ResNet-50's four stage
shapes; ``--what steps``: the trainer's own train and eval steps (``sasa_flax.trainer``) for
configs/imagenet.py at ``--depth`` and each ``--variants``, on ``--chips`` chips with
``--batch-per-chip`` images each; ``--what users``: the layer as researchers put it in
programs of their own (``programs.USER_PROGRAMS``: jit without a mesh, Explicit and Auto axes,
their own shard_map, heads and tensor parallel, batches no axis divides). Per program it
prints whether it compiled, the compile time on this host, the compiled temporaries and
peak per chip (``memory_analysis()``), an estimate of the largest per-chip batch that
fits (temporaries taken as linear in the batch), the fused kernels and the collectives.
Nothing runs: these are the compiler's figures, "compiled, not run". ``--json FILE``
keeps every row.
Exit status 1 if anything failed to compile.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets are compiled for, never run

from sasa_flax.tools import aot, programs  # noqa: E402

STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))


def layer_rows(args):
    cases = itertools.product(args.targets, STAGES, args.kernel_sizes, args.paddings, args.dtypes)
    for target, (size, channels), k, padding, dtype in cases:
        name = f"layer {size}x{size}x{channels} k={k} {padding} {dtype}"
        compile_one = functools.partial(
            programs.compile_layer,
            target,
            size=size,
            channels=channels,
            kernel_size=k,
            padding=padding,
            dtype=dtype,
            batch_per_chip=args.batch_per_chip,
            chips=args.chips,
        )
        yield target, name, lambda compile_one=compile_one: [compile_one()]


def step_rows(args):
    for target in args.targets:
        for variant in args.variants:
            spec = f"configs/imagenet.py:depth={args.depth},variant={variant}"

            def compile_steps(target=target, spec=spec):
                setup = programs.trainer_setup(
                    spec, target, batch_per_chip=args.batch_per_chip, chips=args.chips
                )
                return programs.compile_train_steps(setup, target)

            yield target, f"R{args.depth} {variant}", compile_steps


def user_rows(args):
    for target in args.targets:
        for program in programs.USER_PROGRAMS:
            compile_one = functools.partial(programs.compile_user_program, target, program)
            yield target, f"user program: {program}", lambda c=compile_one: [c()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    split = lambda kind: lambda text: [kind(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument(
        "--targets", type=split(str), default=["v5e", "h100"], help=f"of {', '.join(aot.TARGETS)}"
    )
    parser.add_argument("--what", type=split(str), default=["layers", "steps"])
    parser.add_argument("--chips", type=int, default=4)
    parser.add_argument("--batch-per-chip", type=int, default=128)
    parser.add_argument("--kernel-sizes", type=split(int), default=[7, 11])
    parser.add_argument("--paddings", type=split(str), default=["mask"])
    parser.add_argument("--dtypes", type=split(str), default=["bfloat16"])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument(
        "--variants", type=split(str), default=["baseline", "conv_stem_attention", "full_attention"]
    )
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    for target in args.targets:
        if target not in aot.TARGETS:
            parser.error(f"--targets: unknown {target!r}; choose from {', '.join(aot.TARGETS)}")
        if reason := aot.compiler_missing(aot.TARGETS[target].platform):
            parser.error(f"--targets {target}: {reason}")

    rows, failures = [], 0
    print(
        "| target | program | batch/chip | compiled | compile s | temp GiB | peak GiB "
        "| temp MiB/image | largest batch/chip (est.) | kernels (frames per chip) "
        "| collectives | note |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    jobs = [
        *(layer_rows(args) if "layers" in args.what else ()),
        *(step_rows(args) if "steps" in args.what else ()),
        *(user_rows(args) if "users" in args.what else ()),
    ]
    for target, name, run in jobs:
        try:
            reports = run()
        except Exception as e:  # noqa: BLE001 - the compiler's own words, then go on
            failures += 1
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            print(
                f"| {target} | {name} | {args.batch_per_chip} | **no**: {first} | | | | | | | | |",
                flush=True,
            )
            rows.append(dict(target=target, program=name, error=str(e)[:2000]))
            continue
        for r in reports:
            row = r.row()
            label = (
                name
                if r.program.startswith("layer") or name.startswith("user")
                else (f"{name} {r.program}")
            )
            frames = max(r.kernel_leading_dims, default=0)
            largest = max((n for _, n in r.collective_sizes), default=0)
            collectives = ", ".join(f"{k} {v}" for k, v in r.collectives.items()) or "none"
            print(
                f"| {target} | {label} | {r.batch_per_chip} | yes | {row['compile_s']} | "
                f"{row['temp_gib']} | {row['peak_gib']} | {row['temp_mib_per_image']} | "
                f"{row['largest_batch_per_chip']} | {r.kernels} ({frames} frames) | "
                f"{collectives} (largest {largest} elements) | {r.note} |",
                flush=True,
            )
            rows.append(dict(row, program=label))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
