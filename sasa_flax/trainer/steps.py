"""The jitted steps: one SGD step on a global batch, one evaluation step, and how they are
compiled over the mesh (explicit shardings, state donated, fused-kernel failures explained
by ``ops.pallas.failures``) and checked against the device's memory.

BatchNorm statistics are over the global batch: under ``jax.jit`` with the batch sharded,
the mean over the batch axis is a global reduction. No pmap, no pjit.
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sasa_flax import aot, config_lib, data
from sasa_flax.errors import TrainError
from sasa_flax.layers.plan import attention_plan
from sasa_flax.ops.pallas.failures import kernel_failures_explained
from sasa_flax.trainer.setup import MODEL_STATE, Setup, TrainState, merged_model

log = logging.getLogger(__name__)


def _cross_entropy(logits, labels, num_classes, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def ema_decay(train_config, step) -> jax.Array:
    """The EMA decay at ``step`` (updates done so far): ``ema_decay``, or with
    ``ema_warmup`` min(ema_decay, (1 + step) / (10 + step)), so that in a short run the
    average is not mostly its random initialisation (0.9999^1560 ≈ 0.86 of it would
    remain after 1,560 steps without warm-up)."""
    decay = jnp.asarray(train_config.ema_decay, jnp.float32)
    if not train_config.ema_warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(setup: Setup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One SGD step on a global batch. ``batch["mask"]`` is 0 for images that could not be
    decoded (config.input.corrupt_images='skip'): they carry no loss.

    With ``config.train.accumulation_steps`` = n > 1 the batch goes through the model in
    n micro-batches, one after another inside this one compiled step (every device takes
    1/n of its images each time), and their gradients are summed before the one update:
    the same mean gradient as the whole batch at once, with the activations of a micro-
    batch. BatchNorm normalises each micro-batch by its own statistics and updates its
    running averages once per micro-batch; Dropout and stochastic depth draw new keys per
    micro-batch.

    A step whose loss or gradient norm is not finite changes nothing but the step counter
    and ``nonfinite_steps``; the host then stops the run or goes on (config.train.on_nonfinite).
    """
    t = setup.config.train
    num_classes = setup.config.model.num_classes
    n = t.accumulation_steps
    count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)  # the whole batch's, for every part

    def loss_fn(params, model_state, part, seed_step):
        model = merged_model(setup, setup.train_graphdef, params, model_state, seed_step)
        logits = model(data.normalise(part["image"]))
        losses = _cross_entropy(logits, part["label"], num_classes, t.label_smoothing)
        hits = jnp.sum((jnp.argmax(logits, -1) == part["label"]) * part["mask"])
        new_model_state = nnx.to_pure_dict(nnx.state(model, MODEL_STATE))
        return jnp.sum(losses * part["mask"]) / count, (hits, new_model_state)

    gradient = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        (loss, (hits, model_state)), grads = gradient(
            state.params, state.model_state, batch, state.step
        )
    else:

        def accumulate(carry, micro):
            grads, loss, hits, model_state = carry
            index, part = micro
            (part_loss, (part_hits, model_state)), part_grads = gradient(
                state.params, model_state, part, state.step * n + index
            )
            grads = jax.tree.map(jnp.add, grads, part_grads)
            return (grads, loss + part_loss, hits + part_hits, model_state), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        parts = jax.tree.map(lambda x: per_device_chunks(x, setup.mesh.size, n), batch)
        start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.model_state)
        (grads, loss, hits, model_state), _ = jax.lax.scan(
            accumulate, start, (jnp.arange(n), parts)
        )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = optax.incremental_update(params, ema, 1.0 - ema_decay(t, state.step))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = state.replace(
        params=params, model_state=model_state, opt_state=opt_state, ema_params=ema
    )
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = kept.replace(
        step=state.step + 1,
        nonfinite_steps=state.nonfinite_steps + jnp.logical_not(finite).astype(jnp.int32),
    )
    metrics = dict(
        loss=loss,
        top1=hits / count,
        # The rate this update applied: the schedule at the number of updates applied so
        # far, which a skipped (non-finite) step does not advance, unlike state.step.
        learning_rate=setup.schedule(state.step - state.nonfinite_steps),
        grad_norm=grad_norm,
        finite=finite,
        skipped_images=jnp.sum(batch["mask"] == 0),
    )
    return new_state, metrics


def per_device_chunks(x: jax.Array, devices: int, chunks: int) -> jax.Array:
    """(B, ...) sharded over ``devices`` -> (chunks, B / chunks, ...): chunk i holds the
    i-th 1/chunks of every device's images, so each chunk stays spread over every device
    and nothing moves between them."""
    per_chunk = x.shape[0] // (devices * chunks)
    x = x.reshape(devices, chunks, per_chunk, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(chunks, devices * per_chunk, *x.shape[3:])


def eval_step(
    setup: Setup, params: dict, model_state: dict, batch: dict, *, chunks: int = 1
) -> dict:
    """Sums over the (masked) batch: loss, top-1 and top-5 hits, example count. With
    ``chunks`` > 1 every device's images go through the model in that many chunks, one
    after another (``fit_eval_step``): the same sums, a fraction of the activations."""
    if chunks == 1:
        return _eval_sums(setup, params, model_state, batch)
    sums = jax.lax.map(
        lambda part: _eval_sums(setup, params, model_state, part),
        jax.tree.map(lambda x: per_device_chunks(x, setup.mesh.size, chunks), batch),
    )
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)


def _eval_sums(setup: Setup, params: dict, model_state: dict, batch: dict) -> dict:
    model = merged_model(setup, setup.eval_graphdef, params, model_state, 0)
    logits = model(data.normalise(batch["image"]))
    mask = batch["mask"]
    num_classes = setup.config.model.num_classes
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return dict(
        loss=jnp.sum(_cross_entropy(logits, batch["label"], num_classes, 0.0) * mask),
        top1=jnp.sum((top5[:, 0] == batch["label"]) * mask),
        top5=jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
        count=jnp.sum(mask),
    )


def global_batch(setup: Setup, local: dict) -> dict:
    """Per-process NumPy arrays -> global arrays sharded over the data axis."""
    return {
        key: jax.make_array_from_process_local_data(setup.data_sharded, value)
        for key, value in local.items()
    }


def abstract_batch(setup: Setup, batch_size: int) -> dict:
    """The global batch the steps are compiled for (uint8 images, see sasa_flax.data)."""
    size = setup.config.input.image_size

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=setup.data_sharded)

    return dict(
        image=spec((batch_size, size, size, 3), jnp.uint8),
        label=spec((batch_size,), jnp.int32),
        mask=spec((batch_size,), jnp.float32),
    )


def device_platform(setup: Setup) -> str:
    """The platform name ``jax.lax.platform_dependent`` lowers the steps for: "cpu",
    "tpu", "cuda" or "rocm"."""
    device = setup.mesh.devices.flat[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def log_attention_plan(setup: Setup) -> None:
    """Logs which implementation each attention layer runs on the run's devices."""
    if jax.process_index() != 0:
        return
    model = config_lib.build_model(setup.config)
    plan = attention_plan(model, setup.config.input.image_size, device_platform(setup))
    if plan:
        log.info("attention on %s: %s", device_platform(setup), "; ".join(plan))


def compile_or_explain(step, *abstract_args):
    """``step`` lowered and compiled; a compiler failure inside a fused attention kernel
    ends the run in one line naming the way round it (``kernel_failures_explained``)."""
    with kernel_failures_explained():
        return step.lower(*abstract_args).compile()


def compile_train_step(setup: Setup, train_fn, abstract: TrainState, memory_bytes=None):
    """``train_fn`` compiled for the config's global batch (``compile_or_explain``) and
    checked, before any step runs, against the memory of the device (``memory_bytes`` per
    device; by default the device's own where it reports it: TPU and GPU, not the CPU). A
    step that cannot fit ends in one line naming the accumulation that would."""
    batch_size = setup.config.input.batch_size
    if memory_bytes is None:
        memory_bytes = _device_memory(setup)
    batch = abstract_batch(setup, batch_size)
    if not memory_bytes:  # the CPU: no memory to check against
        return compile_or_explain(train_fn, abstract, batch)
    fixed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))  # replicated
    compiled, peak, temp = _compiled_or_refused(
        compile_or_explain, train_fn, abstract, batch, fixed_bytes=fixed
    )
    if compiled is None or peak > aot.HEADROOM * memory_bytes:
        raise _train_step_too_large(setup, memory_bytes, peak, temp)
    return compiled


def _compiled_or_refused(compile_fn, step, *args, fixed_bytes: int = 0, if_unsaid=None):
    """(compiled, peak bytes, temporaries) of ``step`` compiled by ``compile_fn``. XLA:TPU
    refuses a program over the chip's memory outright (RESOURCE_EXHAUSTED), saying what
    its temporaries need: then (None, ``fixed_bytes`` + that, that), where ``fixed_bytes``
    is the rest (state, batch, outputs). A refusal that does not say is raised, or taken
    as ``if_unsaid`` bytes of temporaries where given."""
    try:
        compiled = compile_fn(step, *args)
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        required = _required_bytes(str(e)) or if_unsaid
        if required is None:
            raise
        return None, fixed_bytes + required, required
    analysis = compiled.memory_analysis()
    return compiled, aot.peak_bytes(analysis), analysis.temp_size_in_bytes


def _train_step_too_large(setup: Setup, memory_bytes: int, peak: int, temp: int) -> TrainError:
    """The line for a train step over the device's memory: the accumulation_steps whose
    micro-batch would fit, the activations taken as linear in the images at once."""
    batch_size, n = setup.config.input.batch_size, setup.config.train.accumulation_steps
    per_device = batch_size // setup.mesh.size
    at_once = per_device // n
    budget = aot.HEADROOM * memory_bytes
    fixed, per_image = peak - temp, temp / at_once
    fitting = [m for m in range(1, per_device + 1)
               if per_device % m == 0 and fixed + per_image * m <= budget]  # fmt: skip
    said = (
        f"the train step needs {peak / aot.GIB:.1f} GiB per device ({at_once} images per "
        f"device at once), over {aot.HEADROOM:.0%} of the device's "
        f"{memory_bytes / aot.GIB:.1f} GiB"
    )
    if not fitting:
        return TrainError(
            f"{said}; even one image per device would not fit (the state and the rest take "
            f"{fixed / aot.GIB:.1f} GiB): use devices with more memory, or a smaller model "
            "or image size."
        )
    m = max(fitting)
    return TrainError(
        f"{said}: set --config.train.accumulation_steps={per_device // m} ({m} images per "
        f"device at once, estimated to fit; the same {batch_size} images per optimizer step), "
        "or a smaller --config.input.batch_size."
    )


def fit_eval_step(
    setup: Setup, abstract: TrainState, memory_bytes: int | None = None, compile_fn=None
):
    """(eval step compiled for the config's eval batch, chunks): the whole per-device
    batch at once if its compiled program fits the device's memory, else in the fewest
    chunks that do (``eval_step``), said in the log. ``memory_bytes``: per device (by
    default the device's own, where it reports one; the CPU does not, and gets the lazily
    compiled step in one chunk). ``compile_fn(step, *args)``: how to compile (default
    ``compile_or_explain``)."""
    if memory_bytes is None:
        memory_bytes = _device_memory(setup)
        if not memory_bytes:
            return _jit_eval(setup), 1
    batch_size = setup.config.input.eval_batch_size
    per_device = batch_size // setup.mesh.size
    batch = abstract_batch(setup, batch_size)
    budget = aot.HEADROOM * memory_bytes
    chunks, first = 1, None
    while True:
        step = _jit_eval(setup, chunks)
        compiled, peak, _ = _compiled_or_refused(
            compile_fn or compile_or_explain, step, abstract.params, abstract.model_state, batch,
            if_unsaid=2 * budget,  # a refusal that does not say: more chunks, then
        )  # fmt: skip
        first = first or peak
        if compiled is not None and peak <= budget:
            break
        larger = [c for c in range(chunks + 1, per_device + 1) if per_device % c == 0]
        if not larger:
            raise TrainError(
                f"the eval step does not fit this device's {memory_bytes / aot.GIB:.1f} GiB "
                f"even one image at a time ({peak / aot.GIB:.1f} GiB): set "
                "--config.input.eval_batch_size smaller, or use a device with more memory."
            )
        # The activations scale with the images per chunk: the next try from that estimate.
        wanted = chunks * peak / budget
        chunks = next((c for c in larger if c >= wanted), larger[-1])
    if chunks > 1 and jax.process_index() == 0:
        log.info(
            "evaluation: %d images per device need %.1f GiB, over %.0f%% of the device's "
            "%.1f GiB: evaluated in %d chunks of %d (%.1f GiB)",
            per_device, first / aot.GIB, 100 * aot.HEADROOM, memory_bytes / aot.GIB,
            chunks, per_device // chunks, peak / aot.GIB,
        )  # fmt: skip
    return compiled, chunks


def _device_memory(setup: Setup) -> int | None:
    """Bytes of memory of this process's first device of the mesh, where its platform
    says (TPU and GPU; not the CPU). Every process compiles the same program for the same
    kind of device, so they all choose the same chunks."""
    local = next(d for d in setup.mesh.devices.flat if d.process_index == jax.process_index())
    return (local.memory_stats() or {}).get("bytes_limit")


def _required_bytes(message: str) -> int | None:
    """The memory an XLA out-of-memory error says the program needs, if it says."""
    match = re.search(r"required for HLO temporaries \(([0-9.]+)([KMG])\)", message)
    if match is None:
        return None
    return int(float(match.group(1)) * 2 ** {"K": 10, "M": 20, "G": 30}[match.group(2)])


def _jit_eval(setup: Setup, chunks: int = 1):
    return jax.jit(
        functools.partial(eval_step, setup, chunks=chunks),
        in_shardings=(setup.replicated, setup.replicated, setup.data_sharded),
        out_shardings=setup.replicated,
    )


def compile_steps(setup: Setup, abstract: TrainState):
    """(train_step, eval_step) jitted with explicit shardings; the state is donated.
    ``abstract`` is ``abstract_state(setup)``."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    train = jax.jit(
        functools.partial(train_step, setup),
        in_shardings=(state_shardings, setup.data_sharded),
        out_shardings=(state_shardings, setup.replicated),
        donate_argnums=(0,),
    )
    return train, _jit_eval(setup)
