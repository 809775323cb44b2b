"""The steps' math and their jit: one SGD step on a global batch, one evaluation step,
with explicit shardings (the state donated). How they are compiled for the devices and
checked against their memory is ``compile.py``'s.

BatchNorm statistics are over the global batch: under ``jax.jit`` with the batch sharded,
the mean over the batch axis is a global reduction. No pmap, no pjit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sasa_flax import data
from sasa_flax.trainer.setup import MODEL_STATE, Setup, TrainState, merged_model


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
    after another (``compile.compile_eval_step``): the same sums, a fraction of the activations."""
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


def jit_train_step(setup: Setup, abstract: TrainState):
    """``train_step`` jitted with explicit shardings, the state donated. ``abstract`` is
    ``abstract_state(setup)``. Compiled for the device by ``compile.compile_train_step``."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(
        functools.partial(train_step, setup),
        in_shardings=(state_shardings, setup.data_sharded),
        out_shardings=(state_shardings, setup.replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(setup: Setup, chunks: int = 1):
    """``eval_step`` in ``chunks`` jitted with explicit shardings (params, model state,
    batch) -> replicated sums. Fitted to the device by ``compile.compile_eval_step``."""
    return jax.jit(
        functools.partial(eval_step, setup, chunks=chunks),
        in_shardings=(setup.replicated, setup.replicated, setup.data_sharded),
        out_shardings=setup.replicated,
    )
