import math

import pytest
import torch

from diffattn import Radial, VideoGrid
from diffattn.errors import UserError


def ideal_token_rule(grid: VideoGrid, pattern: Radial) -> torch.Tensor:
    """The unquantised rule at token level, written straight from the definition."""
    tpf = grid.tokens_per_frame
    v = torch.arange(grid.video_tokens)
    frame, pos = v // tpf, v % tpf
    d = (frame[:, None] - frame[None, :]).abs()
    mask = torch.zeros(grid.video_tokens, grid.video_tokens, dtype=torch.bool)
    top = 2 ** tpf.bit_length()
    for dist in range(grid.frames):
        pair = d == dist
        if dist <= pattern.dense_frame_distance:
            mask |= pair
            continue
        band = top / 2 ** dist.bit_length() * pattern.decay
        if band >= pattern.block_size:
            near = (pos[:, None] - pos[None, :]).abs() <= band
            mask |= pair & near
        elif dist % math.floor(pattern.block_size / band) == 0:
            near = (pos[:, None] - pos[None, :]).abs() <= pattern.block_size
            mask |= pair & near
    mask |= (frame < pattern.sink_frames)[None, :]
    return mask


def quantise_any(mask: torch.Tensor, block: int) -> torch.Tensor:
    n = mask.shape[0]
    nb = -(-n // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = mask
    blocks = padded.view(nb, block, nb, block).any(3).any(1)
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]


@pytest.mark.parametrize(
    "grid, pattern",
    [
        (VideoGrid(16, 8, 12), Radial(block_size=32)),
        (VideoGrid(12, 5, 7), Radial(block_size=32, decay=2.0)),
        (VideoGrid(18, 6, 11), Radial(block_size=64, decay=0.5, sink_frames=2, dense_frame_distance=0)),
    ],
)
def test_token_mask_is_the_block_quantised_rule(grid, pattern):
    expected = quantise_any(ideal_token_rule(grid, pattern), pattern.block_size)
    assert torch.equal(pattern.token_mask(grid), expected)


def test_sink_and_near_diagonal_frames_are_dense():
    grid = VideoGrid(20, 8, 16)
    mask = Radial(block_size=32).token_mask(grid)
    tpf = grid.tokens_per_frame
    assert mask[:, :tpf].all()  # every query attends the whole first frame
    frame = torch.arange(grid.video_tokens) // tpf
    near = (frame[:, None] - frame[None, :]).abs() <= 1
    assert mask[near].all()
    assert not mask.all()


def test_spatial_band_shrinks_as_frame_distance_grows():
    grid = VideoGrid(33, 16, 16)  # 256 tokens per frame, 4 blocks of 64 per frame
    pattern = Radial(block_size=64)
    mask = pattern.token_mask(grid)
    tpf = grid.tokens_per_frame
    per_pair = mask.view(33, tpf, 33, tpf).sum((1, 3))  # allowed pairs per (query frame, key frame)
    for q_frame in range(33):
        counts = []
        for k_frame in range(1, 33):
            d = abs(q_frame - k_frame)
            if d >= 2 and per_pair[q_frame, k_frame] > 0:
                counts.append((d, int(per_pair[q_frame, k_frame])))
        counts.sort()
        values = [c for _, c in counts]
        assert values == sorted(values, reverse=True), (q_frame, counts)
    # Far frame distances are subsampled once the band is below one block.
    far = [int(per_pair[0, j]) for j in range(17, 33)]
    assert 0 in far and max(far) > 0


def test_work_grows_as_n_log_n_in_frames():
    small = Radial().layout(VideoGrid(20, 30, 52), block_size=128)
    large = Radial().layout(VideoGrid(40, 30, 52), block_size=128)
    ratio = large.allowed_pairs[0] / small.allowed_pairs[0]
    assert ratio < 3.0, ratio  # dense attention grows 4x
    assert ratio > 2.0, ratio  # and it is not linear either


def test_density_falls_as_videos_get_longer():
    densities = [Radial().layout(VideoGrid(f, 30, 52)).density for f in (11, 21, 41, 81)]
    assert densities == sorted(densities, reverse=True)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(decay=0.0), "decay"),
        (dict(decay="fast"), "decay"),
        (dict(sink_frames=-1), "sink_frames"),
        (dict(block_size=100), "block_size"),
        (dict(dense_frame_distance=1.5), "dense_frame_distance"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Radial(**kwargs)


def test_radial_refuses_a_token_permutation():
    with pytest.raises(UserError, match="tile_shape"):
        Radial().layout(VideoGrid(4, 8, 8), block_size=64, tile_shape=(1, 8, 8))


@pytest.mark.parametrize(
    "grid", [VideoGrid(1, 1, 1), VideoGrid(1, 30, 52), VideoGrid(2, 1, 1, text_tokens=3), VideoGrid(2, 45, 80)]
)
@pytest.mark.parametrize("pattern", [Radial(), Radial(decay=0.5, dense_frame_distance=1), Radial(block_size=32)])
def test_fewer_frames_than_the_dense_distance_is_dense(grid, pattern):
    # Every frame distance of a 1- or 2-frame call is <= dense_frame_distance (1).
    layout = pattern.layout(grid, block_size=pattern.block_size)
    assert layout.density == 1.0 and layout.num_partial_tiles == 0


@pytest.mark.parametrize("grid", [VideoGrid(3, 1, 1), VideoGrid(5, 2, 3, text_tokens=4), VideoGrid(9, 1, 2)])
def test_tiny_grids_are_the_block_quantised_rule(grid):
    pattern = Radial(block_size=32, sink_frames=0, dense_frame_distance=0)
    expected = quantise_any(ideal_token_rule(grid, pattern), pattern.block_size)
    n, off = grid.num_tokens, grid.video_offset
    full = torch.ones(n, n, dtype=torch.bool)
    full[off : off + grid.video_tokens, off : off + grid.video_tokens] = expected
    assert torch.equal(pattern.layout(grid, block_size=32).token_mask(), full)
