"""A ``jax.profiler`` trace of chosen training steps, on demand (config.train.profile_steps).

The trace goes to ``<workdir>/profile`` (``tensorboard --logdir <workdir>``'s profile tab,
the ``xprof`` plugin of requirements.txt, reads it); on gs:// it is written locally first
and copied when the trace stops, since the profiler writes through the local file
system. Every process traces its own host (the files are named by host). Off (0 steps)
costs nothing: no call into the profiler is made.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

import jax
from etils import epath

from sasa_flax.run import Workdir

log = logging.getLogger(__name__)


class StepProfile:
    """Traces steps ``start + 1`` … ``start + steps`` (config.train.profile_start_step and
    profile_steps; the first steps of a run are compile and warm-up)."""

    def __init__(self, train_config, workdir: Workdir):
        self.steps, self.start = train_config.profile_steps, train_config.profile_start_step
        self.target = str(workdir.profile)
        self._on_object_store = workdir.on_object_store
        self._local: str | None = None

    def before(self, step: int) -> None:
        """Called before step ``step + 1`` is dispatched."""
        if self.steps and step == self.start and self._local is None:
            local = self.target
            if self._on_object_store:
                local = tempfile.mkdtemp(prefix="sasa_profile_")
            self._local = local
            jax.profiler.start_trace(local)

    def after(self, done: int, outputs) -> None:
        """Called after step ``done`` was dispatched, with its outputs."""
        if self._local is not None and done >= self.start + self.steps:
            jax.block_until_ready(outputs)  # the traced steps' device work, all of it
            self.stop()

    def stop(self) -> None:
        if self._local is None:
            return
        jax.profiler.stop_trace()
        local, self._local = self._local, None
        if local != self.target:  # copied to the object store, then removed here
            for folder, _, names in os.walk(local):
                for name in names:
                    source = os.path.join(folder, name)
                    destination = epath.Path(self.target) / os.path.relpath(source, local)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(pathlib.Path(source).read_bytes())
            shutil.rmtree(local, ignore_errors=True)
        if jax.process_index() == 0:
            log.info(
                "profiled steps %d-%d into %s: tensorboard --logdir %s (profile tab)",
                self.start + 1,
                self.start + self.steps,
                self.target,
                os.path.dirname(self.target.rstrip("/")),
            )
