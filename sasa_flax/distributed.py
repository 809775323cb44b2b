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
    """``mode``: 'on', 'off' or 'auto'. Must run before any other JAX call."""
    if mode == "on" or (mode == "auto" and on_multi_host()):
        jax.distributed.initialize()
