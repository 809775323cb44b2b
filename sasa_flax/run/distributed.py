"""Multi-host start-up and agreement: one process per host, all running the same program.

A decision taken on one process (the workdir's lock, a checkpoint that fails to read)
must reach every process, or the others go on and wait in their first collective: for
ever on a TPU pod, 30 s on CPU (gloo). ``on_process_0`` and ``everywhere`` pass outcomes
through the coordination service's key-value store (not a device collective, so a wait
of minutes does not time out), and every process then raises the same error.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax

from sasa_flax.errors import UserError

_MULTI_HOST_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def on_multi_host() -> bool:
    """Heuristic for 'auto': a Cloud TPU slice with several workers, SLURM, MPI, or an
    explicit coordinator address."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(os.environ.get(name) for name in _MULTI_HOST_HINTS)


def maybe_initialize(mode: str) -> None:
    """``mode``: 'on', 'off' or 'auto'. Must run before any other JAX call.

    Cloud TPU, SLURM and MPI are detected by JAX. Anywhere else (several GPU machines, or
    processes on one machine), set ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` for each process.
    """
    if mode == "on" or (mode == "auto" and on_multi_host()):
        explicit = {}
        if "JAX_NUM_PROCESSES" in os.environ:
            explicit["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            explicit["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**explicit)


# A process waiting for process 0 (e.g. while it builds a TFDS dataset) waits this long.
SHARE_TIMEOUT_HOURS = 48


def share_from_process_0(key: str, value: str | None) -> str | None:
    """Process 0's ``value`` on every process; the others block until process 0 has set
    it, so this is also a barrier. Uses the coordination service's key-value store, not
    a device collective, so that a wait of hours (building a dataset) does not time out a
    collective. With one JAX process (tests simulating several) it returns ``value``."""
    if jax.process_count() == 1:
        return value
    key = f"sasa_flax/{key}"
    if jax.process_index() == 0:
        _client().key_value_set(key, value or "")
        return value
    return _client().blocking_key_value_get(key, SHARE_TIMEOUT_HOURS * 3600 * 1000)


# A process waiting for another's outcome (a lock, a cleanup, a checkpoint read) waits
# this long; the coordination service ends the wait sooner if that process dies.
OUTCOME_TIMEOUT_S = 3600


def _client():
    from jax._src import distributed as jax_distributed  # the only way to the KV store

    return jax_distributed.global_state.client


def _outcome(error: BaseException | None) -> str:
    """An outcome as the key-value store carries it: "" for success, else JSON."""
    if error is None:
        return ""
    if isinstance(error, UserError):
        kind = f"{type(error).__module__}:{type(error).__qualname__}"
        return json.dumps(dict(kind=kind, message=str(error)))
    first = (str(error).strip().splitlines() or [""])[0]
    message = f"process {jax.process_index()} failed: {type(error).__name__}: {first}"
    return json.dumps(dict(kind="", message=message))


def _raise(outcome: str) -> None:
    """Raises the error an outcome describes: the same UserError class where it can be
    rebuilt from its message alone, else a UserError with the same message."""
    if not outcome:
        return
    outcome = json.loads(outcome)
    kind, message = outcome["kind"], outcome["message"]
    error_class = UserError
    if kind:
        module, name = kind.split(":")
        found = getattr(importlib.import_module(module), name, UserError)
        if isinstance(found, type) and issubclass(found, UserError):
            error_class = found
    try:
        error = error_class(message)
    except TypeError:  # a class whose constructor takes other arguments
        error = UserError(message)
    raise error


def on_process_0(name: str, decide: Callable[[], Any]) -> Any:
    """Runs ``decide`` on process 0 alone; the other processes wait for it. Returns its
    value on process 0 (None elsewhere). If it raises, every process raises: process 0
    its own error, the others the same UserError (same message), so that all exit with
    the same line within seconds. ``name``: unique within the program run."""
    if jax.process_count() == 1:
        return decide()
    key = f"sasa_flax/outcome/{name}"
    if jax.process_index() != 0:
        _raise(_client().blocking_key_value_get(key, OUTCOME_TIMEOUT_S * 1000))
        return None
    try:
        value = decide()
    except BaseException as e:
        _client().key_value_set(key, _outcome(e))
        raise
    _client().key_value_set(key, "")
    return value


def everywhere(name: str, act: Callable[[], Any]) -> Any:
    """Runs ``act`` on every process, then agrees: if it raised on any process, every
    process raises the error of the lowest-numbered one that failed (its own, where that
    is itself). Returns ``act``'s value where every process succeeded."""
    if jax.process_count() == 1:
        return act()
    key = f"sasa_flax/outcome/{name}"
    error, value = None, None
    try:
        value = act()
    except Exception as e:  # noqa: BLE001 - reported to the others, then raised below
        error = e
    _client().key_value_set(f"{key}/{jax.process_index()}", _outcome(error))
    for index in range(jax.process_count()):
        outcome = _client().blocking_key_value_get(f"{key}/{index}", OUTCOME_TIMEOUT_S * 1000)
        if outcome and index == jax.process_index():
            raise error
        _raise(outcome)
    return value
