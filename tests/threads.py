"""The one-thread fixture of the tiny-model test packages (import it into a conftest or module)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are microseconds of work: with several OpenMP threads on a busy 2-core
    machine they spend far longer waiting for each other than computing (50x slower runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
