"""The public entry point: validation messages, backend choice, permutation round trip, dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

import diffattn.kernels.api as api
import diffattn.kernels.backends as backends
from diffattn import Dense, Neighborhood, VideoGrid
from diffattn.kernels import block_sparse_attention, masked_attention_reference

GRID = VideoGrid(2, 8, 8, text_tokens=6, text_position="start")  # N = 134
PATTERN = Neighborhood(kernel_size=(1, 3, 3))
N = GRID.num_tokens


@pytest.fixture(scope="module")
def layout():
    return PATTERN.layout(GRID, block_size=64, tile_shape=(1, 4, 8))


def qkv(b=1, h=2, n=N, d=32, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).to(dtype).requires_grad_(grad) for _ in range(3)]


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        block_sparse_attention(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------- results
def test_auto_on_cpu_is_the_cpu_path(layout):
    q, k, v = qkv()
    auto = block_sparse_attention(q, k, v, layout)
    cpu = block_sparse_attention(q, k, v, layout, backend="cpu")
    assert torch.equal(auto, cpu)


def test_permuted_layout_round_trip_matches_token_mask(layout):
    assert layout.permutation is not None
    q, k, v = qkv(b=2, seed=1)
    mask = PATTERN.token_mask(GRID)  # caller's order, independent of the permutation
    expected, expected_lse = masked_attention_reference(q.double(), k.double(), v.double(), mask, return_lse=True)
    for backend in ("cpu", "reference"):
        out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
        assert (out.double() - expected).abs().max() < 1e-5, backend
        assert (lse.double() - expected_lse).abs().max() < 1e-5, backend


def test_gradients_flow_through_the_permutation(layout):
    q, k, v = qkv(seed=2, grad=True)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, lse_ref = masked_attention_reference(*ref, PATTERN.token_mask(GRID), return_lse=True)
    (o.square().sum() + lse_ref.sum()).backward()
    for g, r in zip(grads, ref):
        assert (g.double() - r.grad).abs().max() < 1e-4


def test_per_head_layout_and_shared_layout_accepted():
    from diffattn import BlockLayout

    grid = VideoGrid(2, 4, 8)
    per_head = BlockLayout.stack([Dense().layout(grid, block_size=32), PATTERN.layout(grid, block_size=32)])
    q, k, v = qkv(h=2, n=grid.num_tokens)
    out = block_sparse_attention(q, k, v, per_head)
    mask = torch.stack([Dense().token_mask(grid), PATTERN.token_mask(grid)])
    assert (out - masked_attention_reference(q, k, v, mask)).abs().max() < 1e-5


def test_empty_batch_returns_empty(layout):
    q, k, v = qkv(b=0)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]


# ---------------------------------------------------------------------------------- errors
def test_unsupported_dtype_names_dtype_and_allowed(layout):
    q, k, v = qkv(dtype=torch.float64)
    msg = error_of(q, k, v, layout)
    assert "dtype=float64" in msg and "float16" in msg and "bfloat16" in msg and "float32" in msg


def test_integer_dtype_rejected(layout):
    q, k, v = (torch.zeros(1, 2, N, 32, dtype=torch.int32) for _ in range(3))
    assert "dtype=int32" in error_of(q, k, v, layout)


def test_mismatched_dtypes(layout):
    q, k, v = qkv()
    msg = error_of(q, k.half(), v, layout)
    assert "same dtype" in msg


def test_wrong_rank(layout):
    q, k, v = qkv()
    msg = error_of(q[0], k[0], v[0], layout)
    assert "4 dimensions" in msg and "(2, 134, 32)" in msg


def test_mismatched_shapes(layout):
    q, k, v = qkv()
    msg = error_of(q, k, v[..., :16], layout)
    assert "same shape" in msg and "(1, 2, 134, 16)" in msg


def test_sequence_length_mismatch(layout):
    q, k, v = qkv(n=N - 1)
    msg = error_of(q, k, v, layout)
    assert f"N={N - 1}" in msg and f"num_tokens={N}" in msg


def test_head_count_mismatch():
    from diffattn import BlockLayout

    grid = VideoGrid(2, 4, 8)
    three = BlockLayout.stack([Dense().layout(grid, block_size=32)] * 3)
    q, k, v = qkv(h=2, n=grid.num_tokens)
    msg = error_of(q, k, v, three)
    assert "num_heads=3" in msg and "H=2" in msg


def test_unknown_backend_lists_allowed(layout):
    q, k, v = qkv()
    msg = error_of(q, k, v, layout, backend="cuda")
    assert "backend='cuda'" in msg
    for name in ("'auto'", "'cpu'", "'triton'", "'reference'"):
        assert name in msg


def test_every_reason_is_listed(layout):
    q, k, v = qkv(n=N + 3, dtype=torch.float64)
    msg = error_of(q, k, v, layout, backend="nope")
    assert "dtype=float64" in msg and f"num_tokens={N}" in msg and "backend='nope'" in msg


def test_not_a_layout_or_tensor():
    q, k, v = qkv()
    assert "layout must be a BlockLayout" in error_of(q, k, v, object())
    assert "k must be a torch.Tensor" in error_of(q, None, v, object())


def test_bad_scale(layout):
    q, k, v = qkv()
    assert "scale must be" in error_of(q, k, v, layout, scale=float("nan"))
    assert "scale must be" in error_of(q, k, v, layout, scale=-1.0)


def test_mismatched_devices(layout):
    q, k, v = qkv()
    msg = error_of(q, k.to("meta"), v, layout)
    assert "same device" in msg


def test_triton_on_cpu_needs_interpreter(layout, monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreter", lambda: False)
    q, k, v = qkv()
    msg = error_of(q, k, v, layout, backend="triton")
    assert "backend='triton' needs tensors on cuda, got tensors on cpu" in msg and "TRITON_INTERPRET=1" in msg


def test_interpreter_setting_is_one_answer():
    # One answer: before the kernels are imported, Triton's setting (read from the environment
    # as Triton reads it); once they are, their own (fixed) choice.
    code = """
import os
from diffattn.kernels.backends import triton_interpreter
answers = []
for value in ("1", "TRUE", "0", ""):
    os.environ["TRITON_INTERPRET"] = value
    answers.append(triton_interpreter())
os.environ["TRITON_INTERPRET"] = "1"
import diffattn.kernels.triton_fwd
os.environ["TRITON_INTERPRET"] = "0"
print(answers, triton_interpreter())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, True, False, False] True"


def test_cpu_backend_rejects_other_devices(layout):
    q, k, v = (x.to("meta") for x in qkv())
    msg = error_of(q, k, v, layout, backend="cpu")
    assert "backend='cpu' cannot compute on tensors on meta" in msg and "allowed: tensors on cpu" in msg
    assert "backend='auto' has no kernel" in error_of(q, k, v, layout, backend="auto")


# ---------------------------------------------------------------------------------- dispatch
@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in ``diffattn.kernels.triton_attention`` that records its calls.

    It checks the dispatcher's side of the contract (interpreter guard, kernel token order,
    support problems surfaced, lse unpermuted) without depending on the real kernels.
    """
    module = types.ModuleType("diffattn.kernels.triton_attention")
    module.calls = []
    module.problems = []

    def kernel_forward(q, k, v, layout, scale, want_lse):
        # The custom op hands over a layout view in kernel order (no permutation).
        module.calls.append((q, k, v, layout, scale, want_lse))
        return masked_attention_reference(q, k, v, layout.token_mask(), scale=scale, return_lse=True)

    module.kernel_forward = kernel_forward
    module.triton_support_problems = lambda q, k, v, layout: list(module.problems)
    monkeypatch.setitem(sys.modules, "diffattn.kernels.triton_attention", module)
    import diffattn.kernels as kernels_pkg

    monkeypatch.setattr(kernels_pkg, "triton_attention", module, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


def test_triton_dispatch_uses_kernel_order(layout, fake_triton):
    q, k, v = qkv(seed=3)
    out, lse = block_sparse_attention(q, k, v, layout, scale=0.1, return_lse=True, backend="triton")
    (qk, kk, vk, lay, scale, want_lse), = fake_triton.calls
    assert torch.equal(qk, q[:, :, layout.permutation]) and torch.equal(vk, v[:, :, layout.permutation])
    assert lay.kv_indices is layout.kv_indices and lay.masks is layout.masks and lay.permutation is None
    assert scale == 0.1 and want_lse is True
    expected, expected_lse = masked_attention_reference(q, k, v, PATTERN.token_mask(GRID), scale=0.1, return_lse=True)
    assert (out - expected).abs().max() < 1e-5 and (lse - expected_lse).abs().max() < 1e-5


def test_triton_support_problems_are_reported(layout, fake_triton):
    fake_triton.problems = ["head dim 32 is too small (need >= 64)", "something else"]
    q, k, v = qkv()
    msg = error_of(q, k, v, layout, backend="triton")
    assert "head dim 32 is too small" in msg and "something else" in msg
    assert not fake_triton.calls


def test_works_without_triton_and_imports_kernels_lazily():
    # Triton made unimportable: the package and the CPU path must still work, and the dispatcher
    # must not have imported the Triton kernels module (it is imported on first backend="triton").
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by the test")
sys.meta_path.insert(0, NoTriton())
import torch, diffattn
from diffattn import Dense, VideoGrid
from diffattn.kernels import block_sparse_attention
layout = Dense().layout(VideoGrid(1, 4, 8), block_size=32)
q = torch.randn(1, 1, 32, 16)
block_sparse_attention(q, q, q, layout)
print(sorted(m for m in sys.modules if m.startswith("diffattn.kernels.triton")), "triton" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


def test_moved_layout_is_cached(layout):
    # The same source layout moved to the same device is reused (per-layout caches stay warm).
    assert api._layout_on(layout, layout.device) is layout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cpu_layout_is_moved_to_cuda(layout):
    q, k, v = (x.cuda().half() for x in qkv(d=64))
    out = block_sparse_attention(q, k, v, layout)
    assert out.device.type == "cuda"
    assert api._layout_on(layout, q.device) is api._layout_on(layout, q.device)
    ref = masked_attention_reference(q.float(), k.float(), v.float(), PATTERN.token_mask(GRID).cuda())
    assert (out.float() - ref).abs().max() < 2e-2


def test_real_triton_backend_through_the_dispatcher():
    # Integration with the real kernels module (interpreter on CPU): permutation handled here.
    triton_attention = pytest.importorskip("diffattn.kernels.triton_attention")
    on_cuda = torch.cuda.is_available()
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and not under TRITON_INTERPRET=1")
    device = "cuda" if on_cuda else "cpu"
    grid = VideoGrid(2, 4, 8, text_tokens=5)  # N = 69: ragged
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    layout = pattern.layout(grid, block_size=32, tile_shape=(1, 4, 8))
    q, k, v = (x.to(device) for x in qkv(n=grid.num_tokens, d=64, seed=9))
    problems = triton_attention.triton_support_problems(q, k, v, layout.to(device))
    assert not problems, problems
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    ref, ref_lse = masked_attention_reference(q.double(), k.double(), v.double(), pattern.token_mask(grid),
                                              return_lse=True)
    assert (out.double() - ref).abs().max() < 1e-4 and (lse.double() - ref_lse).abs().max() < 1e-4
