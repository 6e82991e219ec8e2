"""Unit-test settings: the tiny models run fastest on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine the thread pool's
    synchronisation makes every small matmul many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
