"""Pooled tiles (``BlockLayout.kv_levels``, PSA): every backend runs exactly the reference's math.

The reference (:func:`diffattn.kernels.reference.pooled_attention_reference`) is itself checked
against a per-row brute force written here from the issue's definition, and against dense SDPA
on keys that are equal within each group (where a level-p tile must equal the full tile).
Triton runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py), fp32 and fp16 only.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffattn import BlockLayout, Dense, Neighborhood, VideoGrid
from diffattn.kernels import block_sparse_attention
from diffattn.kernels.reference import pooled_attention_reference

GRID = VideoGrid(3, 5, 7, text_tokens=5)  # N = 110: ragged last block, short last groups
PERMUTED_GRID = VideoGrid(2, 8, 8, text_tokens=5)  # N = 133: full and partial tiles after tiling
LEVELS = (1, 2, 4, 8)


def with_random_levels(layout: BlockLayout, seed: int, choices: tuple[int, ...] = LEVELS) -> BlockLayout:
    """``layout`` with a random level on every full tile (partial tiles stay at level 1)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.tensor(choices, dtype=torch.int32)[torch.randint(len(choices), layout.kv_indices.shape, generator=gen)]
    return layout.with_levels(torch.where(layout.kv_mask_ids == -1, pick, 1).to(torch.int32))


def layouts(kind: str, block: int = 32) -> BlockLayout:
    if kind == "dense":
        return with_random_levels(Dense().layout(GRID, block_size=block), 1)
    if kind == "dense64":  # 64-key blocks: the kernels' wider pooled chunks
        return with_random_levels(Dense().layout(GRID, block_q=32, block_k=64), 4)
    if kind == "permuted":  # partial tiles, a permutation, pooled full tiles
        lay = Neighborhood(kernel_size=(3, 5, 5)).layout(PERMUTED_GRID, block_size=block, tile_shape=(1, 4, 8))
        return with_random_levels(lay, 2)
    if kind == "per_head":
        a = with_random_levels(Dense().layout(GRID, block_size=block), 3)
        b = Neighborhood(kernel_size=(1, 3, 3)).layout(GRID, block_size=block)  # no levels: all 1
        return BlockLayout.stack([a, b])
    raise AssertionError(kind)


def qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3)]


def brute_force_row(q_row, k, v, layout: BlockLayout, head: int, row: int, scale: float) -> torch.Tensor:
    """Output of kernel-order query ``row`` from the issue's definition, one key at a time (float64)."""
    n, bq, bk = layout.num_tokens, layout.block_q, layout.block_k
    h = head if layout.num_heads > 1 else 0
    qb = row // bq
    logits, values = [], []
    for slot in range(int(layout.kv_counts[h, qb])):
        kb = int(layout.kv_indices[h, qb, slot])
        level = 1 if layout.kv_levels is None else int(layout.kv_levels[h, qb, slot])
        start, stop = kb * bk, min(kb * bk + bk, n)
        if level == 1:
            allowed = layout.tile_masks(layout.kv_mask_ids[h, qb, slot : slot + 1])[0, row - qb * bq]
            for j in range(start, stop):
                if allowed[j - start]:
                    logits.append(scale * float(q_row @ k[j]))
                    values.append(v[j])
        else:
            for g0 in range(start, stop, level):
                g1 = min(g0 + level, stop)
                logits.append(scale * float(q_row @ k[g0:g1].mean(0)) + math.log(g1 - g0))
                values.append(v[g0:g1].mean(0))
    if not logits:
        return torch.zeros_like(q_row)
    weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    return (weights[:, None] * torch.stack(values)).sum(0)


# ---------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("kind", ["dense", "permuted", "per_head"])
def test_reference_matches_a_per_row_brute_force(kind):
    layout = layouts(kind)
    n = layout.num_tokens
    q, k, v = qkv(1, 2, n, 8, torch.float64)
    out = pooled_attention_reference(q, k, v, layout, scale=0.3)
    qk, kk, vk = (layout.permute_tokens(x) for x in (q, k, v))
    ok = layout.permute_tokens(out)
    for head in range(2):
        for row in (0, 31, 50, 97, n - 1):
            want = brute_force_row(qk[0, head, row], kk[0, head], vk[0, head], layout, head, row, 0.3)
            torch.testing.assert_close(ok[0, head, row], want, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------- every backend
BACKEND_NAMES = ["cpu", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(backend: str, q, k, v, layout, grad_out, grad_lse):
    """Forward (out, lse) and the gradients of q, k, v for ``sum(out * grad_out) + sum(lse * grad_lse)``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if backend == "float64":  # the reference's math on float64 inputs (the dispatcher refuses float64)
        out, lse = pooled_attention_reference(q, k, v, layout, return_lse=True)
    else:
        out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    finite = torch.isfinite(lse)
    loss = (out.float() * grad_out).sum() + (torch.where(finite, lse, 0.0) * grad_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return [x.detach().float() for x in (out, torch.where(finite, lse, 0.0), *grads)]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "permuted", "per_head", "dense64"])
def test_backend_equals_the_reference_forward_and_backward(backend, dtype, kind):
    layout = layouts(kind).to(DEVICE)
    n, heads = layout.num_tokens, 2 if kind == "per_head" else 1  # the interpreter is slow: B=2 only
    q, k, v = (x.to(DEVICE) for x in qkv(2, heads, n, 16, dtype, seed=7))
    gen = torch.Generator().manual_seed(8)
    grad_out = torch.randn(2, heads, n, 16, generator=gen).to(DEVICE)
    grad_lse = torch.randn(2, heads, n, generator=gen).to(DEVICE)
    got = run(backend, q, k, v, layout, grad_out, grad_lse)
    names = ["out", "lse", "dq", "dk", "dv"]
    if dtype == torch.float32:
        want = run("reference", q, k, v, layout, grad_out, grad_lse)
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    # flash-attention rule: error vs an exact reference <= 2x plain PyTorch's error in dtype + floor
    exact = run("float64", q.double(), k.double(), v.double(), layout, grad_out.double(), grad_lse.double())
    plain = run("reference", q, k, v, layout, grad_out, grad_lse)
    for name, a, p, e in zip(names, got, plain, exact):
        e = e.float()
        floor = 1e-3 * float(e.abs().max()) + 1e-5
        assert float((a - e).abs().max()) <= 2 * float((p - e).abs().max()) + floor, name


@pytest.mark.parametrize("backend", ["reference"] + BACKEND_NAMES)
@pytest.mark.parametrize("kind", ["dense", "permuted", "per_head"])
def test_equal_keys_in_each_group_give_exactly_the_full_tile(backend, kind):
    """The issue's exactness test: pooling changes nothing when a group's keys and values are equal."""
    pooled = layouts(kind).to(DEVICE)
    static = pooled.with_levels(None)
    n = pooled.num_tokens
    gen = torch.Generator().manual_seed(11)
    # Equal within every aligned group of 8 in kernel order (so within every group of 2 and 4).
    base = [torch.randn(2, 2, -(-n // 8), 16, generator=gen) for _ in range(2)]
    k, v = (pooled.unpermute_tokens(x.repeat_interleave(8, dim=2)[:, :, :n].to(DEVICE)) for x in base)
    q = torch.randn(2, 2, n, 16, generator=gen).to(DEVICE)
    out = block_sparse_attention(q, k, v, pooled, backend=backend)
    mask = static.token_mask()  # [N, N] or [H, N, N]: broadcasts against [B, H, N, N] either way
    oracle = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, oracle, atol=2e-5, rtol=1e-5)


def pooled_keys_per_query_block(layout: BlockLayout, min_level: int = 1) -> torch.Tensor:
    """int64 ``[Hl, Mq]``: the keys a pooled kernel scores per query block (a level-p tile: one per
    group), counting tiles of level >= ``min_level``."""
    n, bk = layout.num_tokens, layout.block_k
    out = torch.zeros(layout.kv_counts.shape, dtype=torch.int64)
    for h, qb in torch.cartesian_prod(torch.arange(layout.num_heads), torch.arange(layout.num_q_blocks)).tolist():
        for slot in range(int(layout.kv_counts[h, qb])):
            kb, level = int(layout.kv_indices[h, qb, slot]), int(layout.kv_levels[h, qb, slot])
            if level >= min_level:
                    out[h, qb] += -(-(min(n, kb * bk + bk) - kb * bk) // level)
    return out


@pytest.mark.parametrize("kind", ["dense", "per_head", "dense64"])
def test_a_level_p_tile_costs_one_pth(kind):
    from diffattn.kernels.cpu import computed_pairs

    layout = layouts(kind)
    keys = pooled_keys_per_query_block(layout)
    bq = layout.block_q
    rows = torch.tensor([min(bq, layout.num_tokens - bq * i) for i in range(layout.num_q_blocks)])
    if layout.num_partial_tiles == 0:  # the CPU path pads partial buckets' key lists to 32
        assert computed_pairs(layout) == int((keys * layout.block_q).sum()) // layout.num_heads
    assert (keys * rows).sum() / layout.num_heads / layout.num_tokens**2 <= layout.effective_tile_density + 0.02
    triton_attention = pytest.importorskip("diffattn.kernels.triton_attention")
    # Triton: each query block gathers exactly its pooled tiles' group means.
    pool = triton_attention._kernel_layout(layout, torch.device("cpu")).pool
    assert torch.equal(pool.count.long(), pooled_keys_per_query_block(layout, min_level=2))


def test_static_levels_run_exactly_as_without_levels():
    static = Neighborhood(kernel_size=(3, 5, 5)).layout(PERMUTED_GRID, block_size=32, tile_shape=(1, 4, 8))
    ones = static.with_levels(torch.ones_like(static.kv_indices))
    q, k, v = qkv(1, 2, static.num_tokens, 16)
    for backend in ["reference", "cpu"]:
        assert torch.equal(block_sparse_attention(q, k, v, ones, backend=backend),
                           block_sparse_attention(q, k, v, static, backend=backend))


def test_cpu_bias_rebuilt_per_chunk_keeps_the_log_sizes(monkeypatch):
    """Above its budget the CPU path rebuilds partial-tile biases per chunk: the pooled keys'
    log sizes must be added there too."""
    import diffattn.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_BIAS_CACHE_BYTES", 0)
    layout = layouts("permuted")
    q, k, v = qkv(2, 1, layout.num_tokens, 16, seed=3)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="cpu"),
                               block_sparse_attention(q, k, v, layout, backend="reference"), atol=1e-5, rtol=1e-5)
