import os

# 8 fake CPU devices for the sharding tests; must be set before JAX initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import tempfile
import zlib

import jax
import numpy as np
import pytest

# Training tests compile the same step in several runs: share the compiled executables.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sasa-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running; deselected by default, run with -m slow"
    )


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: fresh inputs per case, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
