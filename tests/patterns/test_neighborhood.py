import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffattn import Neighborhood, VideoGrid
from diffattn.patterns import natten_axis_table

from .natten_bruteforce import axis_neighbors, natten_token_mask


@st.composite
def axis_setting(draw, max_len=7):
    length = draw(st.integers(1, max_len))
    dilation = draw(st.integers(1, max(1, length)))
    kernel = draw(st.integers(1, max(1, length // dilation)))
    assume(kernel * dilation <= length)
    stride = draw(st.integers(1, kernel))
    causal = draw(st.booleans())
    return length, kernel, stride, dilation, causal


@settings(max_examples=300, deadline=None)
@given(axis_setting(max_len=12))
def test_axis_table_matches_bruteforce(setting):
    length, kernel, stride, dilation, causal = setting
    table = natten_axis_table(length, kernel, stride, dilation, causal)
    for x in range(length):
        expected = axis_neighbors(x, length, kernel, stride, dilation, causal)
        assert set(table[x].nonzero().flatten().tolist()) == expected, (x, setting)


@settings(max_examples=60, deadline=None)
@given(
    t=axis_setting(4), h=axis_setting(5), w=axis_setting(6),
    text=st.integers(0, 3), text_position=st.sampled_from(["end", "start"]),
)
def test_token_mask_matches_natten_bruteforce(t, h, w, text, text_position):
    shape = (t[0], h[0], w[0])
    kernel, stride, dilation, causal = (tuple(a[i] for a in (t, h, w)) for i in range(1, 5))
    pattern = Neighborhood(kernel_size=kernel, stride=stride, dilation=dilation, causal=causal)
    grid = VideoGrid(*shape, text_tokens=text, text_position=text_position)
    expected = natten_token_mask(shape, kernel, stride, dilation, causal, text, text_position)
    assert torch.equal(pattern.token_mask(grid), expected)


def test_every_query_sees_exactly_kernel_size_keys_when_not_causal():
    # NATTEN's inward clamp: border queries get full windows, also for even kernels.
    pattern = Neighborhood(kernel_size=(2, 4, 3))
    grid = VideoGrid(5, 6, 7)
    assert torch.all(pattern.token_mask(grid).sum(1) == 2 * 4 * 3)


def test_kernel_equal_to_axis_is_the_full_axis_and_none_too():
    grid = VideoGrid(3, 4, 5)
    full_t = Neighborhood(kernel_size=(3, 3, 3)).token_mask(grid)
    none_t = Neighborhood(kernel_size=(None, 3, 3)).token_mask(grid)
    assert torch.equal(full_t, none_t)
    assert torch.equal(Neighborhood(kernel_size=(3, 4, 5)).token_mask(grid), torch.ones(60, 60, dtype=torch.bool))


def test_two_dimensional_image_grid():
    grid = VideoGrid(1, 6, 8, text_tokens=4, text_position="start")
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    expected = natten_token_mask((1, 6, 8), (1, 3, 3), (1, 1, 1), (1, 1, 1), (False,) * 3, 4, "start")
    assert torch.equal(pattern.token_mask(grid), expected)
    assert torch.equal(pattern.layout(grid, block_size=32).token_mask(), expected)


def test_scalar_arguments_broadcast_to_all_axes():
    assert Neighborhood(kernel_size=3, stride=2, dilation=1, causal=True) == Neighborhood(
        kernel_size=(3, 3, 3), stride=(2, 2, 2), dilation=(1, 1, 1), causal=(True, True, True)
    )


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(kernel_size=(3, 0, 3)), r"kernel_size\[h\]"),
        (dict(kernel_size=(3, 3)), "kernel_size"),
        (dict(kernel_size=3, stride=4), r"stride\[t\]=4"),
        (dict(kernel_size=3, dilation=(1, 1, -2)), r"dilation\[w\]"),
        (dict(kernel_size=3, causal=(True, 1, False)), r"causal\[h\]"),
        (dict(kernel_size="3"), r"kernel_size\[t\]"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Neighborhood(**kwargs)


def test_kernel_larger_than_grid_is_refused_with_the_axis_named():
    with pytest.raises(ValueError, match=r"axis h \(height\).*5\*2=10"):
        Neighborhood(kernel_size=(1, 5, 3), dilation=(1, 2, 1)).layout(VideoGrid(2, 8, 8))
