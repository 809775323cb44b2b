"""What is static about a run and its state: the ``Setup`` derived from the config and the
devices, the optimizer and schedule, the mesh, and the ``TrainState`` born on it.

The trainer assumes nothing about the model beyond ``(B, H, W, 3) images -> (B, classes)
logits``: its state is split with filters over the whole ``nnx.state`` into parameters
(``nnx.Param``), RNG streams (``nnx.RngState``: reseeded every step from (seed, step), so
Dropout and stochastic depth resume bit-exactly; not checkpointed) and everything else
(``model_state``: BatchNorm statistics if any, any other ``nnx.Variable``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import config_lib, data
from sasa_flax.errors import TrainError

log = logging.getLogger(__name__)

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
    dataset: data.Dataset
    # The config's model, abstract (shapes only) in the compute dtype and in eval mode:
    # built once by ``config_lib.validate``; what counts, plans and checks the model read.
    abstract_model: nnx.Module
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

    @property
    def platform(self) -> str:
        """The platform ``jax.lax.platform_dependent`` lowers the steps for: "cpu", "tpu",
        "cuda" or "rocm"."""
        device = self.mesh.devices.flat[0]
        if device.platform != "gpu":
            return device.platform
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32
    return jnp.dtype(name)


def _counted(count: int, noun: str, plural: str = "") -> str:
    """``"1 device"``, ``"8 devices"``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def check_batch_sizes(config, num_devices: int, process_count: int) -> None:
    n = config.train.accumulation_steps
    if n > 1 and config.input.batch_size % (num_devices * n):
        per_device = config.input.batch_size // num_devices
        fits = [c for c in range(1, per_device + 1) if per_device % c == 0]
        devices = _counted(num_devices, "device")
        raise TrainError(
            f"config.train.accumulation_steps={n}: config.input.batch_size="
            f"{config.input.batch_size} on {devices} is not a whole number of "
            f"micro-batches; every device must split its images into {n} equal parts. "
            f"Use a batch that is a multiple of {num_devices * n}, or accumulation_steps "
            f"dividing {per_device}, e.g. {max(c for c in fits if c <= n)}."
        )
    for field in ("batch_size", "eval_batch_size"):
        value = config.input[field]
        if value % num_devices or value % process_count:
            devices = _counted(num_devices, "device")
            processes = _counted(process_count, "process", "processes")
            raise TrainError(
                f"config.input.{field}={value} is not divisible by the {devices} "
                f"({processes}); use a multiple of {num_devices}, e.g. "
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


def _open(config, devices, process_index, process_count):
    """The config checked against the devices, and its dataset opened (no split built)."""
    abstract = config_lib.validate(config, dtype=compute_dtype(config.train.compute_dtype))
    devices = list(devices or jax.devices())
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    check_batch_sizes(config, len(devices), process_count)
    dataset = data.load(config.input, process_index=process_index, process_count=process_count)
    if dataset.num_classes != config.model.num_classes:
        raise TrainError(
            f"config.model.num_classes={config.model.num_classes} but {config.input.dataset} has "
            f"{dataset.num_classes} classes; set --config.model.num_classes={dataset.num_classes}."
        )
    return abstract, devices, dataset


def make_setup(config, *, devices=None, process_index=None, process_count=None) -> Setup:
    """Everything static about a training run. Both splits are built here, so that a
    missing or empty evaluation split fails before training, not after it."""
    abstract, devices, dataset = _open(config, devices, process_index, process_count)
    steps_per_epoch = data.steps_per_epoch(dataset, config.input.batch_size)
    dataset.eval  # noqa: B018 - built (and checked) now
    total_steps = config.train.num_steps or int(
        math.ceil(config.train.num_epochs * steps_per_epoch)
    )
    return model_setup(
        config,
        devices,
        dataset=dataset,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        abstract=abstract,
    )


def make_eval_setup(config, *, devices=None, process_index=None, process_count=None) -> Setup:
    """``make_setup`` for evaluating a checkpoint: the training split is never built (on
    ImageNet as folders, listing it alone takes minutes), so the schedule is a
    placeholder of one step; the optimizer state is never restored or used."""
    abstract, devices, dataset = _open(config, devices, process_index, process_count)
    return model_setup(
        config, devices, dataset=dataset, steps_per_epoch=1, total_steps=1, abstract=abstract
    )


def model_setup(
    config, devices, *, dataset, steps_per_epoch: int, total_steps: int, abstract=None
) -> Setup:
    """The model, optimizer and mesh half of ``make_setup``, for a dataset already opened
    (or none: benchmarks feed their own batches). ``abstract``: the config's abstract
    model in the compute dtype, if already built."""
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    if abstract is None:
        abstract = config_lib.build_model(config, dtype=compute_dtype(config.train.compute_dtype))
    abstract.train()
    train_graphdef = nnx.graphdef(abstract)
    abstract.eval()
    eval_graphdef = nnx.graphdef(abstract)
    decay_mask = getattr(abstract, "decay_mask", default_decay_mask)
    return Setup(
        config=config,
        mesh=data_mesh(devices),
        dataset=dataset,
        abstract_model=abstract,
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
    model = config_lib.build_model(  # make_setup validated the config
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


def merged_model(setup: Setup, graphdef, params, model_state, step) -> nnx.Module:
    """The model with these variables and its RNG streams seeded from (seed, step): the
    same keys whether or not the run was resumed in between."""
    rngs = jax.tree.map(_placeholder, setup.rng_template)
    model = nnx.merge(graphdef, params, rngs, model_state, copy=True)
    streams = {m.tag for _, m in nnx.iter_graph(model) if isinstance(m, nnx.RngStream)}
    if streams:
        key = jax.random.fold_in(jax.random.key(setup.config.train.seed), step)
        nnx.reseed(
            model, **{name: jax.random.fold_in(key, i) for i, name in enumerate(sorted(streams))}
        )
    return model


def _placeholder(x):
    """A value of ``x``'s shape and dtype (typed PRNG keys included), overwritten by reseed."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)


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
            setup.config.train.weight_decay,
            sum(map(bool, mask)),
            len(sizes),
            f"{decayed:,}",
            f"{sum(sizes):,}",
        )
