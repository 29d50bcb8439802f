"""The backend registry: each refusal names the value and what is allowed, and the table says what
the kernels really run (every declared block size and head dim runs, the next value is refused)."""

from __future__ import annotations

import pytest
import torch

import diffattn.kernels.backends as backends
from diffattn import Dense, Neighborhood, SparsityConfig, VideoGrid
from diffattn.errors import UserError
from diffattn.kernels import BACKENDS, block_sparse_attention, masked_attention_reference, support_problems
from diffattn.kernels.backends import backends_on, config_block_sizes, resolve_backend

GRID = VideoGrid(2, 4, 8, text_tokens=3)  # N = 67: a ragged last block for every block size
PATTERN = Neighborhood(kernel_size=(1, 3, 3))


def qkv(n: int = GRID.num_tokens, d: int = 16, dtype: torch.dtype = torch.float32, h: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, n, d, generator=gen).to(dtype) for _ in range(3)]


def error_of(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        block_sparse_attention(*args, **kwargs)
    return str(info.value)


def runs_exactly(backend: str, block_q: int, block_k: int, d: int, dtype: torch.dtype = torch.float32) -> None:
    layout = PATTERN.layout(GRID, block_q=block_q, block_k=block_k)
    q, k, v = qkv(d=d, dtype=dtype)
    out = block_sparse_attention(q, k, v, layout, backend=backend)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), PATTERN.token_mask(GRID))
    # Inputs are rounded to dtype before the float64 reference: only the output rounding remains.
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (out.double() - ref).abs().max() < tolerance, (backend, block_q, block_k, d)


# ---------------------------------------------------------------------------------- the table is true
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_declared_block_size_runs(backend):
    caps = BACKENDS[backend]
    for block_q in caps.block_q:
        for block_k in caps.block_k:
            runs_exactly(backend, block_q, block_k, d=8)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_any_head_dim_and_every_dtype_runs(backend):
    assert BACKENDS[backend].head_dims is None
    for d in (1, 3, 200):
        runs_exactly(backend, 32, 32, d)
    for dtype in BACKENDS[backend].dtypes:
        runs_exactly(backend, 32, 32, 16, dtype)


def test_layouts_accept_exactly_the_block_sizes_of_the_pytorch_backends():
    # The cpu and reference backends run any layout: their table is the layout builder's limits.
    for caps in (BACKENDS["cpu"], BACKENDS["reference"]):
        for block_q in caps.block_q:
            Dense().layout(GRID, block_q=block_q, block_k=32)
        for block_k in caps.block_k:
            Dense().layout(GRID, block_q=32, block_k=block_k)
        for bad in (8, 48, 512):
            with pytest.raises(ValueError):
                Dense().layout(GRID, block_q=bad, block_k=32)


def test_triton_declared_block_sizes_and_head_dims_run():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not backends.triton_interpreter():
        pytest.skip("no GPU and not under TRITON_INTERPRET=1")
    caps = BACKENDS["triton"]
    for block_q in caps.block_q:
        for block_k in caps.block_k:
            runs_triton(block_q, block_k, 16)
    for d in caps.head_dims:
        runs_triton(32, 32, d)


def runs_triton(block_q: int, block_k: int, d: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = PATTERN.layout(GRID, block_q=block_q, block_k=block_k, device=device)
    q, k, v = (x.to(device) for x in qkv(d=d, h=1))
    out = block_sparse_attention(q, k, v, layout, backend="triton")
    ref = masked_attention_reference(q.double(), k.double(), v.double(), PATTERN.token_mask(GRID).to(device))
    assert (out.double() - ref).abs().max() < 1e-4, (block_q, block_k, d)


def test_triton_module_reads_the_registry():
    triton_attention = pytest.importorskip("diffattn.kernels.triton_attention")
    layout = PATTERN.layout(GRID, block_size=64)
    q = torch.zeros(1, 1, GRID.num_tokens, 48)  # a head dim the registry's Triton entry refuses
    expected = BACKENDS["triton"].problems(q.device, q.dtype, 48, 64, 64)
    problems = triton_attention.triton_support_problems(q, q, q, layout)
    assert expected and all(problem in problems for problem in expected)


# ---------------------------------------------------------------------------------- refusals
def test_triton_refusals_name_value_and_allowed(monkeypatch):
    caps = BACKENDS["triton"]
    cuda = torch.device("cuda")
    assert caps.problems(cuda, torch.float16, 64, 64, 64) == []
    (head_dim,) = caps.problems(cuda, torch.float16, 48, 64, 64)
    assert "D=48" in head_dim and "16, 32, 64, 80, 96, 128" in head_dim
    block_q, block_k = caps.problems(cuda, torch.float16, 64, 256, 256)
    assert "block_q=256" in block_q and "allowed: 16, 32, 64, 128" in block_q
    assert "block_k=256" in block_k and "allowed: 32, 64, 128" in block_k
    (dtype,) = caps.problems(cuda, torch.float64, 64, 64, 64)
    assert "dtype=float64" in dtype and "allowed: float16, bfloat16, float32" in dtype
    monkeypatch.setattr(backends, "triton_interpreter", lambda: False)
    (device,) = caps.problems(torch.device("cpu"), torch.float16, 64, 64, 64)
    assert "got tensors on cpu" in device and "needs tensors on cuda" in device and "TRITON_INTERPRET=1" in device
    monkeypatch.setattr(backends, "triton_interpreter", lambda: True)
    assert caps.problems(torch.device("cpu"), torch.float16, 64, 64, 64) == []


def test_cpu_refusals_name_value_and_allowed():
    q, k, v = qkv(dtype=torch.float64)
    layout = PATTERN.layout(GRID, block_size=32)
    msg = error_of(q, k, v, layout, backend="cpu")
    assert "dtype=float64 is not supported by backend='cpu'; allowed: float16, bfloat16, float32" in msg
    meta = [x.to("meta", torch.float32) for x in (q, k, v)]
    msg = error_of(*meta, layout, backend="cpu")
    assert "backend='cpu' cannot compute on tensors on meta" in msg and "allowed: tensors on cpu" in msg
    assert support_problems(*qkv(), layout, backend="cpu") == []


def test_auto_resolution():
    assert resolve_backend("auto", "cpu") == ("cpu", [])
    assert resolve_backend("auto", "cuda:1") == ("triton", [])
    assert resolve_backend("reference", "meta") == ("reference", [])  # resolved, then refused by the table
    (problem,) = BACKENDS["reference"].problems(torch.device("meta"), torch.float32)
    assert "tensors on meta" in problem and "hold no data" in problem and "allowed: tensors on any device" in problem
    name, (problem,) = resolve_backend("auto", "meta")
    assert name is None and "tensors on meta" in problem and "'triton' on cuda" in problem and "'cpu' on cpu" in problem
    name, (problem,) = resolve_backend("flash", "cpu")
    assert name is None and "backend='flash'" in problem and "'auto', 'cpu', 'triton', 'reference'" in problem


def test_backends_on_a_device(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreter", lambda: False)
    assert backends_on("cpu") == ["cpu", "reference"]
    assert backends_on("cuda") == ["triton", "reference"]
    assert backends_on("meta") == []
    monkeypatch.setattr(backends, "triton_interpreter", lambda: True)
    assert backends_on("cpu") == ["cpu", "triton", "reference"]


# ---------------------------------------------------------------------------------- SparsityConfig
def test_config_block_size_is_one_every_picked_backend_runs():
    assert config_block_sizes("auto") == (32, 64, 128)
    assert config_block_sizes("cpu") == (32, 64, 128, 256)
    assert SparsityConfig(pattern=Dense(), block_size=256, backend="cpu").block_size == 256
    with pytest.raises(UserError) as info:
        SparsityConfig(pattern=Dense(), block_size=256)  # auto: refused on CUDA, so refused here
    msg = str(info.value)
    assert "SparsityConfig.block_size=256" in msg and "backend='auto'" in msg and "allowed: 32, 64, 128." in msg
    assert "cpu: 32, 64, 128, 256" in msg and "triton: 32, 64, 128" in msg and "reference: 32, 64, 128, 256" in msg


@pytest.mark.parametrize("bad", [48, 0, -64, 512, 128.0, "128", True, None])
def test_config_block_size_no_backend_runs(bad):
    with pytest.raises(UserError) as info:
        SparsityConfig(pattern=Dense(), block_size=bad, backend="cpu")
    msg = str(info.value)
    assert f"SparsityConfig.block_size={bad!r}" in msg and "triton: 32, 64, 128" in msg


def test_config_backend_name():
    with pytest.raises(UserError) as info:
        SparsityConfig(pattern=Dense(), backend="cuda")
    assert "SparsityConfig.backend='cuda'" in str(info.value)
    assert "'auto', 'cpu', 'triton', 'reference'" in str(info.value)
