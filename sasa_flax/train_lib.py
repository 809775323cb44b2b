"""Data-parallel training and evaluation over every device of a mesh.

Stages of ``train_and_evaluate`` (one process per host; every host runs the same program):
  1. Validate the config and the batch against the devices; open the dataset.
  2. Mesh over all devices (one ``data`` axis). Batch sharded on it, state replicated.
  3. Abstract init (``jax.eval_shape``), then the state born replicated on the mesh, or
     restored from the newest checkpoint of the workdir.
  4. Loop: global batches from per-process data, jitted train step (state donated),
     metrics, periodic evaluation, asynchronous checkpoints.
  5. Final checkpoint and evaluation, printed and written to the workdir.

The trainer assumes nothing about the model beyond ``(B, H, W, 3) images -> (B, classes)
logits``: its state is split with filters over the whole ``nnx.state`` into parameters
(``nnx.Param``), RNG streams (``nnx.RngState``: reseeded every step from (seed, step), so
Dropout and stochastic depth resume bit-exactly; not checkpointed) and everything else
(``model_state``: BatchNorm statistics if any, any other ``nnx.Variable``).

BatchNorm statistics are over the global batch: under ``jax.jit`` with the batch sharded,
the mean over the batch axis is a global reduction. No pmap, no pjit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import threading
import time
from typing import Any

# isort: off
import sasa_flax.quiet_tensorflow  # noqa: F401 - first: before clu imports TensorFlow

# isort: on
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from clu import metric_writers
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import (
    checkpointing,
    config_lib,
    distributed,
    input_pipeline,
    preemption,
    workdir_lock,
)
from sasa_flax.errors import UserError
from sasa_flax.results import RUN_RECORD

# Progress and results go to stdout on their own logger, whatever absl's verbosity
# (orbax logs every file it writes at INFO).
log = logging.getLogger("sasa_flax")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class TrainError(UserError):
    """The run cannot start as configured; the message says why and what to change."""


# The model's state that is neither a parameter nor an RNG stream.
MODEL_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    model_state: dict  # BatchNorm statistics and any other non-parameter variable
    opt_state: Any
    ema_params: dict | None
    nonfinite_steps: jax.Array  # steps skipped for a non-finite loss or gradient

    def model_item(self) -> dict:
        """What evaluation needs, as checkpointed under ``model``."""
        return dict(params=self.params, model_state=self.model_state, ema_params=self.ema_params)

    def train_item(self) -> dict:
        return dict(step=self.step, opt_state=self.opt_state, nonfinite_steps=self.nonfinite_steps)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run, derived from the config and the devices."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    dataset: input_pipeline.Dataset
    train_graphdef: Any
    eval_graphdef: Any
    rng_template: Any  # the model's RNG streams (abstract); reseeded at every step
    decay_mask: Any  # params -> pytree of bool
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    total_steps: int

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def data_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))


# --- stage 1-3: set-up --------------------------------------------------------------


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32
    return jnp.dtype(name)


def check_batch_sizes(config, num_devices: int, process_count: int) -> None:
    for field in ("batch_size", "eval_batch_size"):
        value = config.input[field]
        if value % num_devices or value % process_count:
            raise TrainError(
                f"config.input.{field}={value} is not divisible by the {num_devices} devices "
                f"({process_count} processes); use a multiple of {num_devices}, e.g. "
                f"{max(num_devices, value // num_devices * num_devices)}."
            )


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to 0; peak = base × global batch / 256."""
    peak = config.train.base_learning_rate * config.input.batch_size / 256
    warmup = min(int(round(config.train.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), total_steps, 0.0)


def default_decay_mask(params) -> Any:
    """Weight decay on every parameter with ndim > 1 (kernels and embeddings), not on
    biases, norms' scales and other vectors. A model overrides it with a ``decay_mask``
    method of its own (the SASA ResNet decays kernels only)."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(config, schedule, decay_mask=default_decay_mask) -> optax.GradientTransformation:
    t = config.train
    return optax.chain(
        optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=t.momentum or None, nesterov=t.nesterov),
    )


def make_setup(config, *, devices=None, process_index=None, process_count=None) -> Setup:
    abstract = config_lib.check(config, dtype=compute_dtype(config.train.compute_dtype))
    devices = list(devices or jax.devices())
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    check_batch_sizes(config, len(devices), process_count)
    dataset = input_pipeline.load(
        config.input, process_index=process_index, process_count=process_count
    )
    if dataset.num_classes != config.model.num_classes:
        raise TrainError(
            f"config.model.num_classes={config.model.num_classes} but {config.input.dataset} has "
            f"{dataset.num_classes} classes; set --config.model.num_classes={dataset.num_classes}."
        )
    steps_per_epoch = input_pipeline.steps_per_epoch(dataset, config.input.batch_size)
    total_steps = config.train.num_steps or int(
        math.ceil(config.train.num_epochs * steps_per_epoch)
    )
    return model_setup(
        config, devices, dataset=dataset, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, abstract=abstract,
    )  # fmt: skip


def model_setup(
    config, devices, *, dataset, steps_per_epoch: int, total_steps: int, abstract=None
) -> Setup:
    """The model, optimizer and mesh half of ``make_setup``, for a dataset already opened
    (or none: benchmarks feed their own batches). ``abstract``: the config's abstract
    model in the compute dtype, if already built."""
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    if abstract is None:
        abstract = config_lib.abstract_model(config, compute_dtype(config.train.compute_dtype))
    abstract.train()
    train_graphdef = nnx.graphdef(abstract)
    abstract.eval()
    eval_graphdef = nnx.graphdef(abstract)
    decay_mask = getattr(abstract, "decay_mask", default_decay_mask)
    return Setup(
        config=config,
        mesh=data_mesh(devices),
        dataset=dataset,
        train_graphdef=train_graphdef,
        eval_graphdef=eval_graphdef,
        rng_template=nnx.state(abstract, nnx.RngState),
        decay_mask=decay_mask,
        tx=make_optimizer(config, schedule, decay_mask),
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def data_mesh(devices) -> jax.sharding.Mesh:
    """The trainer's mesh: one ``data`` axis over ``devices``. Auto axes: XLA propagates
    the batch sharding (BatchNorm means and the rel-table gradients become global
    reductions); jax.make_mesh defaults to Explicit."""
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def _init_state(setup: Setup) -> TrainState:
    config = setup.config
    model = config_lib.instantiate(  # make_setup validated the config
        config, rngs=nnx.Rngs(config.train.seed), dtype=compute_dtype(config.train.compute_dtype)
    )
    _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=setup.tx.init(params),
        ema_params=params if config.train.ema_decay > 0 else None,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def abstract_state(setup: Setup) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
    shapes = jax.eval_shape(functools.partial(_init_state, setup))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.replicated), shapes
    )


def init_state(setup: Setup, abstract: TrainState) -> TrainState:
    """The initial state, born replicated on the mesh (no host copy of the parameters).
    ``abstract`` is ``abstract_state(setup)``."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(functools.partial(_init_state, setup), out_shardings=shardings)()


# --- stage 4: steps -----------------------------------------------------------------


def _cross_entropy(logits, labels, num_classes, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def merged_model(setup: Setup, graphdef, params, model_state, step) -> nnx.Module:
    """The model with these variables and its RNG streams seeded from (seed, step): the
    same keys whether or not the run was resumed in between."""
    rngs = jax.tree.map(_placeholder, setup.rng_template)
    model = nnx.merge(graphdef, params, rngs, model_state, copy=True)
    streams = {m.tag for _, m in nnx.iter_graph(model) if isinstance(m, nnx.RngStream)}
    if streams:
        key = jax.random.fold_in(jax.random.key(setup.config.train.seed), step)
        nnx.reseed(model, **{name: jax.random.fold_in(key, i) for i, name in
                             enumerate(sorted(streams))})  # fmt: skip
    return model


def _placeholder(x):
    """A value of ``x``'s shape and dtype (typed PRNG keys included), overwritten by reseed."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)


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

    A step whose loss or gradient norm is not finite changes nothing but the step counter
    and ``nonfinite_steps``; the host then stops the run or goes on (config.train.on_nonfinite).
    """
    t = setup.config.train
    num_classes = setup.config.model.num_classes
    mask = batch["mask"]
    count = jnp.maximum(jnp.sum(mask), 1.0)

    def loss_fn(params):
        model = merged_model(setup, setup.train_graphdef, params, state.model_state, state.step)
        logits = model(input_pipeline.normalise(batch["image"]))
        losses = _cross_entropy(logits, batch["label"], num_classes, t.label_smoothing)
        loss = jnp.sum(losses * mask) / count
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, MODEL_STATE)))

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
        top1=jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask) / count,
        # The rate this update applied: the schedule at the number of updates applied so
        # far, which a skipped (non-finite) step does not advance, unlike state.step.
        learning_rate=setup.schedule(state.step - state.nonfinite_steps),
        grad_norm=grad_norm,
        finite=finite,
        skipped_images=jnp.sum(mask == 0),
    )
    return new_state, metrics


def eval_step(setup: Setup, params: dict, model_state: dict, batch: dict) -> dict:
    """Sums over the (masked) batch: loss, top-1 and top-5 hits, example count."""
    model = merged_model(setup, setup.eval_graphdef, params, model_state, 0)
    logits = model(input_pipeline.normalise(batch["image"]))
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


class DevicePrefetch:
    """Global batches put on the devices ``ahead`` steps before the loop asks for them, by
    a background thread, so that the host's input work and the transfer overlap the
    running steps. ``waited`` is the time the loop spent blocked on it: input-bound time.
    An error of the input pipeline is raised by ``next`` in the loop's thread."""

    def __init__(self, setup: Setup, batches, ahead: int = 2):
        self.waited = 0.0
        self._queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(setup, batches), daemon=True, name="device-prefetch"
        )
        self._thread.start()

    def _fill(self, setup, batches) -> None:
        try:
            for local in batches:
                item = global_batch(setup, local)
                while not self._put(item):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
            self._put_until_stopped(_Failed(StopIteration()))  # a finite stream ended
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread
            self._put_until_stopped(_Failed(e))
        finally:
            # Releases the tf.data iterators here, not in a daemon thread at exit (where
            # TensorFlow aborts the process).
            getattr(batches, "close", lambda: None)()

    def _put_until_stopped(self, item) -> None:
        while not self._put(item) and not self._stop.is_set():
            pass

    def _put(self, item) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - start
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread and waits for it (it may be finishing one batch)."""
        self._stop.set()
        self._thread.join(timeout)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


def abstract_batch(setup: Setup, batch_size: int) -> dict:
    """The global batch the steps are compiled for (uint8 images, see input_pipeline)."""
    size = setup.config.input.image_size

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=setup.data_sharded)

    return dict(
        image=spec((batch_size, size, size, 3), jnp.uint8),
        label=spec((batch_size,), jnp.int32),
        mask=spec((batch_size,), jnp.float32),
    )


def on_mesh(mesh: jax.sharding.Mesh, fn):
    """``fn`` traced with ``mesh`` in context: layers that split work by hand find it
    there (the Pallas kernels run one batch shard per device, ``ops/pallas/shards.py``;
    XLA cannot partition them). Entered inside the trace, so the jitted step carries it
    wherever it is lowered."""

    @functools.wraps(fn)
    def traced_on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced_on_mesh


def device_platform(setup: Setup) -> str:
    """The platform name ``jax.lax.platform_dependent`` lowers the steps for: "cpu",
    "tpu", "cuda" or "rocm"."""
    device = setup.mesh.devices.flat[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def attention_plan(setup: Setup) -> list[str]:
    """Which local-attention implementation every attention layer runs on this run's
    devices, grouped by input shape: e.g. "56×56 k=7 auto → pallas: 3 layers"."""
    from sasa_flax import costs, ops
    from sasa_flax.layers import SelfAttention2D

    model = config_lib.abstract_model(setup.config)
    modules = {"/".join(map(str, path)): m for path, m in nnx.iter_graph(model)}
    size = setup.config.input.image_size
    layers: dict[str, int] = {}
    for cost in costs.trace(model, (1, size, size, 3))[0]:
        layer = modules.get(cost.name)
        if not isinstance(layer, SelfAttention2D):
            continue
        height, width = cost.in_shape[1:3]
        impl = layer.impl
        if impl == "auto":
            choice = ops.auto_choice(device_platform(setup), height, width, layer.kernel_size)
            impl = f"auto → {choice}"
        key = f"{height}×{width} k={layer.kernel_size} {impl}"
        layers[key] = layers.get(key, 0) + 1
    return [f"{key}: {n} layer{'s' * (n > 1)}" for key, n in layers.items()]


def log_attention_plan(setup: Setup) -> None:
    if jax.process_index() == 0 and (plan := attention_plan(setup)):
        log.info("attention on %s: %s", device_platform(setup), "; ".join(plan))


def compile_or_explain(step, *abstract_args):
    """``step`` lowered and compiled; a compiler failure inside a fused attention kernel
    ends the run in one line naming the way round it (``kernel_failures_explained``)."""
    with kernel_failures_explained():
        return step.lower(*abstract_args).compile()


@contextlib.contextmanager
def kernel_failures_explained():
    """Re-raises the Mosaic or Triton compiler refusing a Pallas kernel as the one-line
    ``kernel_failure``; any other error as it is."""
    try:
        yield
    except Exception as e:
        if (explained := kernel_failure(e)) is None:
            raise
        raise explained from e


def kernel_failure(error: Exception) -> TrainError | None:
    """A one-line ``TrainError`` naming another attention implementation, if ``error``
    is the Mosaic or Triton compiler refusing a Pallas kernel; else None."""
    text = str(error).strip()
    if not any(word in text for word in ("Mosaic", "Triton", "pallas", "Pallas")):
        return None
    return TrainError(
        f"the fused attention kernels (impl 'pallas') failed to compile on this device: "
        f"{text.splitlines()[0][:300]}. Run with --config.model.attention_impl=shifted (or "
        "=dense for small images) and please report it."
    )


def compile_steps(setup: Setup, abstract: TrainState):
    """(train_step, eval_step) jitted with explicit shardings; the state is donated.
    ``abstract`` is ``abstract_state(setup)``."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    train = jax.jit(
        on_mesh(setup.mesh, functools.partial(train_step, setup)),
        in_shardings=(state_shardings, setup.data_sharded),
        out_shardings=(state_shardings, setup.replicated),
        donate_argnums=(0,),
    )
    evaluate_fn = jax.jit(
        on_mesh(setup.mesh, functools.partial(eval_step, setup)),
        in_shardings=(setup.replicated, setup.replicated, setup.data_sharded),
        out_shardings=setup.replicated,
    )
    return train, evaluate_fn


def evaluate(setup: Setup, eval_fn, params: dict, model_state: dict) -> dict:
    """Top-1, top-5 (%) and loss over every example of the eval split, exactly once."""
    totals = None
    batches = input_pipeline.eval_batches(setup.dataset, setup.config.input)
    for local in batches:
        with kernel_failures_explained():  # compiled at the first batch
            sums = eval_fn(params, model_state, global_batch(setup, local))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    skipped = setup.dataset.eval.size - int(count)  # corrupt images, under 'skip'
    if skipped and jax.process_index() == 0:
        log.warning("evaluation skipped %d image(s) that could not be decoded", skipped)
    return dict(
        top1=100.0 * float(totals["top1"]) / max(count, 1.0),
        top5=100.0 * float(totals["top5"]) / max(count, 1.0),
        loss=float(totals["loss"]) / max(count, 1.0),
        num_examples=int(count),
        skipped_images=skipped,
    )


def eval_weights(state_or_item) -> tuple[dict, dict]:
    """(params to evaluate, model state): the EMA when the run keeps one."""
    item = state_or_item if isinstance(state_or_item, dict) else state_or_item.model_item()
    params = item["ema_params"] if item.get("ema_params") is not None else item["params"]
    return params, item["model_state"]


def log_weight_decay(setup: Setup, abstract: TrainState) -> None:
    """One line: how many parameters (and tensors) weight decay applies to."""
    mask = jax.tree.leaves(setup.decay_mask(abstract.params))
    sizes = [x.size for x in jax.tree.leaves(abstract.params)]
    decayed = sum(size for size, m in zip(sizes, mask, strict=True) if m)
    if jax.process_index() == 0:
        log.info(
            "weight decay %g on %d of %d parameter tensors (%s of %s parameters)",
            setup.config.train.weight_decay, sum(map(bool, mask)), len(sizes),
            f"{decayed:,}", f"{sum(sizes):,}",
        )  # fmt: skip


# --- the loop -----------------------------------------------------------------------


# TensorBoard events are queued in memory and written when this many are queued or this
# many seconds have passed, and at every explicit flush (a stop, the end). On gs:// a
# flush uploads the whole events file again, synchronously in the loop: TF's defaults
# (and clu, whose every write flushes) upload it at every log line.
EVENTS_MAX_QUEUE = 100_000
EVENTS_FLUSH_SECONDS = 120


class _QueuedSummaryWriter:
    """A ``tf.summary`` writer whose ``as_default()`` context does not flush when it exits
    (TF's does, and clu enters it for every write): events wait in the writer's queue."""

    def __init__(self, logdir: str):
        self._writer = tf.summary.create_file_writer(
            logdir, max_queue=EVENTS_MAX_QUEUE, flush_millis=EVENTS_FLUSH_SECONDS * 1000
        )

    @contextlib.contextmanager
    def as_default(self):
        self._writer.flush = lambda: None  # what the context's exit calls, for this exit only
        try:
            with self._writer.as_default():
                yield self._writer
        finally:
            del self._writer.flush

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class _EventsWriter(metric_writers.SummaryWriter):
    """clu's TensorBoard writer on a queued ``tf.summary`` writer (clu's ``__init__`` takes
    no queue settings, so it is not called: it would open a second events file)."""

    def __init__(self, logdir: str):
        metric_writers.MetricWriter.__init__(self)
        self._summary_writer = _QueuedSummaryWriter(logdir)


def _writer(workdir: str):
    """Log lines and TensorBoard events on process 0; nothing on the others. Synchronous:
    writing queues in memory, and a flush is at most every EVENTS_FLUSH_SECONDS."""
    if jax.process_index() == 0:
        return metric_writers.MultiWriter(
            [metric_writers.LoggingWriter(), _EventsWriter(os.fspath(workdir))]
        )
    return metric_writers.MultiWriter([])  # only process 0 writes logs


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# The fields that shape the learning-rate schedule or the data stream of a run: a resumed
# run must have the checkpoint's values (or config.train.allow_schedule_change=True).
SCHEDULE_FIELDS = (
    "train.num_epochs", "train.num_steps", "train.base_learning_rate", "train.warmup_epochs",
    "train.seed", "input.batch_size", "input.dataset", "input.data_dir",
    "input.tuning_split", "input.augment",
)  # fmt: skip


# The fields that change what an evaluation means: recorded at training time, and
# eval.py evaluates that setting unless told otherwise (--other_setting).
EVAL_FIELDS = (
    "input.dataset", "input.data_dir", "input.tuning_split", "input.image_size",
    "input.augment", "model.num_classes",
)  # fmt: skip


def _fields(config, names) -> dict:
    return {f: config[f.split(".")[0]].get(f.split(".")[1]) for f in names}


def _schedule_fields(config) -> dict:
    return _fields(config, SCHEDULE_FIELDS)


def _changes(saved: dict, now: dict) -> list[str]:
    return [f for f in saved if f in now and saved[f] != now[f]]


def _listing(saved: dict, now: dict, changed: list[str]) -> str:
    return ", ".join(f"config.{f} {saved[f]!r} -> {now[f]!r}" for f in changed)


def _meta(setup: Setup, step: int) -> dict:
    return dict(
        step=step,
        epoch=step / setup.steps_per_epoch,
        examples_seen=step * setup.config.input.batch_size,
        global_batch_size=setup.config.input.batch_size,
        dataset=setup.config.input.dataset,
        seed=setup.config.train.seed,
        total_steps=setup.total_steps,
        schedule=_schedule_fields(setup.config),
        eval_setting=_fields(setup.config, EVAL_FIELDS),
        processes=setup.dataset.process_count,
    )


def warn_if_data_order_changes(setup: Setup, meta: dict) -> None:
    """A checkpoint restores onto any mesh (orbax reshards it). Random-access splits keep
    their global order on any number of processes; a streamed (TFDS) split is read per
    process, so another process count continues with another, equally shuffled, order."""
    saved = meta.get("processes")
    if saved and saved != setup.dataset.process_count and setup.dataset.train.read is None:
        log.warning(
            "resuming a run of %d processes on %d: the TFDS training split is read per "
            "process, so it continues in another (equally shuffled) order",
            saved, setup.dataset.process_count,
        )  # fmt: skip


def check_schedule_unchanged(setup: Setup, meta: dict, workdir: str) -> None:
    """Refuses a resume whose schedule or data fields differ from the checkpoint's, naming
    each field with its old and new value, unless config.train.allow_schedule_change."""
    saved = dict(meta.get("schedule") or {"input.batch_size": meta.get("global_batch_size")})
    now = _schedule_fields(setup.config)
    changed = _changes(saved, now)
    if not changed:
        return
    listing = _listing(saved, now, changed)
    if setup.config.train.allow_schedule_change:
        log.warning("resuming with a changed schedule (%s): it continues from step %d of "
                    "the new one", listing, meta["step"])  # fmt: skip
        return
    raise TrainError(
        f"{workdir} was trained with a different schedule or data stream: {listing}. "
        "Resuming would silently change the run; use the original values, a new workdir, or "
        "--config.train.allow_schedule_change=True to continue from step "
        f"{meta['step']} with the new schedule (e.g. to extend a finished run)."
    )


def write_run_record(setup: Setup, workdir: str, command: dict, start_step: int = 0) -> None:
    """``run.json``: this start's config argument and overrides, the whole config, the
    model's size and the devices; and ``starts``, one entry per (re)start of the run
    (time, step it started from, its config argument, overrides, config and devices), so
    that a resume with other overrides stays visible. Written at every start, after the
    resume checks passed. ``report --results`` reads it."""
    from sasa_flax import flops  # the cost rules: only here, not on the training path

    try:
        params, total_flops = flops.count(setup.config)
    except Exception:  # noqa: BLE001 - a registered model without cost rules: no counts
        params = total_flops = None
    path = epath.Path(workdir) / RUN_RECORD
    config = json.loads(setup.config.to_json_best_effort())
    devices = dict(
        devices=setup.mesh.size,
        processes=jax.process_count(),
        device_kind=jax.devices()[0].device_kind,
    )
    try:
        starts = json.loads(path.read_text()).get("starts", []) if path.exists() else []
    except (ValueError, OSError):  # an unreadable record: the history starts again
        starts = []
    this_start = dict(time=time.time(), start_step=start_step, **command, config=config)
    starts.append(dict(this_start, **devices))
    record = dict(
        **command,
        config=config,
        params=params,
        flops=total_flops,
        **devices,
        total_steps=setup.total_steps,
        steps_per_epoch=setup.steps_per_epoch,
        starts=starts,
    )
    path.write_text(json.dumps(record, indent=1))


def write_eval_results(workdir: str, step: int, results: dict, setting: str = "") -> None:
    """``eval_results_step_{step}.json``, or ``..._{setting}.json`` for another setting."""
    if jax.process_index() != 0:
        return
    # epath: local paths and gs:// alike.
    path = epath.Path(workdir) / f"eval_results_step_{step}{setting and '_' + setting}.json"
    path.write_text(json.dumps(dict(step=step, **results), indent=2))


def ensure_writable(workdir: str) -> None:
    """Creates workdir if needed and proves it writable (local or gs://) before any work."""
    path = epath.Path(workdir)
    probe = path / f".sasa_write_test_{jax.process_index()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(
            f"--workdir {workdir} is not writable ({e.strerror or e}); pass a directory you "
            "can create files in (local path or gs://bucket/path)."
        ) from None


class _ProgressLog:
    """Averages the per-step metrics between log lines and reports where the time went:
    seconds per step, the share of it the loop waited for input ("data wait"; large means
    input-bound), images/s in total and per device. Reads the device only at log lines
    and when asked for the first non-finite step."""

    def __init__(self, setup: Setup, writer, start_step: int, prefetch: DevicePrefetch):
        self.setup, self.writer, self.prefetch = setup, writer, prefetch
        self.history = []  # (step, metrics on device) since the previous line
        self.lines = []  # (step, mean loss since the previous line)
        self._start, self._step, self._waited = time.perf_counter(), start_step, 0.0

    def add(self, done: int, metrics: dict) -> None:
        self.history.append((done, metrics))

    def due(self, done: int) -> bool:
        return done % self.setup.config.train.log_every_steps == 0

    def first_nonfinite(self) -> tuple[int, dict] | None:
        """(step, metrics) of the first non-finite step since the previous line, if any."""
        finite = jax.device_get([m["finite"] for _, m in self.history])
        bad = next((i for i, ok in enumerate(finite) if not ok), None)
        return None if bad is None else (self.history[bad][0], jax.device_get(self.history[bad][1]))

    def write(self, done: int) -> None:
        history = jax.device_get([m for _, m in self.history])
        self.history = []
        summary = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
        summary["skipped_images"] = float(sum(m["skipped_images"] for m in history))
        summary["nonfinite_steps"] = float(sum(not m["finite"] for m in history))
        del summary["finite"]
        self.lines.append((done, summary["loss"]))
        now, waited = time.perf_counter(), self.prefetch.waited
        elapsed, steps = now - self._start, done - self._step
        data_wait = (waited - self._waited) / elapsed if elapsed > 0 else float("nan")
        self._start, self._step, self._waited = now, done, waited
        batch, total = self.setup.config.input.batch_size, self.setup.total_steps
        eta = float("nan")
        if steps > 0 and elapsed > 0:
            summary["seconds_per_step"] = elapsed / steps
            summary["data_wait_fraction"] = data_wait
            summary["images_per_sec"] = steps * batch / elapsed
            summary["images_per_sec_per_device"] = summary["images_per_sec"] / self.setup.mesh.size
            eta = (total - done) * elapsed / steps
        self.writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
        if jax.process_index() != 0:
            return
        skipped = "".join(
            f" | {int(summary[k])} {k.replace('_', ' ')}"
            for k in ("skipped_images", "nonfinite_steps")
            if summary[k]
        )
        speed = "?"
        if "seconds_per_step" in summary:
            speed = (
                f"{summary['seconds_per_step']:.3g} s/step, {summary['images_per_sec']:.0f} img/s "
                f"({summary['images_per_sec_per_device']:.0f}/device), data wait "
                f"{100 * summary['data_wait_fraction']:.0f}%"
            )
        log.info(
            "step %d/%d (epoch %.1f/%.1f) loss %.4f top-1 %.1f%% lr %.4g | %s | ETA %s%s",
            done, total, done / self.setup.steps_per_epoch, total / self.setup.steps_per_epoch,
            summary["loss"], 100 * summary["top1"], summary["learning_rate"], speed,
            "?" if math.isnan(eta) else _format_duration(eta), skipped,
        )  # fmt: skip


def _nonfinite_error(mngr, bad: int, metrics: dict, done: int) -> TrainError:
    mngr.wait_until_finished()  # the last good checkpoint is complete; no later one is saved
    loss, grad_norm = (float(metrics[k]) for k in ("loss", "grad_norm"))
    unsaved = f"step {bad}" if bad == done else f"steps {bad}-{done}"
    return TrainError(
        f"step {bad}: non-finite training (loss {loss}, gradient norm {grad_norm}); stopped "
        f"without saving {unsaved}. The newest checkpoint is step {mngr.latest_step()}. "
        "Lower config.train.base_learning_rate or lengthen warm-up, or set "
        "config.train.on_nonfinite='skip' to skip such steps and count them."
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices=None,
    stop_after_step: int | None = None,
    command: dict | None = None,
) -> dict:
    """Trains (resuming from workdir's latest checkpoint), evaluates, returns the final
    eval metrics. It returns early, after a durable checkpoint, with ``stopped_by`` set
    on SIGTERM / SIGINT (see ``preemption``), or at ``stop_after_step``. ``command``:
    the config file argument and overrides (``cli.config_arguments``), for ``run.json``."""
    # 1-2. Config, devices, data, mesh; then the workdir (nothing is written before), held
    # by this run alone while it trains. Process 0 decides and every process hears the
    # verdict: a refusal ends all of them with the same line.
    setup = make_setup(config, devices=devices)
    lease = distributed.on_process_0("claim-workdir", lambda: _claim_workdir(workdir))
    with workdir_lock.keep(lease):
        distributed.everywhere("workdir-writable", lambda: ensure_writable(workdir))
        return _train_and_evaluate(setup, workdir, stop_after_step, command or {})


def _claim_workdir(workdir: str) -> workdir_lock.Lease:
    """Process 0's part of a start: refuses a workdir a live run holds, removes what a
    killed save left (it may be what fills the disk; never a live run's save in
    progress), proves the workdir writable, then takes its lock."""
    workdir_lock.check_free(workdir)
    checkpointing.remove_partial_checkpoints(workdir)
    ensure_writable(workdir)
    return workdir_lock.take(workdir)


def _train_and_evaluate(
    setup: Setup,
    workdir: str,
    stop_after_step: int | None,
    command: dict,
) -> dict:
    config = setup.config
    abstract = abstract_state(setup)  # traced once, used for jit, init and restore
    log_weight_decay(setup, abstract)
    log_attention_plan(setup)
    train_fn, eval_fn = compile_steps(setup, abstract)
    t = config.train
    mngr = checkpointing.manager(
        workdir, every_steps=t.checkpoint_every_steps, keep=t.keep_checkpoints
    )

    # 3. State: restored from the newest checkpoint that verifies (a damaged one is moved
    # aside, saying so), or born sharded.
    start_step, restored = checkpointing.newest_good(
        mngr, workdir, set_bad_aside=True,
        model=abstract.model_item(), train=abstract.train_item(),
    )  # fmt: skip
    damaged = checkpointing.damaged_steps(workdir)  # kept in place: replaced when re-saved
    if restored is not None:
        check_schedule_unchanged(setup, restored["meta"], workdir)
        warn_if_data_order_changes(setup, restored["meta"])
        state = TrainState(**restored["model"], **restored["train"])
        log.info("resumed from step %d of %s", start_step, workdir)
    else:
        state = init_state(setup, abstract)
    # Only now, with every check passed, is the start recorded.
    distributed.on_process_0(
        "run-record", lambda: write_run_record(setup, workdir, command, start_step)
    )
    writer = _writer(workdir)
    if start_step == 0 and jax.process_index() == 0:
        writer.write_hparams(
            {
                k: str(v)
                for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
            }
        )

    # 4. Loop. The train step is compiled first (timed once); batches are put on the
    # devices two steps ahead by a background thread; the loop reads from the devices
    # only at log lines, evaluations and saves, never once per step.
    batch_size = config.input.batch_size
    compile_start = time.perf_counter()
    train_fn = compile_or_explain(train_fn, abstract, abstract_batch(setup, batch_size))
    compile_seconds = time.perf_counter() - compile_start
    writer.write_scalars(start_step, {"train/compile_seconds": compile_seconds})
    if jax.process_index() == 0:
        log.info("compiled the train step in %s", _format_duration(compile_seconds))
    batches = input_pipeline.train_batches(
        setup.dataset, config.input, seed=t.seed, start_step=start_step
    )
    end_step = (
        setup.total_steps if stop_after_step is None else min(stop_after_step, setup.total_steps)
    )
    prefetch = DevicePrefetch(setup, batches)
    progress = _ProgressLog(setup, writer, start_step, prefetch)
    try:
        with preemption.stop_on_signals() as stop_request:
            for step in range(start_step, end_step):
                # The per-step path moves nothing between host and device implicitly: a
                # host read of a device value here would stall every step of a pod, so
                # it fails instead (explicit reads at log lines, evaluations and saves).
                with jax.transfer_guard("disallow"):
                    state, metrics = train_fn(state, next(prefetch))
                    done = step + 1
                    progress.add(done, metrics)
                stopping = stop_request.should_stop(done)
                force = done == end_step or stopping
                evaluating = bool(
                    t.eval_every_steps
                    and done % t.eval_every_steps == 0
                    and done != setup.total_steps
                )
                saving = force or mngr.should_save(done)
                writing = force or progress.due(done)
                # A non-finite step left the state as it was, on device; under 'stop' it
                # is looked for before anything is logged, evaluated or saved, so that it
                # is never checkpointed and the run stops naming it.
                if t.on_nonfinite == "stop" and (saving or writing or evaluating):
                    bad = progress.first_nonfinite()
                    if bad is not None:
                        raise _nonfinite_error(mngr, *bad, done)
                if writing:
                    progress.write(done)
                if evaluating:
                    results = evaluate(setup, eval_fn, *eval_weights(state))
                    writer.write_scalars(done, {f"eval/{k}": v for k, v in results.items()})
                checkpointing.save(
                    mngr, done, model=state.model_item(), train=state.train_item(),
                    meta=_meta(setup, done), force=force, damaged=damaged,
                )  # fmt: skip
                if stopping:
                    mngr.wait_until_finished()
                    writer.flush()
                    log.info(
                        "%s: stopped after step %d with its checkpoint written; run the same "
                        "command to resume.", stop_request.reason, done,
                    )  # fmt: skip
                    return dict(step=done, train_log=progress.lines, stopped_by=stop_request.reason)
    except Exception:
        # A fatal error mid-run (a corrupt image, a full disk): let the checkpoint being
        # written finish, or fail, before the error ends the program, so that orbax is not
        # shut down under it; the newest complete checkpoint stays the last good one.
        with contextlib.suppress(Exception):
            mngr.wait_until_finished()
        with contextlib.suppress(Exception):  # the events queued since the last flush
            writer.flush()
        raise
    finally:
        prefetch.close()

    # 5. Final evaluation (the loop's last step forced a checkpoint; let it land).
    final_step = int(jax.device_get(state.step))
    mngr.wait_until_finished()
    if stop_after_step is not None and final_step < setup.total_steps:
        writer.flush()
        return dict(step=final_step, train_log=progress.lines)
    results = evaluate(setup, eval_fn, *eval_weights(state))
    writer.write_scalars(final_step, {f"eval/{k}": v for k, v in results.items()})
    writer.flush()
    write_eval_results(workdir, final_step, results)
    if jax.process_index() == 0:
        log.info(
            "final evaluation at step %d: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d examples)",
            final_step, results["top1"], results["top5"], results["loss"], results["num_examples"],
        )  # fmt: skip
    return dict(step=final_step, train_log=progress.lines, **results)


def eval_setting_suffix(meta: dict, config, workdir: str, other_setting: bool) -> str:
    """ "" when ``config`` evaluates the setting the run was trained for (``meta``'s);
    otherwise refuses, or with ``other_setting`` names the setting for its results file."""
    saved = meta.get("eval_setting") or {}
    now = _fields(config, EVAL_FIELDS)
    changed = _changes(saved, now)
    if not changed:
        return ""
    listing = _listing(saved, now, changed)
    if not other_setting:
        raise TrainError(
            f"{workdir} was trained for another evaluation setting: {listing}. Pass the run's "
            "own settings, or --other_setting to evaluate this one on purpose (its results "
            "go to a file named for it; the run's own results file is kept)."
        )
    return "-".join(f"{f.split('.')[1]}={str(now[f]).replace('/', '_')}" for f in changed)


def restore_model_item(setup: Setup, abstract: TrainState, workdir: str, step: int | None):
    """(step, restored items: "model" and "meta") of a checkpoint, verified: the newest
    that verifies, or ``step`` (refused naming the newest good one if it does not)."""
    mngr = checkpointing.manager(workdir, read_only=True)
    requested = checkpointing.step_to_restore(mngr, workdir, step)
    if step is None:  # the newest checkpoint that verifies
        return checkpointing.newest_good(
            mngr, workdir, set_bad_aside=False, model=abstract.model_item()
        )
    checkpointing.check_architecture(mngr, requested, abstract.model_item(), "this config")
    try:
        return requested, checkpointing.restore_verified(
            mngr, requested, model=abstract.model_item()
        )
    except checkpointing.CheckpointError as e:
        good, _ = checkpointing.newest_good(
            mngr, workdir, set_bad_aside=False, model=abstract.model_item()
        )
        raise checkpointing.CheckpointError(
            f"{e}; not evaluating it. The newest checkpoint that verifies is step {good}."
        ) from None


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    devices=None,
    other_setting: bool = False,
) -> dict:
    """Restores a checkpoint's model item (no optimizer state) and evaluates it, in the
    evaluation setting the run was trained for unless ``other_setting`` (see
    ``EVAL_FIELDS``; checked before anything is compiled)."""
    setup = make_setup(config, devices=devices)
    abstract = abstract_state(setup)
    step, restored = restore_model_item(setup, abstract, workdir, step)
    setting = eval_setting_suffix(restored["meta"], config, workdir, other_setting)
    _, eval_fn = compile_steps(setup, abstract)
    results = evaluate(setup, eval_fn, *eval_weights(restored["model"]))
    write_eval_results(workdir, step, results, setting)
    if jax.process_index() == 0:
        writer = metric_writers.create_default_writer(
            f"{workdir.rstrip('/')}/eval", asynchronous=False
        )
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        writer.flush()
    return dict(step=step, setting=setting or "the run's own", **results)
