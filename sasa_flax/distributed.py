"""Multi-host start-up: one process per host, all running the same program."""

import os

import jax

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
    from jax._src import distributed as jax_distributed  # the only way to the KV store

    client = jax_distributed.global_state.client
    key = f"sasa_flax/{key}"
    if jax.process_index() == 0:
        client.key_value_set(key, value or "")
        return value
    return client.blocking_key_value_get(key, SHARE_TIMEOUT_HOURS * 3600 * 1000)
