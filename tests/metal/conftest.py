import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "metal: executes Metal kernels in the Metal-on-CPU emulator (tests/metal)")


@pytest.fixture
def rng(request):
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
