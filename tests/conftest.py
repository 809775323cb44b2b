import os

# 8 fake CPU devices for the sharding tests; must be set before JAX initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# The CPU is the only backend the tests run on; the compile tests (-m compile) target TPUs
# and GPUs without initialising them (sasa_flax/tools/aot.py), which for CUDA needs this too.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import zlib

import jax
import numpy as np
import pytest


def compilation_cache_dir() -> pathlib.Path:
    """Where the tests keep XLA's compiled executables between runs.

    ``$SASA_FLAX_TEST_CACHE`` if set, else ``$XDG_CACHE_HOME/sasa_flax/jax-tests`` (default
    ``~/.cache/sasa_flax/jax-tests``). Safe to delete at any time: a missing or emptied
    cache only makes the next run compile again. JAX keys each entry on the program, the
    jax/jaxlib versions, the backend and XLA_FLAGS, so stale entries are never used.
    """
    override = os.environ.get("SASA_FLAX_TEST_CACHE")
    if override:
        return pathlib.Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "sasa_flax" / "jax-tests"


# Tests compile the same programs run after run (and the training tests the same step in
# several runs and subprocesses): keep every compiled executable, however small.
_cache = compilation_cache_dir()
_cache.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running; deselected by default, run with -m slow"
    )
    config.addinivalue_line(
        "markers",
        "compile: compiles for TPU / GPU with the vendors' compilers (requirements-compile.txt);"
        " run with -m compile",
    )


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: fresh inputs per case, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on loopback (tests/gcs): ``gcs.prefix()`` is a fresh gs:// prefix,
    ``gcs.env`` the variables a subprocess needs to reach it. Skips without the test
    requirements (requirements-test.txt), unless SASA_FLAX_GCS=required (CI): then fails."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError as e:
        if os.environ.get("SASA_FLAX_GCS") == "required":
            pytest.fail(f"SASA_FLAX_GCS=required but the GCS emulator is missing: {e}")
        pytest.skip("no GCS emulator: pip install -r requirements-test.txt")
    from tests.gcs import GcsServer

    server = GcsServer(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()
