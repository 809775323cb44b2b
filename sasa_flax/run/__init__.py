"""A training run's infrastructure, below the trainer (nothing here imports it): its place
on disk, owned by one object, ``Workdir`` (every path, local or gs://), with its lock and
its checkpoints; how a run stops on a signal; how its hosts agree. What the files mean
for a resume is ``sasa_flax.trainer.resume``'s.

  workdir.py      ``Workdir``: paths, the object-store rule, run record, results files
  lock.py         one live trainer per workdir (a compare-and-swap lease)
  checkpoints.py  orbax: what a checkpoint holds, restore and verify it
  saves.py        the loop's asynchronous saves, a failed one stopping the run
  restoring.py    which step to restore; damaged ones set aside, partial saves removed
  preemption.py   SIGTERM / SIGINT / SIGHUP as a stop request, acted on at a step's end
  distributed.py  process 0 decides, every process hears the verdict
"""

from sasa_flax.run.checkpoints import ArchitectureMismatch, CheckpointError
from sasa_flax.run.lock import WorkdirLocked
from sasa_flax.run.workdir import Workdir, WorkdirError

__all__ = ["ArchitectureMismatch", "CheckpointError", "Workdir", "WorkdirError", "WorkdirLocked"]
