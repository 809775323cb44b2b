"""One training run per workdir: a lease in ``workdir/train.lock`` held by the run's process 0.

The lock file holds JSON naming its holder: host, pid, start time, a random token and a
heartbeat time that a background thread renews every ``HEARTBEAT_S`` seconds. Another
trainer on the same workdir refuses at once, naming the holder. A lock whose holder is
gone is stale and is taken over, with a log line saying so:

- same host: the holder's pid no longer exists (a SIGKILLed or crashed trainer);
- another host: its heartbeat is older than ``STALE_AFTER_S`` (the host died or lost
  the workdir).

Every change to the lock is a compare-and-swap on the lock object's storage generation,
through tensorstore's key-value stores (the library orbax writes arrays with), so the
same protocol is atomic on a local disk (``file://``), on gs:// (GCS's
``ifGenerationMatch`` preconditions; ``0`` means "create only") and in memory (tests):

- **take**: read the lock and its generation; if there is none, or its holder is gone,
  write ours *on condition that the generation is still the one read*. Of two starters,
  exactly one condition holds; the other re-reads and refuses naming the winner.
- **heartbeat**: rewrite our lock on condition that it is still the generation we wrote.
  If someone took it over (we were stale), the write fails, the heartbeat stops and
  says so in the log (``Lease.lost`` is set); it never overwrites another holder.
- **release**: delete the lock on the same condition, so a run that lost its lock never
  deletes its successor's.

Evaluation takes no lock: it reads only complete checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from sasa_flax.errors import UserError
from sasa_flax.run.workdir import Workdir

HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S

log = logging.getLogger(__name__)


class WorkdirLocked(UserError):
    """Another live trainer holds the workdir."""


class LockStore:
    """One key (the lock file) of a tensorstore key-value store, read and written only
    with its storage generation: the compare-and-swap every lock operation is made of."""

    def __init__(self, workdir: Workdir):
        import tensorstore as ts  # orbax's own dependency

        self.path = workdir.join(Workdir.LOCK)  # named in messages (memory:// in tests)
        self._key = Workdir.LOCK
        self._kvstore = ts.KvStore.open(workdir.kvstore_url).result()

    def read(self) -> tuple[bytes | None, bytes]:
        """(content or None if absent, generation)."""
        result = self._kvstore.read(self._key).result()
        value = bytes(result.value) if result.state == "value" else None
        return value, bytes(result.stamp.generation)

    def write(self, content: bytes | None, if_generation: bytes) -> bytes | None:
        """Writes (or, for None, deletes) the lock if its generation is still
        ``if_generation``; the new generation, or None if the condition failed."""
        stamp = self._kvstore.write(self._key, content, if_equal=if_generation).result()
        # tensorstore reports a failed condition as the unknown (empty) generation.
        return bytes(stamp.generation) or None


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock file"
    started = datetime.datetime.fromtimestamp(holder.get("started", 0)).isoformat(" ", "seconds")
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def _alive(holder: dict) -> bool:
    if not holder:
        return False  # unreadable or half-written: a holder that is gone
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return True
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


def _parse(content: bytes | None) -> dict | None:
    if content is None:
        return None
    try:
        holder = json.loads(content)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _refusal(workdir: Workdir, store: LockStore, holder: dict, just: bool = False) -> WorkdirLocked:
    if just:
        return WorkdirLocked(
            f"{workdir} was just taken by another trainer ({_describe(holder)}); use another "
            "--workdir."
        )
    return WorkdirLocked(
        f"{workdir} is in use by another trainer ({_describe(holder)}; lock file "
        f"{store.path}). Wait for it to finish, stop it, or use another --workdir."
    )


def check_free(workdir: Workdir, store: LockStore | None = None) -> None:
    """Raises WorkdirLocked if a live trainer holds ``workdir``; writes nothing. Run it
    before touching a workdir that ``hold`` will lock later (e.g. to clean it up)."""
    store = store or LockStore(workdir)
    holder = _parse(store.read()[0])
    if holder is not None and _alive(holder):
        raise _refusal(workdir, store, holder)


@dataclasses.dataclass
class Lease:
    """The lock as its holder knows it: our content, the generation we last wrote, and
    ``lost``, set if another trainer took the lock over (our heartbeat had stopped)."""

    store: LockStore | None
    me: dict
    generation: bytes = b""
    lost: threading.Event = dataclasses.field(default_factory=threading.Event)

    def renew(self) -> None:
        """One heartbeat: our lock rewritten if it is still ours; ``lost`` set if not."""
        content = json.dumps(dict(self.me, heartbeat=time.time())).encode()
        generation = self.store.write(content, self.generation)
        if generation is None:
            # Our previous write may have landed although its reply was lost (a network
            # error): the lock is then still ours, at a generation we did not see.
            current, current_generation = self.store.read()
            holder = _parse(current) or {}
            if holder.get("token") == self.me["token"]:
                generation = self.store.write(content, current_generation)
        if generation is not None:
            self.generation = generation
            return
        holder = _parse(self.store.read()[0]) or {}
        self.lost.set()
        log.error(
            "the lock of this workdir (%s) was taken over by %s: this run's heartbeat had "
            "stopped for longer than %d s. Two trainers may now write one workdir; stop one.",
            self.store.path,
            _describe(holder),
            STALE_AFTER_S,
        )

    def release(self) -> None:
        """Deletes the lock if it is still ours (never a successor's)."""
        if not self.lost.is_set():
            self.store.write(None, self.generation)


def take(workdir: Workdir, store: LockStore | None = None) -> Lease:
    """Takes ``workdir``'s lock (a stale one is taken over, saying so) or raises
    WorkdirLocked naming the live holder. Atomic: see the module docstring."""
    store = store or LockStore(workdir)
    me = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.time(),
        heartbeat=time.time(),
        token=uuid.uuid4().hex,
    )
    content, generation = store.read()
    holder = _parse(content)
    if holder is not None:
        if _alive(holder):
            raise _refusal(workdir, store, holder)
        log.warning(
            "taking over the stale lock of %s (%s): its holder is gone", workdir, _describe(holder)
        )
    written = store.write(json.dumps(me).encode(), generation)
    if written is None:  # another starter's write landed between our read and our write
        raise _refusal(workdir, store, _parse(store.read()[0]) or {}, just=True)
    return Lease(store, me, written)


@contextlib.contextmanager
def hold(workdir: Workdir, *, store: LockStore | None = None):
    """Takes ``workdir``'s lock and keeps it for the duration; yields the ``Lease``."""
    with keep(take(workdir, store)) as lease:
        yield lease


@contextlib.contextmanager
def keep(lease: Lease | None):
    """Renews ``lease`` every ``HEARTBEAT_S`` while the block runs and releases it after.
    None (processes other than 0, which hold no lock) does nothing."""
    if lease is None:
        yield None
        return
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S) and not lease.lost.is_set():
            try:
                lease.renew()
            except Exception as e:  # noqa: BLE001 - a network error: try again next beat
                log.warning(
                    "could not renew the lock %s (%s); retrying in %d s",
                    lease.store.path,
                    e,
                    HEARTBEAT_S,
                )

    thread = threading.Thread(target=heartbeat, daemon=True, name="workdir-lock-heartbeat")
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):  # an unreleased lock goes stale: never fatal
            lease.release()
