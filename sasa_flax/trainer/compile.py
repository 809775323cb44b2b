"""The steps compiled for the run's devices, before any runs: a compiler failure inside a
fused attention kernel ends in one line (``ops.pallas.failures``); a train step over the
device's memory ends in one line naming the accumulation that would fit; an eval step
over it is evaluated in chunks. Train and eval step read a compiler's refusal alike
(``_compiled_or_refused``); the memory rule is ``memory.py``'s."""

from __future__ import annotations

import contextlib
import logging
import re

import jax

from sasa_flax.errors import ImplementationError, TrainError
from sasa_flax.ops.pallas.failures import kernel_failures_explained
from sasa_flax.trainer import memory
from sasa_flax.trainer.memory import GIB
from sasa_flax.trainer.setup import Setup, TrainState
from sasa_flax.trainer.steps import abstract_batch, jit_eval_step, jit_train_step

log = logging.getLogger(__name__)


def compile_or_explain(step, *abstract_args):
    """``step`` lowered and compiled; a compiler failure inside a fused attention kernel
    ends the run in one line naming the way round it (``kernel_failures_in_config_terms``)."""
    with kernel_failures_in_config_terms():
        return step.lower(*abstract_args).compile()


@contextlib.contextmanager
def kernel_failures_in_config_terms():
    """``ops.pallas.failures.kernel_failures_explained``, and any ``ImplementationError``
    (no tile fits, a mesh the kernels cannot split over), as a ``TrainError`` in the
    config's words: the library's ``impl='shifted'`` is the trainer's
    ``--config.model.attention_impl=shifted``."""
    try:
        with kernel_failures_explained():
            yield
    except ImplementationError as e:
        message = re.sub(r"\bimpl='(\w+)'", r"--config.model.attention_impl=\1", str(e))
        raise TrainError(f"{message} (--verbose shows the whole error)") from e


def compile_train_step(
    setup: Setup, abstract: TrainState, memory_bytes: int | None = None, compile_fn=None
):
    """The train step (``jit_train_step``) compiled for the config's global batch and
    checked, before any step runs, against the memory of the device (``memory_bytes`` per
    device; by default the device's own where it reports it: TPU and GPU, not the CPU).
    A step that cannot fit ends in one line naming the accumulation that would.
    ``compile_fn(step, *args)``: how to compile (default ``compile_or_explain``)."""
    compile_fn = compile_fn or compile_or_explain
    step, batch = (
        jit_train_step(setup, abstract),
        abstract_batch(setup, setup.config.input.batch_size),
    )
    if memory_bytes is None:
        memory_bytes = memory.device_memory(setup.mesh)
    if not memory_bytes:  # the CPU: no memory to check against
        return compile_fn(step, abstract, batch)
    fixed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))  # replicated
    compiled, peak, temp = _compiled_or_refused(
        compile_fn, step, abstract, batch, fixed_bytes=fixed
    )
    if compiled is None or peak > memory.budget(memory_bytes):
        raise _train_step_too_large(setup, memory_bytes, peak, temp)
    return compiled


def compile_eval_step(
    setup: Setup, abstract: TrainState, memory_bytes: int | None = None, compile_fn=None
):
    """(eval step compiled for the config's eval batch, chunks): the whole per-device
    batch at once if its compiled program fits the device's memory, else in the fewest
    chunks that do (``steps.eval_step``), said in the log. ``memory_bytes``: per device
    (by default the device's own, where it reports one; the CPU does not, and gets the
    lazily compiled step in one chunk). ``compile_fn`` as for ``compile_train_step``."""
    if memory_bytes is None:
        memory_bytes = memory.device_memory(setup.mesh)
        if not memory_bytes:
            return jit_eval_step(setup), 1
    per_device = setup.config.input.eval_batch_size // setup.mesh.size
    batch = abstract_batch(setup, setup.config.input.eval_batch_size)
    budget = memory.budget(memory_bytes)
    chunks, first = 1, None
    while True:
        compiled, peak, _ = _compiled_or_refused(
            compile_fn or compile_or_explain,
            jit_eval_step(setup, chunks),
            abstract.params,
            abstract.model_state,
            batch,
        )
        first = first or peak
        if compiled is not None and peak <= budget:
            break
        larger = [c for c in range(chunks + 1, per_device + 1) if per_device % c == 0]
        if not larger:
            needs = f" ({peak / GIB:.1f} GiB)" if peak else ""
            raise TrainError(
                f"the eval step does not fit this device's {memory_bytes / GIB:.1f} GiB even "
                f"one image at a time{needs}: set --config.input.eval_batch_size smaller, or "
                "use a device with more memory."
            )
        # The activations scale with the images per chunk: the next try from that estimate
        # (twice the chunks where the compiler refused without saying how much it needs).
        wanted = chunks * peak / budget if peak else 2 * chunks
        chunks = next((c for c in larger if c >= wanted), larger[-1])
    if chunks > 1 and jax.process_index() == 0:
        log.info(
            "evaluation: %d images per device need %s, over %.0f%% of the device's %.1f GiB: "
            "evaluated in %d chunks of %d (%.1f GiB)",
            per_device,
            f"{first / GIB:.1f} GiB" if first else "more than that",
            100 * memory.HEADROOM,
            memory_bytes / GIB,
            chunks,
            per_device // chunks,
            peak / GIB,
        )
    return compiled, chunks


def _compiled_or_refused(compile_fn, step, *args, fixed_bytes: int = 0):
    """(compiled, peak bytes, temporaries) of ``step`` compiled by ``compile_fn``. XLA:TPU
    refuses a program over the chip's memory outright (RESOURCE_EXHAUSTED): then
    (None, ``fixed_bytes`` + the temporaries it says it needs, those temporaries), where
    ``fixed_bytes`` is the rest (state, batch, outputs); (None, None, None) where the
    refusal does not say."""
    try:
        compiled = compile_fn(step, *args)
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        required = memory.required_bytes(str(e))
        return None, (None if required is None else fixed_bytes + required), required
    analysis = compiled.memory_analysis()
    return compiled, memory.peak_bytes(analysis), analysis.temp_size_in_bytes


def _train_step_too_large(setup: Setup, memory_bytes: int, peak, temp) -> TrainError:
    """The line for a train step over the device's memory: the accumulation_steps whose
    micro-batch would fit (``memory.images_that_fit``), where the compiler said how much
    the step needs; more accumulation where it refused without saying."""
    batch_size, n = setup.config.input.batch_size, setup.config.train.accumulation_steps
    per_device = batch_size // setup.mesh.size
    at_once = per_device // n
    device = f"{memory.HEADROOM:.0%} of the device's {memory_bytes / GIB:.1f} GiB"
    if peak is None:
        return TrainError(
            f"the compiler refused the train step ({at_once} images per device at once) as "
            f"over this device's memory, without saying how much it needs: set "
            f"--config.train.accumulation_steps larger than {n}, or a smaller "
            "--config.input.batch_size."
        )
    said = (
        f"the train step needs {peak / GIB:.1f} GiB per device ({at_once} images per device "
        f"at once), over {device}"
    )
    fixed = peak - temp
    most = memory.images_that_fit(fixed, temp / at_once, memory_bytes)
    fitting = [m for m in range(1, min(most, per_device) + 1) if per_device % m == 0]
    if not fitting:
        return TrainError(
            f"{said}; even one image per device would not fit (the state and the rest take "
            f"{fixed / GIB:.1f} GiB): use devices with more memory, or a smaller model "
            "or image size."
        )
    m = max(fitting)
    return TrainError(
        f"{said}: set --config.train.accumulation_steps={per_device // m} ({m} images per "
        f"device at once, estimated to fit; the same {batch_size} images per optimizer step), "
        "or a smaller --config.input.batch_size."
    )
