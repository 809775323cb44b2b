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
