import sys
from pathlib import Path

import pytest

# The references, the tolerance table and the device list are imported as plain modules by every
# test file.
sys.path.insert(0, str(Path(__file__).parent))

from devices import DEVICES  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a device-parametrized test puts its params on: every test that takes it runs
    on the CPU kernels, and on the CUDA kernels where they are built and a GPU is present."""
    return request.param
