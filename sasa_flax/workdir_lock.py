"""One training run per workdir: a lock file that the run's process 0 holds.

``workdir/train.lock`` holds JSON naming its holder: host, pid, start time, a random
token and a heartbeat time that a background thread renews every ``HEARTBEAT_S``
seconds. Another trainer on the same workdir refuses at once, naming the holder. A lock
whose holder is gone is stale and is taken over, with a log line saying so:

- same host: the holder's pid no longer exists (a SIGKILLed or crashed trainer);
- another host: its heartbeat is older than ``STALE_AFTER_S`` (the host died or lost
  the workdir).

Local disks create the file atomically (O_CREAT | O_EXCL). Object stores such as gs://
have no atomic create through ``etils.epath``: there the lock is a lease, written and
then read back, and the token decides which of two simultaneous starters won; the
heartbeat keeps it alive. Evaluation takes no lock: it reads only complete checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

from sasa_flax.errors import UserError

LOCK_NAME = "train.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S

log = logging.getLogger("sasa_flax")


class WorkdirLocked(UserError):
    """Another live trainer holds the workdir."""


def _describe(holder: dict) -> str:
    started = datetime.datetime.fromtimestamp(holder.get("started", 0)).isoformat(" ", "seconds")
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def _alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return True
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S


def _read(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # unreadable or half-written: treated as a holder that is gone


def _create(path: epath.Path, content: str) -> bool:
    """Writes the lock if there is none; False if another one appeared first."""
    if str(path).startswith("/") or "://" not in str(path):
        try:
            fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    path.write_text(content)  # a lease: the read-back below decides
    return True


def _refuse_if_held(workdir: str, path: epath.Path) -> dict | None:
    """The lock's holder (None: no lock; {}: unreadable); raises if it is alive."""
    holder = _read(path)
    if holder and _alive(holder):
        raise WorkdirLocked(
            f"{workdir} is in use by another trainer ({_describe(holder)}; lock file "
            f"{path}). Wait for it to finish, stop it, or use another --workdir."
        )
    return holder


def check_free(workdir: str) -> None:
    """Raises WorkdirLocked if a live trainer holds ``workdir``; writes nothing. Run it
    before touching a workdir that ``hold`` will lock later (e.g. to clean it up)."""
    _refuse_if_held(workdir, epath.Path(workdir) / LOCK_NAME)


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True):
    """Holds ``workdir``'s lock for the duration (only where ``enabled``: process 0)."""
    if not enabled:
        yield
        return
    path = epath.Path(workdir) / LOCK_NAME
    me = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.time(),
        heartbeat=time.time(),
        token=uuid.uuid4().hex,
    )
    holder = _refuse_if_held(workdir, path)
    if holder is not None:
        log.warning(
            "taking over the stale lock of %s (%s): its holder is gone",
            workdir,
            _describe(holder) if holder else "unreadable lock file",
        )
        path.unlink(missing_ok=True)
    if not _create(path, json.dumps(me)) or (_read(path) or {}).get("token") != me["token"]:
        holder = _read(path) or {}
        raise WorkdirLocked(
            f"{workdir} was just taken by another trainer ({_describe(holder)}); use another "
            "--workdir."
        )
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                path.write_text(json.dumps(dict(me, heartbeat=time.time())))

    thread = threading.Thread(target=heartbeat, daemon=True, name="workdir-lock-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if (_read(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)
