"""Fixtures shared by the plugin tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices do not split well over threads: one thread is faster on a busy 2-core machine
    (two threads ran the FLUX.2 training module 4× slower). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
