"""One torch thread for these tests: on a loaded 2-core machine OpenMP's spinning workers
made each step of the tiny model about 20x slower (measured: 1 s against 0.04 s)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
