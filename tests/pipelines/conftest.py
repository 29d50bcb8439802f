import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one thread avoids OpenMP threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
