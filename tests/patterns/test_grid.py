import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn import VideoGrid
from diffattn.errors import UserError
from diffattn.patterns import VideoOrder


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(frames=0, height=4, width=4), "frames"),
        (dict(frames=2, height=-1, width=4), "height"),
        (dict(frames=2, height=4, width=2.5), "width"),
        (dict(frames=2, height=4, width=4, text_tokens=-3), "text_tokens"),
        (dict(frames=2, height=4, width=4, text_position="middle"), "text_position"),
        (dict(frames=True, height=4, width=4), "frames"),
    ],
)
def test_bad_grid_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(UserError, match=field):
        VideoGrid(**kwargs)


def test_grid_sizes_and_offsets():
    grid = VideoGrid(21, 30, 52)
    assert grid.num_tokens == 32760 and grid.tokens_per_frame == 1560
    start = VideoGrid(2, 3, 4, text_tokens=5, text_position="start")
    idx = start.video_index_of(torch.arange(start.num_tokens))
    assert idx[:5].tolist() == [-1] * 5 and idx[5:].tolist() == list(range(24))
    end = VideoGrid(2, 3, 4, text_tokens=5)
    assert end.video_index_of(torch.arange(end.num_tokens))[24:].tolist() == [-1] * 5


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)),
    tile=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))),
)
def test_prefix_boxes_are_exactly_the_first_tokens_of_the_order(shape, tile):
    grid = VideoGrid(*shape)
    order = VideoOrder(grid, tile)
    raster = order.raster_index()
    assert sorted(raster.tolist()) == list(range(grid.video_tokens))  # a permutation
    prefixes = torch.arange(grid.video_tokens + 1)
    boxes = order.prefix_boxes(prefixes)
    t, h, w = grid.coordinates(torch.arange(grid.video_tokens))
    for x in prefixes.tolist():
        covered = torch.zeros(grid.video_tokens, dtype=torch.int64)
        for lo_hi in boxes[x]:
            inside = (
                (t >= lo_hi[0, 0]) & (t < lo_hi[0, 1]) & (h >= lo_hi[1, 0]) & (h < lo_hi[1, 1])
                & (w >= lo_hi[2, 0]) & (w < lo_hi[2, 1])
            )
            covered += inside.long()
        expected = torch.zeros(grid.video_tokens, dtype=torch.int64)
        expected[raster[:x]] = 1
        assert torch.equal(covered, expected), (x, boxes[x])


def test_tile_major_order_keeps_tiles_contiguous():
    grid = VideoGrid(2, 4, 4)
    raster = VideoOrder(grid, (1, 2, 2)).raster_index()
    t, h, w = grid.coordinates(raster)
    first_tile = set(zip(t[:4].tolist(), h[:4].tolist(), w[:4].tolist()))
    assert first_tile == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)}
