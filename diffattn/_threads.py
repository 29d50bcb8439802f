"""Intra-op thread control shared by the planner and the CPU attention path."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_cpu_thread(device: torch.device | str = "cpu", when: bool = True) -> Iterator[None]:
    """Run the block with one PyTorch intra-op thread on the CPU (the count is restored afterwards).

    Many small operations (a plan's ``H x Mq x Mk`` tensors, the copies of a short sequence) each
    open an OpenMP region; with two threads every region waits for the slower one, and on a busy
    machine far longer: at N = 16,384 (4 heads) a PSA plan took 17 ms with one thread and 460 ms
    with two on the shared 2-core development machine
    (``benchmarks/results/psa-kernel-cpu-2026-12-07.md``). Nothing changes for another device,
    when ``when`` is false, or when one thread is already set.

    Example:
        >>> import torch
        >>> with one_cpu_thread():
        ...     torch.get_num_threads()
        1
    """
    saved = torch.get_num_threads()
    if not when or torch.device(device).type != "cpu" or saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
