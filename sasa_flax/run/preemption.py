"""Stopping cleanly when the scheduler says so.

Cloud TPU, spot GPU machines and most batch schedulers preempt with SIGTERM and allow a
grace period; people press Ctrl-C (SIGINT); closing the terminal or ssh session a run was
started from sends SIGHUP (start long runs under nohup or tmux). Any of them asks the
trainer to finish the step it is on, write a checkpoint, wait until it is durable and
exit 0, so that the same command resumes. A second SIGINT means "now": it raises
``KeyboardInterrupt`` at once (the newest complete checkpoint stays the one to resume
from; orbax never lists a half-written one).

Several processes must agree on the step they stop after, or they would deadlock in the
next collective or save different steps. The agreement is JAX's own preemption service
(``multihost_utils.reached_preemption_sync_point``), which ``jax.distributed.initialize``
starts and which listens for SIGTERM itself: every process stops after the same step, one
past the largest step any process had reached when the notice arrived. A SIGINT on one
process (or a SIGHUP) of a multi-process run is therefore passed on to that service as a
SIGTERM.

The loop keeps at most two steps in flight on the devices (``trainer.loop``), so a request is
acted on within two steps after the one the devices are running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

# What each signal asks, as said on stderr when it arrives (SIGTERM: the scheduler's own).
SAID = {
    signal.SIGINT: "SIGINT: stopping after this step with a checkpoint; press Ctrl-C again to "
    "stop at once.\n",
    signal.SIGHUP: "SIGHUP (the terminal or ssh session closed): stopping after this step "
    "with a checkpoint; start long runs under nohup or tmux (docs/training.md).\n",
}


class StopRequest:
    """Records SIGTERM / SIGINT / SIGHUP; ``should_stop(step)`` says when to save and leave."""

    def __init__(self):
        self.signal_name: str | None = None
        self._multi_process = jax.process_count() > 1

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, no checkpoint
        self.signal_name = self.signal_name or name
        if signum in SAID:
            with contextlib.suppress(OSError):  # stderr may be the closed terminal
                sys.stderr.write(SAID[signum])
        if self._multi_process and signum != signal.SIGTERM:
            # Hand the request to JAX's preemption service, which owns SIGTERM here.
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested (on any process), at the same step everywhere.
        Call it after every step, on every process."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        return self.signal_name or "SIGTERM on another process"


@contextlib.contextmanager
def stop_on_signals():
    """Installs the handlers for the duration of a run (main thread only: elsewhere, e.g.
    in tests calling ``train_and_evaluate`` from a thread, signals keep their defaults)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # With several processes, JAX's preemption service has its own SIGTERM handler.
    signals = [signal.SIGINT, signal.SIGHUP] + ([] if request._multi_process else [signal.SIGTERM])
    previous = {s: signal.signal(s, request._on_signal) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
