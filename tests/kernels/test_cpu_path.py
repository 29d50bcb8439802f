"""The exact CPU path (and the dense reference) against an independent float64 ground truth.

The ground truth is dense float64 attention masked by ``pattern.token_mask(grid)``: it never looks
at the BlockLayout, so a wrong layout, a wrong permutation round trip or a wrong partial-tile mask
all show up. Numerics rule (flash-attention's): ``max|out - truth| <= 2 * max|plain - truth| +
floor``, where ``plain`` is :func:`masked_attention_reference` run in the tested dtype (PyTorch's
own error in that dtype).

Inputs are slices ``big[..., :N, :D]`` of NaN-filled buffers, so an out-of-bounds read along the
tokens or the head dim turns into NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffattn import BlockLayout, Dense, Neighborhood, Radial, VideoGrid
from diffattn.kernels import block_sparse_attention, masked_attention_reference
from diffattn.kernels.cpu import computed_pairs, cpu_block_sparse_attention
from diffattn.patterns.layout import pack_tile_masks

# Absolute floors of the 2x rule, relative to max|truth|.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRID_110 = VideoGrid(3, 5, 7, text_tokens=5)  # N = 110: not a multiple of 32 or 64
GRID_START = VideoGrid(2, 8, 8, text_tokens=6, text_position="start")  # N = 134


def poisoned_inputs(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0, grad: bool = False):
    """q, k, v as ``[B, H, N, D]`` views of NaN-filled larger buffers (leaves if ``grad``)."""
    gen = torch.Generator().manual_seed(seed)
    views, leaves = [], []
    for _ in range(3):
        values = torch.randn(b, h, n, d, generator=gen).to(dtype)
        buf = torch.full((b, h, n + 19, d + 8), float("nan"), dtype=dtype)
        buf[..., :n, :d] = values
        buf.requires_grad_(grad)
        views.append(buf[..., :n, :d])
        leaves.append(buf)
    return views, leaves


def truth(q, k, v, mask, scale=None, return_lse=False):
    """float64 dense masked attention (independent of any BlockLayout)."""
    return masked_attention_reference(q.double(), k.double(), v.double(), mask, scale=scale, return_lse=return_lse)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_flash_rule(out, plain, ref, dtype, what="out"):
    assert not torch.isnan(out).any(), f"{what} has NaN"
    err, base = max_err(out, ref), max_err(plain, ref)
    bound = 2 * base + FLOOR[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (PyTorch's own {dtype} error {base:.3g})"


# Each case: (id, pattern(s), grid, layout kwargs). A list of patterns builds a per-head layout.
CASES = [
    ("dense-110-b32", Dense(), GRID_110, dict(block_size=32)),
    ("dense-110-b64", Dense(), GRID_110, dict(block_size=64)),
    ("na-110-b32", Neighborhood(kernel_size=(3, 3, 3)), GRID_110, dict(block_size=32)),
    ("na-110-q16k64", Neighborhood(kernel_size=(1, 3, 5), causal=(True, False, False)), GRID_110,
     dict(block_size=64, block_q=16)),
    ("na-start-tiled", Neighborhood(kernel_size=(1, 3, 3)), GRID_START, dict(block_size=64, tile_shape=(1, 4, 8))),
    ("na-end-tiled-ragged", Neighborhood(kernel_size=(2, 3, 3)), VideoGrid(3, 6, 6, text_tokens=9),
     dict(block_size=32, tile_shape=(1, 4, 4))),
    ("radial", Radial(decay=0.5, block_size=32), VideoGrid(8, 4, 8, text_tokens=3), dict(block_size=32)),
    ("per-head", [Dense(), Neighborhood(kernel_size=(1, 3, 3)), Radial(decay=0.25, block_size=32)], GRID_110,
     dict(block_size=32)),
]


def build(case):
    _, patterns, grid, kwargs = case
    if isinstance(patterns, list):
        layout = BlockLayout.stack([p.layout(grid, **kwargs) for p in patterns])
        mask = torch.stack([p.token_mask(grid) for p in patterns])
    else:
        layout = patterns.layout(grid, **kwargs)
        mask = patterns.token_mask(grid)
    return layout, mask


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cpu_path_matches_truth(case, dtype):
    layout, mask = build(case)
    heads = 3
    (q, k, v), _ = poisoned_inputs(2, heads, layout.num_tokens, 64, dtype)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="cpu")
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    ref, ref_lse = truth(q, k, v, mask, return_lse=True)
    plain = masked_attention_reference(q, k, v, mask)
    assert_flash_rule(out, plain, ref, dtype)
    # lse: computed in float32 from the same rounded inputs.
    assert max_err(lse, ref_lse) <= 1e-4 * max(1.0, ref_lse.abs().max().item())


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[7]], ids=["na-110", "na-start-tiled", "per-head"])
def test_head_dims(case, head_dim):
    layout, mask = build(case)
    (q, k, v), _ = poisoned_inputs(1, 3, layout.num_tokens, head_dim, torch.float32, seed=head_dim)
    out = block_sparse_attention(q, k, v, layout, backend="cpu")
    assert_flash_rule(out, masked_attention_reference(q, k, v, mask), truth(q, k, v, mask), torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[7]], ids=["dense", "na", "na-tiled", "per-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_backend_matches_truth(case, dtype):
    layout, mask = build(case)
    (q, k, v), _ = poisoned_inputs(2, 3, layout.num_tokens, 64, dtype, seed=3)
    out = block_sparse_attention(q, k, v, layout, backend="reference")
    assert_flash_rule(out, masked_attention_reference(q, k, v, mask), truth(q, k, v, mask), dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[6], CASES[7]], ids=lambda c: c[0])
def test_gradients_match_truth(case):
    layout, mask = build(case)
    (q, k, v), leaves = poisoned_inputs(2, 3, layout.num_tokens, 64, torch.float32, seed=7, grad=True)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend="cpu")
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen)
    g_lse = torch.randn(lse.shape, generator=gen)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), leaves)

    def dense_grads(dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o, lse_ref = masked_attention_reference(*xs, mask, return_lse=True)
        return torch.autograd.grad((o * g_out.to(dtype)).sum() + (lse_ref.to(dtype) * g_lse.to(dtype)).sum(), xs)

    exact, plain = dense_grads(torch.float64), dense_grads(torch.float32)
    n, d = layout.num_tokens, 64
    for name, g, e, p in zip("qkv", grads, exact, plain):
        assert torch.all(g[..., n:, :] == 0) and torch.all(g[..., d:] == 0), f"d{name} leaked into padding"
        assert_flash_rule(g[..., :n, :d], p, e, torch.float32, what=f"d{name}")


def test_float64_gradcheck_tiny():
    grid = VideoGrid(2, 3, 5, text_tokens=3)  # N = 33: ragged for 16 x 32 tiles
    layouts = [
        Neighborhood(kernel_size=(1, 3, 3)).layout(grid, block_size=32, block_q=16),
        Dense().layout(grid, block_size=32, block_q=16),
    ]
    layout = BlockLayout.stack(layouts)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, grid.num_tokens, 8, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3)
    )
    assert torch.autograd.gradcheck(lambda a, b, c: cpu_block_sparse_attention(a, b, c, layout, 0.3, True), (q, k, v))


def test_lse_is_logsumexp_of_scores():
    grid = VideoGrid(3, 6, 6, text_tokens=9)
    pattern = Neighborhood(kernel_size=(2, 3, 3))
    layout = pattern.layout(grid, block_size=32, tile_shape=(1, 4, 4))
    (q, k, v), _ = poisoned_inputs(1, 2, grid.num_tokens, 64, torch.float32, seed=5)
    scale = 0.2
    _, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend="cpu")
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    expected = torch.logsumexp(scores.masked_fill(~pattern.token_mask(grid), float("-inf")), dim=-1)
    assert max_err(lse, expected) < 1e-5


def handmade_layout_with_empty_rows() -> BlockLayout:
    """N = 100, 32 x 32 tiles: query block 1 visits nothing; block 2 has a partial tile with empty
    rows; block 3 (the ragged one) visits the ragged last key block only, partially."""
    n, b = 100, 32
    tile2 = torch.zeros(1, b, b, dtype=torch.bool)
    tile2[0, : b // 2, 3:9] = True  # rows 16.. of query block 2 see nothing
    tile3 = torch.zeros(1, b, b, dtype=torch.bool)
    tile3[0, :4, :4] = True  # query rows 96..99 see keys 96..99 (keys >= 100 stay 0)
    masks = pack_tile_masks(torch.cat([tile2, tile3]))
    kv_counts = torch.tensor([[2, 0, 1, 1]], dtype=torch.int32)
    kv_indices = torch.tensor([[[0, 2], [0, 0], [1, 0], [3, 0]]], dtype=torch.int32)
    kv_mask_ids = torch.tensor([[[-1, -1], [-1, -1], [0, -1], [1, -1]]], dtype=torch.int32)
    allowed = 32 * 64 + 16 * 6 + 4 * 4
    return BlockLayout(n, b, b, kv_counts, kv_indices, kv_mask_ids, masks, None, (allowed,))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_rows_give_zero_and_finite_gradients(backend):
    layout = handmade_layout_with_empty_rows()
    mask = layout.token_mask()
    empty = ~mask.any(-1)
    assert empty.sum() == 32 + 16  # block 1 and the lower half of block 2
    (q, k, v), leaves = poisoned_inputs(2, 2, 100, 64, torch.float32, seed=11, grad=True)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(lse[:, :, empty] == float("-inf")) and torch.isfinite(lse[:, :, ~empty]).all()
    ref, ref_lse = truth(q, k, v, mask, return_lse=True)
    assert max_err(out, ref) < 1e-5
    assert max_err(lse[:, :, ~empty], ref_lse[:, :, ~empty]) < 1e-5
    grads = torch.autograd.grad(out.sum() + lse[:, :, ~empty].sum(), leaves)
    for g, leaf in zip(grads, leaves):
        assert torch.isfinite(g[..., :100, :64]).all()
    assert torch.all(grads[0][:, :, :100][:, :, empty] == 0)  # no gradient reaches empty queries


def test_empty_rows_fp16_outputs_exact_zero():
    layout = handmade_layout_with_empty_rows()
    (q, k, v), _ = poisoned_inputs(1, 1, 100, 64, torch.float16)
    out = block_sparse_attention(q, k, v, layout, backend="cpu")
    assert torch.all(out[0, 0, 32:64] == 0) and not torch.isnan(out).any()


def test_compaction_drops_masked_columns():
    # The CPU path computes only key columns some query of the block may attend: fewer pairs than
    # the visited tiles for a local window, exactly N keys per (padded) query row for Dense.
    grid = VideoGrid(4, 16, 16)
    local = Neighborhood(kernel_size=(3, 5, 5)).layout(grid, block_size=64)
    assert computed_pairs(local) < local.visited_pairs
    dense = Dense().layout(VideoGrid(3, 5, 7, text_tokens=5), block_size=32)
    assert computed_pairs(dense) == 128 * 110


def test_large_shared_bucket_is_chunked(monkeypatch):
    # A tiny chunk budget forces the batch-head rows to be split too: results must not change.
    import diffattn.kernels.cpu as cpu

    layout, mask = build(CASES[2])
    (q, k, v), _ = poisoned_inputs(2, 3, layout.num_tokens, 64, torch.float32, seed=2)
    before = block_sparse_attention(q, k, v, layout, backend="cpu")
    monkeypatch.setattr(cpu, "_CHUNK_SCORES", 100)
    after = block_sparse_attention(q, k, v, layout, backend="cpu")
    assert max_err(before, after) < 1e-6
    assert max_err(after, truth(q, k, v, mask)) < 1e-5


def test_uncached_bias_path(monkeypatch):
    # Above the bias cache budget the bias is rebuilt per chunk from the packed bits.
    import diffattn.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_BIAS_CACHE_BYTES", 0)
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    layout = pattern.layout(GRID_START, block_size=32, tile_shape=(1, 4, 8))
    (q, k, v), leaves = poisoned_inputs(1, 2, layout.num_tokens, 64, torch.float32, grad=True)
    out = block_sparse_attention(q, k, v, layout, backend="cpu")
    mask = pattern.token_mask(GRID_START)
    assert max_err(out, truth(q, k, v, mask)) < 1e-5
    assert all(g.bias is None for groups in cpu._plan(layout).heads for g in groups)
    out.sum().backward()
    assert torch.isfinite(leaves[0].grad[..., : layout.num_tokens, :64]).all()


def test_scale_default_and_custom():
    layout, mask = build(CASES[2])
    (q, k, v), _ = poisoned_inputs(1, 2, layout.num_tokens, 64, torch.float32, seed=4)
    default = block_sparse_attention(q, k, v, layout, backend="cpu")
    explicit = block_sparse_attention(q, k, v, layout, scale=1 / math.sqrt(64), backend="cpu")
    assert max_err(default, explicit) == 0
    custom = block_sparse_attention(q, k, v, layout, scale=0.05, backend="cpu")
    assert max_err(custom, truth(q, k, v, mask, scale=0.05)) < 1e-5


@pytest.mark.parametrize("threads", [1, 3])
def test_worker_count_does_not_change_results_or_thread_setting(threads):
    # Chunks run on single-threaded workers (inline with 1 thread): same results, and the
    # caller's intra-op thread count is left as it was.
    layout, mask = build(CASES[7])
    (q, k, v), leaves = poisoned_inputs(2, 3, layout.num_tokens, 64, torch.float32, seed=8, grad=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = block_sparse_attention(q, k, v, layout, backend="cpu")
        out.square().sum().backward()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    assert max_err(out, truth(q, k, v, mask)) < 1e-5
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    masked_attention_reference(*ref, mask).square().sum().backward()
    for leaf, r in zip(leaves, ref):
        assert max_err(leaf.grad[..., : layout.num_tokens, :64], r.grad) < 1e-4
