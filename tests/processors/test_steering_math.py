"""The steering attention math against materialised-probability references (small inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffattn import Dense, SparsityConfig, VideoGrid
from diffattn.processors.state import SparsityState
from diffattn.processors.steering import (
    HARD_BIAS,
    ColumnEdit,
    reference_attention,
    steered_attention,
    steered_split_attention,
)

B, H, D = 2, 2, 16
VIDEO, TEXT = 24, 5
# (text position, keys): cross-attention (keys are all text) and both joint orders.
LAYOUTS = {
    "cross": (slice(0, TEXT), slice(0, VIDEO), VIDEO, TEXT),
    "start": (slice(0, TEXT), slice(TEXT, TEXT + VIDEO), TEXT + VIDEO, TEXT + VIDEO),
    "end": (slice(VIDEO, VIDEO + TEXT), slice(0, VIDEO), VIDEO + TEXT, VIDEO + TEXT),
}


def inputs(layout: str, seed: int = 0):
    text, video, queries, keys = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (queries, keys, keys))
    return q, k, v, text, video


def full_edit(seed: int = 1) -> ColumnEdit:
    g = torch.Generator().manual_seed(seed)
    return ColumnEdit(
        query_factors=torch.randn(1, VIDEO, 2, generator=g),
        key_factors=(torch.rand(B, TEXT, 2, generator=g) > 0.5).float(),
        value_scale=torch.rand(B, TEXT, generator=g) * 3,
        capture=(torch.rand(B, TEXT, 3, generator=g) > 0.4).float(),
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reweighting_equals_probabilities_times_c(layout):
    q, k, v, text, video = inputs(layout)
    edit = ColumnEdit(value_scale=torch.tensor([[2.0, 1.0, 0.5, 1.0, 0.0], [1.0, 3.0, 1.0, 1.0, 1.0]]))
    fused, _ = steered_attention(q, k, v, edit, text, video)
    # Independent of reference_attention: materialise, multiply the text columns of video rows by c.
    probs = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).softmax(-1)
    factor = torch.ones_like(probs)
    rows = torch.arange(q.shape[2])[video]
    factor[:, :, rows[:, None], torch.arange(k.shape[2])[text][None]] = edit.value_scale.double()[:, None, None]
    expected = (probs * factor) @ v.double()
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    # P2P does not renormalise: the LSE-correction form says the same.
    plain = probs @ v.double()
    correction = (probs * (factor - 1)) @ v.double()
    torch.testing.assert_close(fused.double(), plain + correction, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bias_weights_and_capture_equal_the_unfused_reference(layout):
    q, k, v, text, video = inputs(layout, seed=3)
    edit = full_edit()
    fused, maps = steered_attention(q, k, v, edit, text, video)
    expected, expected_maps = reference_attention(q, k, v, edit, text, video)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.double(), expected_maps, atol=1e-6, rtol=1e-5)


def test_text_queries_of_joint_attention_are_untouched():
    q, k, v, text, video = inputs("start", seed=4)
    fused, _ = steered_attention(q, k, v, full_edit(), text, video)
    stock = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fused[:, :, text], stock[:, :, text], atol=1e-6, rtol=1e-6)


def test_key_padding_mask_passes_through():
    q, k, v, text, video = inputs("end", seed=5)
    padding = torch.ones(B, k.shape[2], dtype=torch.bool)
    padding[0, -2:] = False  # two padded text tokens in the first row
    edit = full_edit()
    fused, maps = steered_attention(q, k, v, edit, text, video, attn_mask=padding[:, None, None, :])
    expected, expected_maps = reference_attention(q, k, v, edit, text, video, key_padding=padding)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.double(), expected_maps, atol=1e-6, rtol=1e-5)


def test_normalised_weighting_is_a_log_c_bias():
    q, k, v, text, video = inputs("cross", seed=6)
    c = torch.tensor([2.0, 1.0, 0.5, 1.0, 1.0])
    edit = ColumnEdit(query_factors=torch.ones(1, VIDEO, 1), key_factors=c.log()[None, :, None].expand(B, -1, -1))
    fused, _ = steered_attention(q, k, v, edit, text, video)
    probs = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).softmax(-1) * c.double()
    torch.testing.assert_close(fused.double(), (probs / probs.sum(-1, keepdim=True)) @ v.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hard_region_leaves_zero_mass_outside(layout):
    q, k, v, text, video = inputs(layout, seed=7)
    inside = torch.zeros(VIDEO, dtype=torch.bool)
    inside[: VIDEO // 2] = True
    phrase = torch.zeros(B, TEXT, 1)
    phrase[:, 1:3] = 1
    edit = ColumnEdit(query_factors=(-HARD_BIAS * (~inside).float())[None, :, None], key_factors=phrase,
                      capture=phrase)
    _, maps = steered_attention(q * 4, k * 4, v, edit, text, video)  # peaky logits: still exactly zero
    assert float(maps[:, :, ~inside].abs().max()) == 0.0
    assert float(maps[:, :, inside].min()) > 0.0


def test_cross_attention_maps_of_every_token_sum_to_one():
    q, k, v, text, video = inputs("cross", seed=8)
    _, maps = steered_attention(q, k, v, ColumnEdit(capture=torch.eye(TEXT)[None].expand(B, -1, -1)), text, video)
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, H, VIDEO), atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["start", "end"])
def test_sparse_split_path_equals_the_fused_path(position):
    """The block-sparse layer's path (kernel on video->video, explicit text columns) with a dense
    pattern must give what the fused stock path gives, key padding included."""
    grid = VideoGrid(2, 3, 4, text_tokens=TEXT, text_position=position)
    state = SparsityState(SparsityConfig(pattern=Dense(), block_size=32))
    state.begin_call(grid, None)
    text, video, _, _ = LAYOUTS[position]
    q, k, v, _, _ = inputs(position, seed=9)
    padding = torch.ones(B, k.shape[2], dtype=torch.bool)
    padding[1, text.start] = False
    edit = full_edit()
    out, maps = steered_split_attention(state, 0, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        padding, edit)
    expected, expected_maps = reference_attention(q, k, v, edit, text, video, key_padding=padding)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.double(), expected_maps, atol=1e-6, rtol=1e-5)


def test_edit_rows_and_columns_select_what_mochi_attends():
    edit = full_edit()
    picked = edit.rows(slice(1, 2)).columns(torch.tensor([0, 3]))
    assert picked.query_factors.shape == (1, VIDEO, 2)          # shared by all rows: kept
    torch.testing.assert_close(picked.value_scale, edit.value_scale[1:2, [0, 3]])
    torch.testing.assert_close(picked.capture, edit.capture[1:2, [0, 3]])


def test_no_token_by_token_tensor_is_allocated():
    """Joint attention over 8,208 tokens: every allocation stays far below one [N, N] score matrix."""
    from torch.profiler import ProfilerActivity, profile

    video, text = 8192, 16
    q, k, v = (torch.randn(1, 2, video + text, 64) for _ in range(3))
    edit = ColumnEdit(query_factors=torch.randn(1, video, 2), key_factors=torch.ones(1, text, 2),
                      value_scale=torch.rand(1, text) * 2, capture=torch.ones(1, text, 3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        steered_attention(q, k, v, edit, slice(0, text), slice(text, video + text))
    largest = max(event.cpu_memory_usage for event in prof.key_averages())
    assert largest < 2 * (video + text) ** 2 * 4 / 10  # a tenth of the fp32 scores of both heads
