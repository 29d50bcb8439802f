import pytest
import torch

from diffattn import Neighborhood, Radial, VideoGrid
from diffattn.processors import SparseUnsupported, SparsityConfig, SparsityState
from diffattn.processors.joint import joint_attention


def reference(q, k, v, mask):
    """[B, N, H, D] float64 attention with a per-batch [B, N, N] mask (independent of the kernels)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (torch.nan_to_num(scores.softmax(-1)) @ v).transpose(1, 2)


@pytest.mark.parametrize("text_position", ["end", "start"])
@pytest.mark.parametrize("pattern", [Neighborhood(kernel_size=(2, 3, 3)), Radial(block_size=32)], ids=repr)
def test_joint_attention_with_text_padding_is_exact(text_position, pattern):
    grid = VideoGrid(3, 5, 6, text_tokens=7, text_position=text_position)
    state = SparsityState(SparsityConfig(pattern=pattern, block_size=32))
    state.grid = grid
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 2, 16) for _ in range(3))
    keep = torch.ones(2, grid.num_tokens, dtype=torch.bool)
    text = torch.arange(grid.num_tokens)[grid.video_index_of(torch.arange(grid.num_tokens)) < 0]
    keep[0, text[4:]] = False  # sample 0: 4 valid text tokens
    keep[1, text[1:]] = False  # sample 1: 1 valid text token
    out = joint_attention(state, 0, q, k, v, key_padding=keep)
    mask = pattern.token_mask(grid)[None] & keep[:, None, :]
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # Without padding the layout's own dense text rows/columns are used.
    out_unpadded = joint_attention(state, 0, q, k, v, key_padding=None)
    expected = reference(q, k, v, pattern.token_mask(grid)[None].expand(2, -1, -1))
    torch.testing.assert_close(out_unpadded.double(), expected, atol=1e-5, rtol=1e-5)


def test_padding_on_video_tokens_is_refused():
    grid = VideoGrid(2, 4, 4, text_tokens=3)
    state = SparsityState(SparsityConfig(pattern=Neighborhood(kernel_size=(1, 3, 3)), block_size=32))
    state.grid = grid
    q = torch.randn(1, grid.num_tokens, 1, 16)
    keep = torch.ones(1, grid.num_tokens, dtype=torch.bool)
    keep[0, 0] = False
    with pytest.raises(SparseUnsupported, match="only text keys"):
        joint_attention(state, 0, q, q, q, key_padding=keep)
