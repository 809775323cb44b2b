"""``Workdir``: the one owner of a run's place, local or on an object store.

    workdir/
      run.json                        the run record: config, size, devices, every (re)start
      train.lock                      the live trainer's lease (``run.lock``)
      checkpoints/<step>/             model, train, meta items (``run.checkpoints``)
      damaged_checkpoints/            checkpoints set aside, or recorded damaged (gs://)
      eval_results_step_<N>[_<setting>].json   final / eval.py results
      events.out.tfevents.*           TensorBoard: train/*, eval/* scalars
      eval/                           eval.py's TensorBoard events
      profile/                        jax.profiler traces (config.train.profile_steps)

Every path is joined here, and here alone is decided whether the workdir is on an object
store (gs://: no atomic rename, see ``run.checkpoints``). What the files *say* (which
config fields a resume must keep, what a run record holds) is the trainer's
(``trainer.resume``); this module reads and writes them. Local paths and gs:// alike:
every path it gives is an ``etils.epath.Path``.

One rule for every writer here: it writes, whoever calls it; a multi-host program calls
it on process 0 alone (``run.distributed.on_process_0``: the others hear the outcome).
Functions of ``sasa_flax.run`` take a ``Workdir``; the entry points (``train.py``,
``eval.py``, ``trainer.train_and_evaluate``, ``trainer.restore``, the tools) make one from
the path they are given, once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
from etils import epath

from sasa_flax.errors import UserError
from sasa_flax.paths import local_path_made_absolute


class WorkdirError(UserError):
    """The workdir cannot be used as given (a file, not writable); the message says what
    to pass instead."""


_EVAL_RESULTS = re.compile(r"^eval_results_step_(\d+)\.json$")  # the run's own setting only


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A run's workdir: ``root`` a local path or a URL such as ``gs://bucket/run``
    (``memory://`` in tests).

    A local path is made absolute here, ``~`` expanded, once, whatever the caller passed:
    orbax refuses relative paths (every save would fail in the background), and the same
    folder typed two ways (``runs/x``, ``./runs/x``, ``~/runs/x`` after ``=`` where the
    shell expands nothing) must be the same run."""

    root: str

    def __post_init__(self):
        root = str(self.root)
        # file:// is a local path: kept as one, so that every path of it is an epath.Path.
        root = root[len("file://") :] if root.startswith("file://") else root
        object.__setattr__(self, "root", local_path_made_absolute(root))

    RUN_RECORD = "run.json"
    LOCK = "train.lock"
    CHECKPOINTS = "checkpoints"
    DAMAGED = "damaged_checkpoints"
    EVAL_EVENTS = "eval"
    PROFILE = "profile"

    @classmethod
    def of(cls, workdir: str | os.PathLike | Workdir) -> Workdir:
        """``workdir`` itself, or the Workdir of a path or URL."""
        return workdir if isinstance(workdir, Workdir) else cls(str(workdir))

    def __str__(self) -> str:
        return self.root

    # -- paths --------------------------------------------------------------------------
    def join(self, name: str) -> str:
        """``root/name``, for local paths and URLs alike."""
        return f"{self.root.rstrip('/')}/{name}"

    def path(self, name: str = "") -> epath.Path:
        return epath.Path(self.join(name) if name else self.root)

    @property
    def on_object_store(self) -> bool:
        """gs:// and other URLs (file:// is made a local path): no atomic rename, so
        checkpoints are committed in place and damaged ones recorded rather than moved."""
        return "://" in self.root

    @property
    def kvstore_url(self) -> str:
        """tensorstore's URL of the workdir (the lock's compare-and-swap store)."""
        if "://" in self.root:
            return self.root.rstrip("/") + "/"
        return f"file://{os.path.abspath(self.root)}/"

    @property
    def checkpoints(self) -> epath.Path:
        return self.path(self.CHECKPOINTS)

    @property
    def damaged(self) -> epath.Path:
        return self.path(self.DAMAGED)

    @property
    def eval_events(self) -> epath.Path:
        return self.path(self.EVAL_EVENTS)

    @property
    def profile(self) -> epath.Path:
        return self.path(self.PROFILE)

    @property
    def lock(self) -> epath.Path:
        return self.path(self.LOCK)

    def event_files(self) -> list[epath.Path]:
        """The run's TensorBoard event files (train/* and eval/* scalars), sorted."""
        return sorted(self.path().glob("events.out.tfevents.*"))

    @staticmethod
    def eval_results_file(step: int, setting: str = "") -> str:
        """``eval_results_step_{step}.json``, or ``..._{setting}.json`` for another setting."""
        return f"eval_results_step_{step}{setting and '_' + setting}.json"

    # -- state on disk ------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path().exists()

    def is_dir(self) -> bool:
        return self.path().is_dir()

    def check_not_a_file(self) -> None:
        """Refuses a local workdir that is a file (a path typed one level too deep, an
        archive), before anything reads or writes under it."""
        if not self.on_object_store and os.path.isfile(self.root):
            raise WorkdirError(
                f"--workdir {self.root} is a file, not a directory; pass a directory (a new "
                "one for a new run, the run's own to resume or evaluate)."
            )

    def _probe(self) -> None:
        probe = self.path(f".sasa_write_test_{jax.process_index()}")
        probe.write_text("ok")
        probe.unlink()

    def writable(self) -> bool:
        """Whether files can be written in the existing workdir (creates nothing else)."""
        try:
            self._probe()
        except OSError:
            return False
        return True

    def ensure_writable(self) -> None:
        """Creates the workdir if needed and proves it writable, before any work."""
        try:
            self.path().mkdir(parents=True, exist_ok=True)
            self._probe()
        except OSError as e:
            raise WorkdirError(
                f"--workdir {self.root} is not writable ({e.strerror or e}); pass a directory "
                "you can create files in (local path or gs://bucket/path)."
            ) from None

    def checkpoint_steps(self) -> list[int]:
        """Steps under ``checkpoints/`` (as listed, committed or not: how far a run got)."""
        root = self.path(self.CHECKPOINTS)
        return [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []

    def run_record(self) -> dict:
        """``run.json``, or {} before the first start."""
        record = self.path(self.RUN_RECORD)
        return json.loads(record.read_text()) if record.exists() else {}

    def write_run_record(self, record: dict) -> None:
        self.path(self.RUN_RECORD).write_text(json.dumps(record, indent=1))

    def eval_results(self) -> dict[int, dict]:
        """{step: results} of the run's own evaluation setting."""
        found = {}
        for f in self.path().iterdir():
            if match := _EVAL_RESULTS.match(f.name):
                found[int(match.group(1))] = json.loads(f.read_text())
        return found

    def write_eval_results(self, step: int, results: dict, setting: str = "") -> None:
        """``eval_results_step_{step}.json`` (``..._{setting}.json`` for another setting)."""
        target = self.path(self.eval_results_file(step, setting))
        target.write_text(json.dumps(dict(step=step, **results), indent=2))
