"""The one-intra-op-thread rule of the planner and the CPU path: thread counts come back, results
do not depend on it."""

import pytest
import torch

from diffattn import PyramidSparse, VideoGrid
from diffattn._threads import one_cpu_thread
from diffattn.kernels import block_sparse_attention
from diffattn.kernels import cpu as cpu_path


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_one_cpu_thread_restores_the_count_after_an_error(two_threads):
    with pytest.raises(RuntimeError):
        with one_cpu_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_one_cpu_thread_leaves_other_devices_and_disabled_calls_alone(two_threads):
    with one_cpu_thread("meta"):
        assert torch.get_num_threads() == 2
    with one_cpu_thread(when=False):
        assert torch.get_num_threads() == 2


def test_small_psa_call_is_the_same_with_the_rule_off(two_threads, monkeypatch):
    grid = VideoGrid(5, 8, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 2, 16, generator=gen).transpose(1, 2).requires_grad_()
               for _ in range(3))
    layout = PyramidSparse().plan(q, k, grid, block_size=32)
    out = block_sparse_attention(q, k, v, layout, backend="cpu")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(cpu_path, "_SMALL_CALL_ELEMENTS", -1)  # every call counts as large
    fresh = PyramidSparse().plan(q, k, grid, block_size=32)
    assert torch.equal(fresh.kv_levels, layout.kv_levels)
    out_off = block_sparse_attention(q, k, v, fresh, backend="cpu")
    grads_off = torch.autograd.grad(out_off.square().sum(), (q, k, v))
    torch.testing.assert_close(out_off, out, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_off, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
