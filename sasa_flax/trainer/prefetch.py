"""Global batches put on the devices ahead of the loop by a background thread."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

from sasa_flax.trainer.setup import Setup
from sasa_flax.trainer.steps import global_batch


class DevicePrefetch:
    """Global batches put on the devices ``ahead`` steps before the loop asks for them, by
    a background thread, so that the host's input work and the transfer overlap the
    running steps. ``waited`` is the time the loop spent blocked on it: input-bound time.
    An error of the input pipeline is raised by ``next`` in the loop's thread."""

    def __init__(self, setup: Setup, batches, ahead: int = 2):
        self.waited = 0.0
        self._queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(setup, batches), daemon=True, name="device-prefetch"
        )
        self._thread.start()

    def _fill(self, setup, batches) -> None:
        try:
            for local in batches:
                item = global_batch(setup, local)
                while not self._put(item):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
            self._put_until_stopped(_Failed(StopIteration()))  # a finite stream ended
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread
            self._put_until_stopped(_Failed(e))
        finally:
            # Releases the tf.data iterators here, not in a daemon thread at exit (where
            # TensorFlow aborts the process).
            getattr(batches, "close", lambda: None)()

    def _put_until_stopped(self, item) -> None:
        while not self._put(item) and not self._stop.is_set():
            pass

    def _put(self, item) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - start
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread and waits for it (it may be finishing one batch)."""
        self._stop.set()
        self._thread.join(timeout)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException
