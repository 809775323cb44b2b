"""The workdir lock is a lock: two starters interleaved at every point of the protocol,
on an in-memory store (default selection) and on gs:// (slow, the loopback emulator);
a heartbeat renews only its own lease; a takeover and a release never undo another's."""

import itertools
import json
import threading
import time
import uuid

import pytest

from sasa_flax.run import Workdir, lock


class Turnstile:
    """Lets the store operations of several threads through one at a time, in the order
    ``schedule`` gives (a thread's name per operation); a thread that has finished gives
    up its remaining turns."""

    def __init__(self, schedule):
        self.schedule, self.finished = list(schedule), set()
        self.condition = threading.Condition()

    def _next(self):
        while self.schedule and self.schedule[0] in self.finished:
            self.schedule.pop(0)
        return self.schedule[0] if self.schedule else None

    def run(self, who, operation):
        with self.condition:
            assert self.condition.wait_for(lambda: self._next() in (who, None), timeout=30)
            try:
                return operation()
            finally:
                if self._next() == who:
                    self.schedule.pop(0)
                self.condition.notify_all()

    def finish(self, who):
        with self.condition:
            self.finished.add(who)
            self.condition.notify_all()


class ScheduledStore:
    """A LockStore whose every read and write waits for its turn."""

    def __init__(self, store, who, turnstile, conditional=True):
        self.store, self.who, self.turnstile, self.path = store, who, turnstile, store.path
        self.conditional = conditional

    def read(self):
        return self.turnstile.run(self.who, self.store.read)

    def write(self, content, if_generation):
        def write():
            # Without its compare-and-swap: whatever is there is overwritten.
            generation = if_generation if self.conditional else self.store.read()[1]
            return self.store.write(content, generation)

        return self.turnstile.run(self.who, write)


def _stale_holder():
    return dict(host="other-host", pid=1, started=0, heartbeat=time.time() - 10**6, token="old")


INITIAL = {
    "no lock": None,
    "a stale lock": json.dumps(_stale_holder()).encode(),
    "an unreadable lock": b"{half-writ",
}
SCHEDULES = sorted(set(itertools.permutations("AAABBB")))  # all 20 interleavings


def _race(store, schedule, conditional=True):
    """Two starters through ``schedule``: {name: Lease or WorkdirLocked}."""
    turnstile, outcomes = Turnstile(schedule), {}

    def start(who):
        try:
            scheduled = ScheduledStore(store, who, turnstile, conditional)
            outcomes[who] = lock.take(Workdir("the-workdir"), store=scheduled)
        except lock.WorkdirLocked as e:
            outcomes[who] = e
        finally:
            turnstile.finish(who)

    threads = [threading.Thread(target=start, args=(who,)) for who in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def _store_with(url, content):
    store = lock.LockStore(Workdir.of(url))
    _, generation = store.read()
    if content is not None:
        store.write(content, generation)
    return store


def _assert_exactly_one_holds(store, outcomes, where):
    holders = [o for o in outcomes.values() if isinstance(o, lock.Lease)]
    assert len(holders) == 1, f"{where}: {outcomes}"
    (refused,) = [o for o in outcomes.values() if isinstance(o, lock.WorkdirLocked)]
    assert "another trainer" in str(refused)
    assert json.loads(store.read()[0])["token"] == holders[0].me["token"], where


def _all_races(url_for):
    for (name, content), schedule in itertools.product(INITIAL.items(), SCHEDULES):
        store = _store_with(url_for(), content)
        where = f"{name}, schedule {''.join(schedule)}"
        _assert_exactly_one_holds(store, _race(store, schedule), where)


def test_two_starters_interleaved_at_every_point_exactly_one_holds():
    _all_races(lambda: f"memory://race-{uuid.uuid4().hex}")


def test_without_the_compare_and_swap_two_starters_both_hold():
    """The race test can fail: the same protocol with unconditional writes (what a
    write-then-read-back lease amounts to) lets both starters hold in some interleaving."""
    doubles = 0
    for schedule in SCHEDULES:
        store = _store_with(f"memory://race-{uuid.uuid4().hex}", None)
        outcomes = _race(store, schedule, conditional=False)
        doubles += sum(isinstance(o, lock.Lease) for o in outcomes.values()) == 2
    assert doubles > 0


@pytest.mark.slow
def test_on_gcs_two_starters_interleaved_at_every_point_exactly_one_holds(gcs, monkeypatch):
    for name, value in gcs.env.items():
        monkeypatch.setenv(name, value)
    root = gcs.prefix("lock-race")
    counter = itertools.count()
    _all_races(lambda: f"{root}/{next(counter)}")


def test_a_heartbeat_renews_only_its_own_lease_and_release_spares_a_successor(monkeypatch):
    url = f"memory://lease-{uuid.uuid4().hex}"
    store = lock.LockStore(Workdir.of(url))
    first = lock.take(Workdir.of(url), store=store)
    first.renew()  # our own lease: renewed, still ours
    assert not first.lost.is_set()
    assert json.loads(store.read()[0])["token"] == first.me["token"]
    # The first run's heartbeat stopped long enough for another host to call it stale.
    monkeypatch.setattr(lock, "_alive", lambda holder: False)
    second = lock.take(Workdir.of(url), store=store)
    first.renew()
    assert first.lost.is_set()
    first.release()
    assert json.loads(store.read()[0])["token"] == second.me["token"]  # untouched
    second.release()
    assert store.read()[0] is None


def test_a_renewal_whose_reply_was_lost_keeps_the_lease():
    """A write that landed although the client saw an error leaves the lease at a
    generation its holder never saw: the next heartbeat finds its own token and goes on."""
    url = f"memory://lease-{uuid.uuid4().hex}"
    store = lock.LockStore(Workdir.of(url))
    lease = lock.take(Workdir.of(url), store=store)
    content, generation = store.read()
    store.write(content, generation)  # "our" earlier write, its new generation unseen
    lease.renew()
    assert not lease.lost.is_set()
    assert json.loads(store.read()[0])["token"] == lease.me["token"]
