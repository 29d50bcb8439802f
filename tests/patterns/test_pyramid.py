"""PyramidSparse (issue 25 items 1-2): level assignment against a brute-force reading of the
issue's rules, determinism, per-head plans, dense text, mass mode, min_full, full coverage, bad input."""

import math

import pytest
import torch

import diffattn
from diffattn import PyramidSparse, SparsityConfig, UserError, VideoGrid
from diffattn.patterns.pyramid import block_importance, level_shares, tile_levels


def _qk(grid, heads=2, dim=16, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, grid.num_tokens, dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _brute_force_levels(importance, pattern, text_q, text_k):
    """Per row, plain Python: rank key blocks (importance descending, ties by index), then walk the
    ranking with the issue's rules."""
    heads, num_q, num_k = importance.shape
    shares = pattern.shares
    out = torch.zeros(heads, num_q, num_k, dtype=torch.int32)
    for h in range(heads):
        for qb in range(num_q):
            row = importance[h, qb].tolist()
            ranking = sorted(range(num_k), key=lambda j: (-row[j], j))
            min_count = math.ceil(pattern.min_full * num_k - 1e-9)
            if pattern.mode == "topk":
                ends, total = [], 0.0
                for level in (1, 2, 4, 8):
                    total += shares[level]
                    ends.append(math.ceil(total * num_k - 1e-9))
                ends[0] = max(ends[0], min_count)
                for i in range(1, 4):
                    ends[i] = max(ends[i], ends[i - 1])
                for rank, j in enumerate(ranking):
                    level = next((lv for lv, end in zip((1, 2, 4, 8), ends) if rank < end), 0)
                    out[h, qb, j] = level
            else:
                mass_before = 0.0
                for rank, j in enumerate(ranking):
                    total, level = 0.0, 0
                    for lv in (1, 2, 4, 8):
                        total += shares[lv]
                        if shares[lv] > 0 and (mass_before < total or total >= 1 - 1e-9):
                            level = lv
                            break
                    if rank < min_count:
                        level = 1
                    out[h, qb, j] = level
                    mass_before += row[j]
            if text_q[qb]:
                out[h, qb, :] = 1
    out[:, :, text_k] = 1
    return out


def _plan_levels(pattern, grid, q, k, block):
    layout = pattern.plan(q, k, grid, block_size=block)
    return layout, tile_levels(layout)


PATTERNS = [
    PyramidSparse(),
    PyramidSparse(levels={1: 0.2, 4: 0.3}, min_full=0.0),
    PyramidSparse(levels={2: 0.5, 8: 0.25}, min_full=0.3),
    PyramidSparse(levels={1: 0.3, 2: 0.2, 8: 0.2}, mode="mass", min_full=0.0),
    PyramidSparse(levels={1: 0.5, 8: 0.4}, mode="mass", min_full=0.25),
    PyramidSparse(levels={1: 0.1, 2: 0.2, 4: 0.3, 8: 0.4}, mode="mass"),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("grid", [VideoGrid(3, 8, 12), VideoGrid(2, 6, 10, text_tokens=40),
                                  VideoGrid(2, 5, 9, text_tokens=7, text_position="start")], ids=repr)
def test_levels_match_the_brute_force_reading_of_the_rules(pattern, grid):
    q, k = _qk(grid, heads=3, batch=2)
    layout, levels = _plan_levels(pattern, grid, q, k, 32)
    importance = block_importance(q, k, 32, 32)
    text = torch.nn.functional.pad(grid.video_index_of(torch.arange(grid.num_tokens)) < 0,
                                   (0, -(-grid.num_tokens // 32) * 32 - grid.num_tokens)).view(-1, 32).any(1)
    assert torch.equal(levels, _brute_force_levels(importance, pattern, text, text))
    # Every tile full and listed ascending; the pairs counted are those of the visited tiles.
    assert layout.num_partial_tiles == 0 and layout.num_heads == 3
    for h in range(3):
        for qb in range(layout.num_q_blocks):
            listed = layout.kv_indices[h, qb, : layout.kv_counts[h, qb]].tolist()
            assert listed == sorted(listed) == levels[h, qb].nonzero().flatten().tolist()


def test_block_importance_is_the_softmax_of_block_mean_logits():
    grid = VideoGrid(1, 5, 19)  # 95 tokens: the last block of 32 is short
    q, k = _qk(grid, heads=2, dim=8, batch=2)
    expected = torch.zeros(2, 3, 3, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for qb in range(3):
                qm = q[b, h, qb * 32 : qb * 32 + 32].double().mean(0)
                logits = torch.stack([qm @ k[b, h, j * 32 : j * 32 + 32].double().mean(0) for j in range(3)])
                expected[h, qb] += (logits / math.sqrt(8)).softmax(0) / 2
    assert torch.allclose(block_importance(q, k, 32, 32).double(), expected, atol=1e-6)


def test_sampled_max_estimate_follows_its_definition():
    grid = VideoGrid(1, 4, 16)
    q, k = _qk(grid, heads=1, dim=8)
    scores = (q[0, 0, ::4] @ k[0, 0, ::4].T / math.sqrt(8)).double()  # sampled rows x sampled keys
    per_block = torch.stack([scores[:, j * 8 : j * 8 + 8].amax(1) for j in range(2)], 1)
    relative = (per_block - per_block.amax(1, keepdim=True)).exp()
    expected = torch.stack([relative[i * 8 : i * 8 + 8].amax(0) for i in range(2)])
    expected = expected / expected.sum(1, keepdim=True)
    got = block_importance(q, k, 32, 32, estimate="sampled-max")[0].double()
    assert torch.allclose(got, expected, atol=1e-6)


def test_plans_are_deterministic_and_per_head():
    grid = VideoGrid(4, 8, 8)
    q, k = _qk(grid, heads=2)
    pattern = PyramidSparse(levels={1: 0.25, 2: 0.25}, min_full=0)
    first, second = pattern.plan(q, k, grid, block_size=32), pattern.plan(q.clone(), k.clone(), grid, block_size=32)
    assert torch.equal(first.kv_indices, second.kv_indices) and torch.equal(first.kv_levels, second.kv_levels)
    # Head 1 alone gets head 1's plan; heads differ from each other.
    alone = pattern.plan(q[:, 1:], k[:, 1:], grid, block_size=32)
    assert torch.equal(tile_levels(alone)[0], tile_levels(first)[1])
    assert not torch.equal(tile_levels(first)[0], tile_levels(first)[1])


def test_the_most_important_block_is_full():
    grid = VideoGrid(1, 8, 16)  # 4 blocks of 32
    q = torch.zeros(1, 1, 128, 4)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 128, 4)
    k[:, :, 64:96, 0] = 10  # key block 2 dominates every query block
    levels = tile_levels(PyramidSparse(levels={1: 0.25, 8: 0.25}, min_full=0).plan(q, k, grid, block_size=32))
    assert levels[0, :, 2].tolist() == [1, 1, 1, 1]
    assert (levels[0] == 8).sum(1).tolist() == [1, 1, 1, 1]


def test_text_stays_dense_in_both_directions():
    grid = VideoGrid(2, 8, 8, text_tokens=32)  # text = the last block of 32
    q, k = _qk(grid)
    levels = tile_levels(PyramidSparse(levels={8: 0.1}, min_full=0).plan(q, k, grid, block_size=32))
    assert (levels[:, -1, :] == 1).all() and (levels[:, :, -1] == 1).all()
    assert set(levels[:, :-1, :-1].unique().tolist()) == {0, 8}


def test_shares_summing_to_one_visit_every_block_in_both_modes():
    grid = VideoGrid(3, 8, 10)
    q, k = _qk(grid, heads=2)
    for pattern in (PyramidSparse(levels={1: 0.3, 2: 0.3, 4: 0.2, 8: 0.2}, min_full=0),
                    PyramidSparse(levels={1: 0.1, 8: 0.9}, mode="mass", min_full=0)):
        layout = pattern.plan(q * 30, k * 30, grid, block_size=32)  # sharp: most blocks carry ~0 mass
        assert layout.density == 1.0 and level_shares(layout)[0] == 0.0


def test_mass_mode_follows_the_mass_not_the_count():
    grid = VideoGrid(1, 8, 16)
    q = torch.zeros(1, 1, 128, 4)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 128, 4)
    k[:, :, :32, 0] = 20  # one key block holds nearly all the mass
    mass = tile_levels(PyramidSparse(levels={1: 0.9}, mode="mass", min_full=0).plan(q, k, grid, block_size=32))
    assert (mass[0] > 0).sum(1).tolist() == [1, 1, 1, 1]
    flat = torch.zeros_like(k)  # equal importance: 0.6 of the mass needs 3 of 4 blocks
    even = tile_levels(PyramidSparse(levels={1: 0.6}, mode="mass", min_full=0).plan(q, flat, grid, block_size=32))
    assert (even[0] > 0).sum(1).tolist() == [3, 3, 3, 3]


def test_min_full_raises_the_full_share_and_pushes_the_other_levels_down():
    grid = VideoGrid(1, 16, 20)  # 10 key blocks of 32
    q, k = _qk(grid, heads=1)
    levels = tile_levels(PyramidSparse(levels={1: 0.1, 2: 0.2}, min_full=0.3).plan(q, k, grid, block_size=32))
    assert (levels == 1).sum(-1).unique().tolist() == [3] and (levels == 2).sum(-1).unique().tolist() == [0]


def test_tile_shape_plans_in_kernel_order():
    grid = VideoGrid(2, 8, 8)
    q, k = _qk(grid)
    layout = PyramidSparse().plan(q, k, grid, block_size=32, tile_shape=(1, 4, 8))
    perm = layout.permutation
    direct = PyramidSparse().plan(q[:, :, perm], k[:, :, perm], grid, block_size=32)
    assert torch.equal(tile_levels(layout), tile_levels(direct))


def test_static_forms_refuse_and_point_at_plan():
    pattern = PyramidSparse()
    for call in (lambda: pattern.layout(VideoGrid(1, 4, 4)), lambda: pattern.token_mask(VideoGrid(1, 4, 4))):
        with pytest.raises(UserError, match=r"dynamic.*plan\(q, k, grid"):
            call()
    assert SparsityConfig(pattern=pattern).pattern is pattern  # usable in a config
    assert diffattn.PyramidSparse is PyramidSparse and hash(pattern) == hash(PyramidSparse())


@pytest.mark.parametrize("kwargs, named", [
    (dict(levels={1: -0.1}), "-0.1"),
    (dict(levels={1: 0.6, 8: 0.5}), "sum to 1.1"),
    (dict(levels={3: 0.1}), "level 3"),
    (dict(levels={1: float("nan")}), "nan"),
    (dict(levels=[0.1]), "[0.1]"),
    (dict(mode="energy"), "'energy'"),
    (dict(min_full=1.5), "1.5"),
    (dict(levels={}, min_full=0), "visits no key block"),
    (dict(estimate="random"), "'random'"),
])
def test_bad_settings_name_the_value(kwargs, named):
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")):
        PyramidSparse(**kwargs)


def test_bad_plan_inputs_name_the_value():
    grid = VideoGrid(2, 4, 8)
    q, k = _qk(grid)
    pattern = PyramidSparse()
    with pytest.raises(UserError, match="N=64 .* has 96"):
        pattern.plan(q, k, VideoGrid(3, 4, 8), block_size=32)
    with pytest.raises(UserError, match="q with N=64 and k with N=32"):
        pattern.plan(q, k[:, :, :32], grid, block_size=32)
    with pytest.raises(UserError, match="block_size must be one of"):
        pattern.plan(q, k, grid, block_size=48)
    with pytest.raises(UserError, match=r"\[B, H, N, D\]"):
        pattern.plan(q[0], k[0], grid, block_size=32)
