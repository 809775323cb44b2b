"""The programs the compile checks compile for TPU and GPU targets without them
(``aot``): one ``SelfAttention2D`` layer as the trainer splits it, the layer in programs
of users' own (``USER_PROGRAMS``), and the trainer's own train and eval steps."""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import config_lib, trainer
from sasa_flax.layers import SelfAttention2D
from sasa_flax.ops import local_attention
from sasa_flax.tools import aot


def summed_gradient(fn, argnums):
    """``jax.value_and_grad`` of Σ ``fn(*args)`` in float32 over ``argnums``: the forward
    and every gradient, as the probes compile them (a layer, the functional core, one
    kernel). The one loss of every probe."""

    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=argnums)


def layer_probe(
    channels: int,
    *,
    kernel_size: int,
    heads: int = 8,
    impl: str = "auto",
    dtype=jnp.bfloat16,
    padding: str = "mask",
    take: int | None = None,
):
    """(``summed_gradient`` of an abstract ``SelfAttention2D(channels, channels, ...)``
    over (params, x), its params): the layer → loss → gradient probe. ``take``: only the
    first ``take`` images of x go through the layer (a slice inside the program)."""
    layer = nnx.eval_shape(
        lambda: SelfAttention2D(
            channels,
            channels,
            num_heads=heads,
            kernel_size=kernel_size,
            padding=padding,
            impl=impl,
            dtype=jnp.dtype(dtype),
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, params = nnx.split(layer)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x if take is None else x[:take])

    return summed_gradient(forward, (0, 1)), params


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
) -> aot.Report:
    """``SelfAttention2D`` forward + gradients (input and every parameter) on ``chips``
    chips of ``target``, the batch split over them as the trainer splits it."""

    mesh = trainer.data_mesh(aot.target_devices(target, chips))
    probe, params = layer_probe(
        channels, kernel_size=kernel_size, heads=heads, impl=impl, dtype=dtype, padding=padding
    )
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params
    )
    x = jax.ShapeDtypeStruct(
        (batch_per_chip * chips, size, size, channels), jnp.dtype(dtype), sharding=split
    )
    platform = aot.TARGETS[target].platform
    compiled, seconds, note = aot.compile_for(jax.jit(probe), abstract, x, platform=platform)
    name = f"layer {size}x{size}x{channels} k={kernel_size} {padding} {dtype}"
    return aot.report(compiled, aot.TARGETS[target], name, seconds, batch_per_chip, note)


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
) -> aot.Report:
    """One of ``USER_PROGRAMS``: ``SelfAttention2D`` forward + gradients (or, for "heads",
    the functional core's) in bfloat16 on 4 chips of ``target``, built as a researcher
    would build it, not as our trainer does. ``Report.program`` names the case."""

    if program not in USER_PROGRAMS:
        raise ValueError(f"program must be one of {sorted(USER_PROGRAMS)}; got {program!r}")
    devices, chips = aot.target_devices(target, 4), 4
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

        def core(q, k, v, rel_row, rel_col):
            return local_attention(q, k, v, rel_row, rel_col, kernel_size=kernel_size, impl=impl)

        step = jax.jit(summed_gradient(core, tuple(range(5))))
        args = (q, q, q, table, table)
    else:
        keep = {"batch_not_divisible": batch - 2, "batch_smaller_than_mesh": 2}.get(program)
        value_and_grads, params = layer_probe(
            channels, kernel_size=kernel_size, heads=heads, impl=impl, take=keep
        )

        def param_spec(path, _):
            column_split = program == "tensor_parallel" and "kernel" in jax.tree_util.keystr(path)
            return P(None, "model") if column_split else P()

        specs = jax.tree_util.tree_map_with_path(param_spec, params)
        abstract = jax.tree.map(lambda a, spec: struct(a.shape, a.dtype, spec), params, specs)
        x_spec = P() if program == "set_mesh_replicated" else P("data")
        x = struct((batch, size, size, channels), bf16, x_spec)

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
    platform = aot.TARGETS[target].platform
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        compiled, seconds, note = aot.compile_for(step, *args, platform=platform)
    return aot.report(compiled, aot.TARGETS[target], program, seconds, batch_per_chip, note)


def trainer_setup(config_spec: str, target: str, *, batch_per_chip: int, chips: int = 4):
    """The trainer's own ``Setup`` for ``config_spec`` (e.g. ``configs/imagenet.py:depth=50``)
    on ``chips`` chips of ``target``, in bfloat16 (the trainer's choice on TPU and GPU; on
    this CPU host "auto" would say float32), without opening a dataset."""

    config = config_lib.load_config(config_spec)
    # The eval step keeps the config's own eval_batch_size: what a run evaluates with.
    config.input.batch_size = batch_per_chip * chips
    config.train.compute_dtype = "bfloat16"
    devices = aot.target_devices(target, chips)
    return trainer.model_setup(
        config, devices, dataset=None, steps_per_epoch=1000, total_steps=100_000
    )


def compile_train_steps(setup, target: str) -> tuple[aot.Report, aot.Report]:
    """The trainer's train step and eval step compiled for ``setup``'s mesh (of ``target``
    chips) as the trainer compiles them (``trainer.compile_train_step``, and
    ``trainer.compile_eval_step`` sizing the eval step for this chip's memory); Reports
    for both."""
    batch_per_chip = setup.config.input.batch_size // setup.mesh.size
    abstract = trainer.abstract_state(setup)
    platform, hbm = aot.TARGETS[target].platform, aot.TARGETS[target].hbm_bytes
    notes, seconds = [], []

    def compile_noting(step, *args):
        compiled, took, note = aot.compile_for(step, *args, platform=platform)
        notes.append(note)
        seconds.append(took)
        return compiled

    compiled = trainer.compile_train_step(setup, abstract, hbm, compile_fn=compile_noting)
    train_report = aot.report(
        compiled, aot.TARGETS[target], "train step", seconds[-1], batch_per_chip, notes[-1]
    )
    start = time.perf_counter()
    compiled, chunks = trainer.compile_eval_step(setup, abstract, hbm, compile_fn=compile_noting)
    # Per chip, the images of one chunk go through the model at a time.
    per_chunk = setup.config.input.eval_batch_size // setup.mesh.size // chunks
    note = "; ".join(filter(None, [notes[-1], chunks > 1 and f"{chunks} chunks of {per_chunk}"]))
    eval_report = aot.report(
        compiled, aot.TARGETS[target], "eval step", time.perf_counter() - start, per_chunk, note
    )
    return train_report, eval_report
