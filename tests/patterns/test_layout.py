import pytest
import torch

from diffattn import BlockLayout, Dense, Neighborhood, Radial, VideoGrid
from diffattn.errors import UserError

from .reference_rows import layout_rows, layout_rows_in_caller_order, reference_rows

GRIDS = [
    VideoGrid(3, 5, 7, text_tokens=5),  # N = 110: not a block multiple
    VideoGrid(4, 6, 10, text_tokens=7, text_position="start"),  # N = 247
    VideoGrid(5, 9, 8),  # N = 360, no text
]
PATTERNS = [
    (Dense(), None),
    (Neighborhood(kernel_size=(3, 3, 5)), None),
    (Neighborhood(kernel_size=(2, 4, 3), stride=(1, 2, 3), dilation=(1, 1, 2), causal=(True, False, False)), None),
    (Neighborhood(kernel_size=(3, 3, 5)), (1, 4, 8)),
    (Neighborhood(kernel_size=(3, 3, 3), causal=(True, True, False)), (2, 3, 4)),
    (Dense(), (2, 2, 2)),
    (Radial(block_size=32), None),
    (Radial(block_size=64, decay=0.5), None),
]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("pattern, tile_shape", PATTERNS, ids=lambda x: repr(x)[:40])
@pytest.mark.parametrize("block_q, block_k", [(64, 64), (128, 128), (32, 64), (64, 32)])
def test_layout_round_trips_to_the_token_mask(grid, pattern, tile_shape, block_q, block_k):
    layout = pattern.layout(grid, block_q=block_q, block_k=block_k, tile_shape=tile_shape)
    expected = pattern.token_mask(grid)
    assert torch.equal(layout.token_mask(), expected)
    assert layout.density == pytest.approx(expected.double().mean().item(), abs=1e-12)
    assert layout.visited_pairs >= layout.allowed_pairs[0]


def test_layout_structure_invariants():
    grid = VideoGrid(4, 6, 10, text_tokens=7)
    layout = Neighborhood(kernel_size=(3, 3, 5)).layout(grid, block_size=32, tile_shape=(1, 4, 8))
    n, bq, bk = grid.num_tokens, layout.block_q, layout.block_k
    tensors = (layout.kv_counts, layout.kv_indices, layout.kv_mask_ids, layout.masks)
    assert all(t.dtype == torch.int32 for t in tensors)
    assert layout.kv_counts.shape == (1, -(-n // bq))
    for qb in range(layout.num_q_blocks):
        row = layout.kv_indices[0, qb, : layout.kv_counts[0, qb]].tolist()
        assert row == sorted(set(row))
    # Bits for keys beyond N are zero in every packed mask.
    tiles = layout.tile_masks(torch.arange(layout.num_masks))
    last_k_block = layout.kv_indices[0][layout.kv_mask_ids[0] >= 0]
    ids = layout.kv_mask_ids[0][layout.kv_mask_ids[0] >= 0]
    for mask_id, kb in zip(ids.tolist(), last_k_block.tolist()):
        beyond = torch.arange(bk) + kb * bk >= n
        assert not tiles[mask_id][:, beyond].any()
    # The permutation is a permutation, and permute/unpermute are inverse.
    assert sorted(layout.permutation.tolist()) == list(range(n))
    x = torch.randn(2, 3, n, 4)
    assert torch.equal(layout.unpermute_tokens(layout.permute_tokens(x)), x)


def test_transposed_lists_the_same_tiles():
    grid = VideoGrid(5, 9, 8, text_tokens=3)
    layout = Neighborhood(kernel_size=(3, 5, 3), stride=(1, 2, 1)).layout(grid, block_q=32, block_k=64)
    q_counts, q_indices, q_mask_ids = layout.transposed
    forward = set()
    for qb in range(layout.num_q_blocks):
        for slot in range(layout.kv_counts[0, qb]):
            forward.add((qb, int(layout.kv_indices[0, qb, slot]), int(layout.kv_mask_ids[0, qb, slot])))
    backward = set()
    for kb in range(layout.num_k_blocks):
        row = q_indices[0, kb, : q_counts[0, kb]].tolist()
        assert row == sorted(row)
        for slot in range(q_counts[0, kb]):
            backward.add((int(q_indices[0, kb, slot]), kb, int(q_mask_ids[0, kb, slot])))
    assert forward == backward


def test_per_head_layout_from_stack():
    grid = VideoGrid(3, 5, 7, text_tokens=5)
    patterns = [Dense(), Neighborhood(kernel_size=(1, 3, 3)), Radial(block_size=32)]
    layouts = [p.layout(grid, block_size=32) for p in patterns]
    stacked = BlockLayout.stack(layouts)
    assert stacked.num_heads == 3
    masks = stacked.token_mask()
    for head, pattern in enumerate(patterns):
        assert torch.equal(masks[head], pattern.token_mask(grid))
    assert stacked.density == pytest.approx(sum(lay.density for lay in layouts) / 3)


def test_stack_refuses_mismatched_layouts():
    grid = VideoGrid(3, 5, 7)
    with pytest.raises(UserError, match="must match"):
        BlockLayout.stack([Dense().layout(grid, 32), Dense().layout(grid, 64)])
    with pytest.raises(UserError, match="permutation"):
        p = Neighborhood(kernel_size=3)
        BlockLayout.stack([p.layout(grid, 32), p.layout(grid, 32, tile_shape=(1, 5, 7))])
    with pytest.raises(UserError, match="non-empty"):
        BlockLayout.stack([])


def test_layouts_are_cached_per_grid_and_block_size():
    pattern = Neighborhood(kernel_size=(3, 3, 3))
    a = pattern.layout(VideoGrid(4, 8, 8), block_size=64)
    assert pattern.layout(VideoGrid(4, 8, 8), block_size=64) is a
    assert Neighborhood(kernel_size=3).layout(VideoGrid(4, 8, 8), block_size=64) is a  # equal patterns share
    other_grid = pattern.layout(VideoGrid(4, 8, 10), block_size=64)
    assert other_grid is not a and other_grid.num_tokens == 320
    assert pattern.layout(VideoGrid(4, 8, 8), block_size=32) is not a


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(block_size=100), "block_size"),
        (dict(block_q=100), "block_q"),
        (dict(block_q=64, block_k=16), "block_k"),
        (dict(tile_shape=(1, 0, 4)), r"tile_shape\[h\]"),
        (dict(tile_shape=(1, 4)), "tile_shape"),
    ],
)
def test_bad_layout_arguments(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Neighborhood(kernel_size=3).layout(VideoGrid(4, 8, 8), **kwargs)


def test_token_mask_refuses_real_sizes():
    with pytest.raises(UserError, match="N=32760"):
        Dense().token_mask(VideoGrid(21, 30, 52))


def test_identical_masks_are_stored_once():
    grid = VideoGrid(6, 20, 36, text_tokens=9)
    layout = Neighborhood(kernel_size=(None, 7, 11)).layout(grid, block_size=64, tile_shape=(1, 4, 16))
    assert torch.equal(layout.token_mask(), Neighborhood(kernel_size=(None, 7, 11)).token_mask(grid))
    flat = layout.masks.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == layout.num_masks  # no mask stored twice
    assert layout.num_masks * 4 < layout.num_partial_tiles  # and far fewer than the tiles
    used = layout.kv_mask_ids[layout.kv_mask_ids >= 0].unique()
    assert torch.equal(used, torch.arange(layout.num_masks, dtype=torch.int32))  # every stored mask is used
    assert layout.nbytes == sum(
        t.nbytes for t in (layout.kv_counts, layout.kv_indices, layout.kv_mask_ids, layout.masks, layout.permutation)
    )


def test_hunyuan_720p_freeswim_window_layout_is_lean():
    # Issue 24: this layout held 579k partial tiles, one 2 KiB mask each (1.1 GB).
    grid = VideoGrid(33, 45, 80, text_tokens=256)
    pattern = Neighborhood(kernel_size=(None, 23, 41))
    layout = pattern.layout(grid, block_size=128, tile_shape=(1, 8, 16))
    assert layout.num_partial_tiles > 500_000 and layout.nbytes < 64 * 2**20
    tokens = [0, 4321, 60_000, grid.video_tokens - 1, grid.num_tokens - 1]
    assert torch.equal(layout_rows_in_caller_order(layout, tokens), reference_rows(pattern, grid, tokens))


def test_large_layout_without_dense_mask():
    # Wan2.1 480p: built from closed-form counts; spot-check rows against the element rule.
    grid = VideoGrid(21, 30, 52)
    pattern = Neighborhood(kernel_size=(3, 7, 7))
    layout = pattern.layout(grid, block_size=128)
    rows = torch.tensor([0, 777, 16000, 32759])
    cols = torch.arange(grid.num_tokens)
    expected = pattern.video_allowed(grid, rows[:, None], cols[None, :])
    assert torch.equal(layout_rows(layout, rows.tolist()), expected)
    # A separable rule's pair count is the product of its per-axis counts (Kronecker product).
    per_axis = [int(table.sum()) for table in pattern.axis_tables(grid)]
    assert layout.allowed_pairs[0] == per_axis[0] * per_axis[1] * per_axis[2]


# ---------------------------------------------------------------------------------- pooling levels (PSA)
POOL_GRID = VideoGrid(3, 5, 7, text_tokens=5)  # N = 110: a ragged last block


def pooled_on_full_tiles(layout: BlockLayout) -> BlockLayout:
    """``layout`` with levels 2, 4, 8, 1, 2, ... on its full tiles in slot order (partial tiles: 1)."""
    cycle = torch.tensor([2, 4, 8, 1], dtype=torch.int32)[torch.arange(layout.kv_indices.numel()) % 4]
    levels = torch.where(layout.kv_mask_ids == -1, cycle.view(layout.kv_indices.shape), 1)
    return layout.with_levels(levels.to(torch.int32))


def test_levels_are_validated_with_the_value_named():
    layout = Dense().layout(POOL_GRID, block_size=32)
    with pytest.raises(UserError, match="level 3"):
        layout.with_levels(torch.full_like(layout.kv_indices, 3))
    with pytest.raises(UserError, match=r"shape \(1, 4\)"):
        layout.with_levels(torch.ones(1, 4, dtype=torch.int32))
    with pytest.raises(UserError, match="int32"):
        layout.with_levels(torch.ones_like(layout.kv_indices, dtype=torch.int64))
    partial = Neighborhood(kernel_size=(1, 3, 3)).layout(POOL_GRID, block_size=32)
    with pytest.raises(UserError, match="element mask"):
        partial.with_levels(torch.where(partial.kv_mask_ids >= 0, 2, 1).to(torch.int32))
    # Slots past kv_counts are never read, whatever they hold.
    past = torch.arange(partial.max_kv_blocks) >= partial.kv_counts[..., None]
    ok = partial.with_levels(torch.where(past, 3, 1).to(torch.int32))
    assert not ok.is_pooled and ok.tiles_per_level == {1: partial.num_visited_tiles}


def test_effective_density_counts_a_level_p_tile_as_one_pth():
    layout = BlockLayout.stack([pooled_on_full_tiles(Dense().layout(POOL_GRID, block_size=32)),
                                Neighborhood(kernel_size=(1, 3, 3)).layout(POOL_GRID, block_size=32)])
    levels = layout.kv_levels.double()
    valid = torch.arange(layout.max_kv_blocks) < layout.kv_counts[..., None]
    n = POOL_GRID.num_tokens
    rows = torch.tensor([min(32, n - 32 * i) for i in range(layout.num_q_blocks)], dtype=torch.float64)
    cols = rows  # block_q == block_k
    area = rows[None, :, None] * cols[layout.kv_indices.long()] * valid / levels
    expected = float(area.sum()) / layout.num_heads / POOL_GRID.num_tokens**2
    assert layout.effective_tile_density == pytest.approx(expected, rel=1e-12)
    assert layout.effective_tile_density < layout.tile_density
    assert sum(layout.tiles_per_level.values()) == layout.num_visited_tiles


def test_stack_carries_levels_and_fills_missing_ones_with_one():
    pooled = pooled_on_full_tiles(Dense().layout(POOL_GRID, block_size=32))
    plain = Neighborhood(kernel_size=(1, 3, 3)).layout(POOL_GRID, block_size=32)
    both = BlockLayout.stack([plain, pooled])
    assert both.kv_levels is not None and both.kv_levels.shape == both.kv_indices.shape
    assert bool((both.kv_levels[0] == 1).all())
    width = pooled.max_kv_blocks
    assert torch.equal(both.kv_levels[1, :, :width], pooled.kv_levels[0])
    assert BlockLayout.stack([plain, plain]).kv_levels is None
    assert torch.equal(both.select_heads(1, 2).kv_levels, both.kv_levels[1:2])
