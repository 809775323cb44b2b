r"""How fast the trainer's steps would run on a TPU, from libtpu's own static schedule.

    .venv-compile/bin/python -m benchmarks.tpu_estimate                       # v5e and v4
    .venv-compile/bin/python -m benchmarks.tpu_estimate --generations v5e \
        --programs sasa_conv_stem --json estimate.json
    .venv-compile/bin/python -m benchmarks.tpu_estimate --layer 56,64,7       # one SelfAttention2D

Compiles (deviceless, libtpu) the trainer's train step (loss, gradients, optimizer; BatchNorm
in training mode, as ``aot`` builds it) for configs/imagenet.py depth 50 on one chip, and
reads back what the compiler scheduled (``sasa_flax.tools.tpu_schedule``): XLA's estimated cycles
per fusion, each Mosaic kernel's scheduled bundles times its loops, HBM traffic where it
bounds a kernel. Prints the step time, images/s per chip and the ratio to ResNet-50, a
breakdown by kind and by layer, and every kernel's bundles, spill and VALU share.
``--layer H,C,K``: one ``SelfAttention2D`` (forward + gradients) at H×H×C, window K,
instead. Every figure is *estimated from libtpu's static schedule, not run*.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets are compiled for, never run

PROGRAMS = {
    "resnet50": "configs/imagenet.py:depth=50,variant=baseline",
    "sasa_conv_stem": "configs/imagenet.py:depth=50,variant=conv_stem_attention",
    "sasa_full": "configs/imagenet.py:depth=50,variant=full_attention",
}


def _dump_directory(requested: str | None) -> str:
    """Makes libtpu dump the kernels' schedules: must run before libtpu loads."""
    from sasa_flax.tools import tpu_schedule

    directory = requested or tempfile.mkdtemp(prefix="sasa_tpu_schedule_")
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(
        filter(None, [os.environ.get("LIBTPU_INIT_ARGS"), tpu_schedule.dump_flags(directory)])
    )
    return directory


def estimate_step(name: str, generation: str, batch_per_chip: int, directory: str, step: str):
    """``step``: "train" (the trainer's train step: loss, gradients, SGD + EMA, BatchNorm in
    training mode), "eval" (its eval step) or "grad" (loss and gradients alone, BatchNorm in
    eval mode: the program of the shared probes, where the optimizer and BatchNorm's
    statistics do not soften the ratio to ResNet-50)."""
    from sasa_flax import trainer
    from sasa_flax.tools import programs, tpu_model, tpu_schedule

    setup = programs.trainer_setup(
        PROGRAMS[name], generation, batch_per_chip=batch_per_chip, chips=1
    )
    abstract = trainer.abstract_state(setup)
    batch = trainer.abstract_batch(setup, batch_per_chip)
    since = tpu_schedule.files(directory)
    if step == "grad":
        compiled = (
            _loss_and_gradient(setup).lower(abstract.params, abstract.model_state, batch).compile()
        )
    else:
        train, evaluate = trainer.jit_train_step(setup, abstract), trainer.jit_eval_step(setup)
        if step == "train":
            compiled = train.lower(abstract, batch).compile()
        else:
            compiled = evaluate.lower(abstract.params, abstract.model_state, batch).compile()
    return tpu_model.read(
        compiled,
        directory,
        generation=generation,
        program=f"{name} {step}",
        images_per_device=batch_per_chip,
        since=since,
    )


def _loss_and_gradient(setup):
    """jit(value_and_grad) of the cross-entropy through the eval-mode model (BatchNorm from
    its running statistics), as the trainer normalises images: no optimizer, no statistics
    update."""
    import jax
    import optax

    from sasa_flax import data
    from sasa_flax.trainer.setup import merged_model

    def loss(params, model_state, batch):
        model = merged_model(setup, setup.eval_graphdef, params, model_state, 0)
        logits = model(data.normalise(batch["image"]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    return jax.jit(jax.value_and_grad(loss))


def estimate_layer(size, channels, kernel_size, generation, batch_per_chip, directory, impl="auto"):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sasa_flax.tools import aot, programs, tpu_model, tpu_schedule

    mesh = jax.sharding.Mesh(aot.target_devices(generation, 1), ("data",))
    on_chip = NamedSharding(mesh, P())
    probe, params = programs.layer_probe(channels, kernel_size=kernel_size, impl=impl)

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    abstract = jax.tree.map(lambda a: struct(a.shape, a.dtype), params)
    x = struct((batch_per_chip, size, size, channels), jnp.bfloat16)
    since = tpu_schedule.files(directory)
    compiled = jax.jit(probe).lower(abstract, x).compile()
    return tpu_model.read(
        compiled,
        directory,
        generation=generation,
        program=f"layer {size}x{size}x{channels} k={kernel_size} {impl}",
        images_per_device=batch_per_chip,
        since=since,
    )


# ResNet-50's attention stages at 224² (8 heads): (size, channels).
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))
CHOICE_IMPLS = ("dense", "shifted", "pallas")
DENSE_POSITIONS = 1024  # larger images are not compiled densely for the table


def choice_table(generations, kernel_sizes, batch_per_chip, directory) -> dict:
    """For each generation, stage and k: every implementation's estimated cycles for the
    layer's forward and gradients, and the cheapest (``ops.choice``'s table)."""
    from sasa_flax.ops.pallas import tpu

    table = {}
    for generation in generations:
        for size, channels in STAGES:
            for k in kernel_sizes:
                cycles = {}
                for impl in CHOICE_IMPLS:
                    head = channels // 8
                    if impl == "pallas" and not tpu.fits(size, size, k, head, head):
                        continue
                    if impl == "dense" and size * size > DENSE_POSITIONS:
                        continue  # (H·W)² logits: out of HBM, or far slower (56²: 33 GiB)
                    try:
                        estimate = estimate_layer(
                            size, channels, k, generation, batch_per_chip, directory, impl
                        )
                    except Exception as e:  # noqa: BLE001  (e.g. dense at 56²: out of HBM)
                        if "RESOURCE_EXHAUSTED" not in str(e):
                            raise
                        continue  # does not fit the chip: not a choice
                    cycles[impl] = estimate.cycles
                choice = min(cycles, key=cycles.get)
                key = f"{size}x{size}x{channels // 8} k={k}"
                table.setdefault(generation, {})[key] = dict(cycles=cycles, choice=choice)
                print(
                    f"{generation} {key}: "
                    + ", ".join(f"{i} {c / 1e6:.2f} M" for i, c in cycles.items())
                    + f" -> {choice}",
                    flush=True,
                )
    return table


def print_estimate(estimate, baseline=None) -> None:
    s = estimate.summary()
    ratio = f", {estimate.seconds / baseline.seconds:.2f}x ResNet-50's step" if baseline else ""
    print(
        f"\n== {s['program']} on {s['generation']}, {s['images_per_device']} images per chip "
        f"(estimated from libtpu's static schedule, not run)"
    )
    print(
        f"   {s['cycles'] / 1e6:.1f} M cycles: {s['step_ms']} ms per step, "
        f"{s['images_per_second']} img/s per chip{ratio}"
    )
    if s["peak_bytes"]:
        print(
            f"   memory (compiled): temporaries {s['temp_bytes'] / 2**30:.2f} GiB, "
            f"peak {s['peak_bytes'] / 2**30:.2f} GiB per chip"
        )
    total = max(s["cycles"], 1)
    kinds = s["by_kind"].items()
    print("   by kind:  " + "; ".join(f"{k} {v / 1e6:.1f} M ({v / total:.0%})" for k, v in kinds))
    layers = list(s["by_layer"].items())
    print("   by layer: " + "; ".join(f"{k} {v / 1e6:.1f} M" for k, v in layers))
    for row in s["kernels"]:
        print(
            f"   kernel {row['kernel']}: {row['calls']} calls, {row['bundles']} bundles, "
            f"loops {row['loops']}, {row['cycles_per_call'] / 1e6:.2f} M cycles per call, "
            f"spill {row['spill_share']:.0%}, VALU {row['valu_share']:.0%}, "
            f"XLU {row['xlu_share']:.0%}, MXU {row['mxu_share']:.0%}"
        )
    if s["missing_kernels"]:
        print(f"   ({s['missing_kernels']} kernel calls without a dumped schedule: not counted)")
    if s["collectives"]:
        print(f"   collectives (not timed): {s['collectives']}")


def calibration(estimate) -> str:
    from sasa_flax.tools import tpu_model

    published = tpu_model.CALIBRATION.get(estimate.generation)
    if published is None:
        return (
            f"   calibration: no published ResNet-50 figure for {estimate.generation} is "
            "stored here; v4's ratio is the uncertainty"
        )
    figure, source = published
    return (
        f"   calibration: estimated {estimate.images_per_second:.0f} img/s per chip against "
        f"{figure:.0f} published ({source}): estimate / published = "
        f"{estimate.images_per_second / figure:.2f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", default="v5e,v4")
    parser.add_argument("--programs", default="resnet50,sasa_conv_stem,sasa_full")
    parser.add_argument("--steps", default="train", help="train,eval,grad")
    parser.add_argument("--batch-per-chip", type=int, default=128)
    parser.add_argument("--layer", help="H,C,K: one SelfAttention2D instead of the steps")
    parser.add_argument("--dump-to", help="where libtpu writes the schedules (default: a temp dir)")
    parser.add_argument(
        "--no-schedules",
        action="store_true",
        help="no kernel schedules (compiles 2-3x faster): XLA's own estimates only, so "
        "exact for resnet50, and every Mosaic kernel call reported as not counted",
    )
    parser.add_argument("--json", help="write every estimate's summary here")
    parser.add_argument(
        "--choices",
        action="store_true",
        help="compare dense, shifted and pallas per stage and k instead",
    )
    parser.add_argument("--kernel-sizes", default="3,5,7,9,11")
    parser.add_argument(
        "--write",
        action="store_true",
        help="with --choices: write the table into sasa_flax/ops/tpu_choices.json",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --choices: exit 1 where the checked-in table chooses otherwise",
    )
    args = parser.parse_args(argv)
    if args.no_schedules and (args.choices or args.layer):
        parser.error("--no-schedules leaves out the kernels that --choices and --layer compare")
    # libtpu's schedule dumps cost more than the compile itself (every XLA fusion's too).
    directory = tempfile.mkdtemp() if args.no_schedules else _dump_directory(args.dump_to)

    if args.choices:
        return _choices(args, directory)
    estimates = []
    for generation in args.generations.split(","):
        if args.layer:
            size, channels, k = (int(x) for x in args.layer.split(","))
            estimate = estimate_layer(size, channels, k, generation, args.batch_per_chip, directory)
            print_estimate(estimate)
            estimates.append(estimate)
            continue
        for step in args.steps.split(","):
            baseline = None
            for name in args.programs.split(","):
                estimate = estimate_step(name, generation, args.batch_per_chip, directory, step)
                estimates.append(estimate)
                print_estimate(estimate, baseline)
                if name == "resnet50":
                    baseline = estimate
                    print(calibration(estimate))
    if args.json:
        from sasa_flax.tools import tpu_model

        with open(args.json, "w") as f:
            f.write(tpu_model.to_json(estimates))
    return 0


def _choices(args, directory) -> int:
    kernel_sizes = [int(k) for k in args.kernel_sizes.split(",")]
    table = choice_table(args.generations.split(","), kernel_sizes, args.batch_per_chip, directory)
    if args.write:
        write_tpu_choices(table, batch_per_chip=args.batch_per_chip)
    if args.check:
        stale = stale_tpu_choices(table)
        for line in stale:
            print("stale:", line)
        return 1 if stale else 0
    return 0


def write_tpu_choices(table: dict, *, batch_per_chip: int) -> None:
    """Writes ``table`` ({generation: {key: {"cycles", "choice"}}}) as the checked-in
    choice table, merged into what is there."""
    import jax.version

    from sasa_flax.ops import choice

    path = choice.TPU_CHOICES
    current = json.loads(path.read_text()) if path.exists() else {}
    generations = current.get("generations", {})
    for generation, rows in table.items():
        generations.setdefault(generation, {}).update(rows)
    about = (
        "Estimated cycles of SelfAttention2D (forward and gradients, bfloat16, 8 heads) per "
        "implementation, from libtpu's static schedule, not run: benchmarks/tpu_estimate.py "
        "--choices."
    )
    path.write_text(
        json.dumps(
            dict(
                about=about,
                jax=jax.version.__version__,
                libtpu=_libtpu_version(),
                batch_per_chip=batch_per_chip,
                generations=generations,
            ),
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    choice.tpu_choices.cache_clear()


def stale_tpu_choices(table: dict) -> list[str]:
    """Where ``table`` (freshly estimated) chooses otherwise than the checked-in one."""
    from sasa_flax.ops import choice

    checked_in = choice.tpu_choices()
    stale = []
    for generation, rows in table.items():
        for key, row in rows.items():
            old = checked_in.get(generation, {}).get(key, {}).get("choice")
            if old != row["choice"]:
                stale.append(f"{generation} {key}: table says {old}, libtpu now {row['choice']}")
    return stale


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001  (not installed: the table is only read)
        return "unknown"


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
