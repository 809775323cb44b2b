import zlib

import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running; deselected by default, run with -m slow"
    )


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: fresh inputs per case, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
