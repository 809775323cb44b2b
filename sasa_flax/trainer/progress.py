"""What the loop reports: the log line every ``log_every_steps`` (loss, speed, input-bound
share, ETA) and the TensorBoard events, queued so that gs:// is not written every line."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING

# isort: off
import sasa_flax.quiet_tensorflow  # noqa: F401 - first: before clu imports TensorFlow (this
# module is the trainer's only user of clu)

# isort: on
import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

if TYPE_CHECKING:
    from sasa_flax.trainer.setup import Setup

log = logging.getLogger(__name__)  # the program sets up where it goes: sasa_flax.logs


# TensorBoard events are queued in memory and written when this many are queued or this
# many seconds have passed, and at every explicit flush (a stop, the end). On gs:// a
# flush uploads the whole events file again, synchronously in the loop: TF's defaults
# (and clu, whose every write flushes) upload it at every log line.
EVENTS_MAX_QUEUE = 100_000
EVENTS_FLUSH_SECONDS = 120


def log_model_description(setup: Setup) -> None:
    """Logs the model's ``describe`` hook (``models.registry``) for the run's platform,
    where the model has one: for ResNet, which implementation each attention layer runs."""
    describe = getattr(setup.abstract_model, "describe", None)
    if describe is None or jax.process_index() != 0:
        return
    for line in describe(setup.platform, setup.config.input.image_size):
        log.info("%s", line)


class QueuedSummaryWriter:
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


class EventsWriter(metric_writers.SummaryWriter):
    """clu's TensorBoard writer on a queued ``tf.summary`` writer (clu's ``__init__`` takes
    no queue settings, so it is not called: it would open a second events file)."""

    def __init__(self, logdir: str):
        metric_writers.MetricWriter.__init__(self)
        self._summary_writer = QueuedSummaryWriter(logdir)


def metric_writer(workdir: str):
    """Log lines and TensorBoard events on process 0; nothing on the others. Synchronous:
    writing queues in memory, and a flush is at most every EVENTS_FLUSH_SECONDS."""
    if jax.process_index() == 0:
        return metric_writers.MultiWriter(
            [metric_writers.LoggingWriter(), EventsWriter(os.fspath(workdir))]
        )
    return metric_writers.MultiWriter([])  # only process 0 writes logs


def write_eval_events(logdir: str, step: int, results: dict) -> None:
    """``eval.py``'s results as ``eval/<name>`` TensorBoard scalars in ``logdir``, written
    and flushed at once (clu's default writer: one evaluation, nothing to queue)."""
    writer = metric_writers.create_default_writer(logdir, asynchronous=False)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    writer.flush()


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressLog:
    """Averages the per-step metrics between log lines and reports where the time went:
    seconds per step, the share of it the loop waited for input ("data wait"; large means
    input-bound), images/s in total and per device. Reads the device only at log lines
    and when asked for the first non-finite step."""

    def __init__(self, setup: Setup, writer, start_step: int, prefetch):
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
            done,
            total,
            done / self.setup.steps_per_epoch,
            total / self.setup.steps_per_epoch,
            summary["loss"],
            100 * summary["top1"],
            summary["learning_rate"],
            speed,
            "?" if math.isnan(eta) else format_duration(eta),
            skipped,
        )
