import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffattn import Neighborhood, VideoGrid
from diffattn.errors import UserError
from diffattn.patterns import natten_axis_table

from .natten_bruteforce import axis_neighbors, fit_axis, natten_token_mask


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
def test_bad_arguments_raise_user_error(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Neighborhood(**kwargs)


def test_strict_refuses_a_kernel_larger_than_the_grid_with_the_axis_named():
    with pytest.raises(UserError, match=r"axis h \(height\).*5\*2=10"):
        Neighborhood(kernel_size=(1, 5, 3), dilation=(1, 2, 1), strict=True).layout(VideoGrid(2, 8, 8))
    with pytest.raises(UserError, match=r"axis t \(frames\).*3\*1=3"):
        Neighborhood(kernel_size=3, strict=True).token_mask(VideoGrid(2, 4, 4))
    # A window that fits is the same pattern with or without strict.
    grid = VideoGrid(3, 4, 4)
    assert torch.equal(Neighborhood(kernel_size=3, strict=True).token_mask(grid),
                       Neighborhood(kernel_size=3).token_mask(grid))


@st.composite
def any_axis_setting(draw, max_len=7):
    """Any valid constructor arguments, fitting the axis or not (kernel None included)."""
    length = draw(st.integers(1, max_len))
    kernel = draw(st.one_of(st.none(), st.integers(1, 2 * max_len + 2)))
    stride = draw(st.integers(1, kernel or 4))
    return length, kernel, stride, draw(st.integers(1, 6)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(any_axis_setting(max_len=10))
def test_a_window_that_does_not_fit_is_natten_with_the_fitted_parameters(setting):
    length, kernel, stride, dilation, causal = setting
    fitted_kernel, fitted_stride, fitted_dilation = fit_axis(length, kernel, stride, dilation)
    pattern = Neighborhood(kernel_size=(1, 1, kernel), stride=(1, 1, stride), dilation=(1, 1, dilation), causal=causal)
    table = pattern.axis_tables(VideoGrid(1, 1, length))[2]
    for x in range(length):
        expected = axis_neighbors(x, length, fitted_kernel, fitted_stride, fitted_dilation, causal)
        assert set(table[x].nonzero().flatten().tolist()) == expected, (x, setting)
    if kernel is not None and kernel >= length:  # larger than the axis: dense along it
        full = torch.ones(length, length, dtype=torch.bool)
        assert torch.equal(table, full.tril() if causal else full)
    elif kernel is not None and not causal:  # else every query keeps its kernel_size keys
        assert torch.all(table.sum(1) == kernel)


@settings(max_examples=40, deadline=None)
@given(
    t=any_axis_setting(3), h=any_axis_setting(4), w=any_axis_setting(5),
    text=st.integers(0, 3), text_position=st.sampled_from(["end", "start"]),
)
def test_fitted_token_mask_and_layout_match_the_bruteforce(t, h, w, text, text_position):
    shape = (t[0], h[0], w[0])
    kernel, stride, dilation, causal = (tuple(a[i] for a in (t, h, w)) for i in range(1, 5))
    pattern = Neighborhood(kernel_size=kernel, stride=stride, dilation=dilation, causal=causal)
    grid = VideoGrid(*shape, text_tokens=text, text_position=text_position)
    fitted = [fit_axis(length, *args) for length, *args in zip(shape, kernel, stride, dilation)]
    fitted_kernel, fitted_stride, fitted_dilation = (tuple(f[i] for f in fitted) for i in range(3))
    expected = natten_token_mask(shape, fitted_kernel, fitted_stride, fitted_dilation, causal, text, text_position)
    assert torch.equal(pattern.token_mask(grid), expected)
    assert torch.equal(pattern.layout(grid, block_size=32, tile_shape=(1, 2, 4)).token_mask(), expected)
    assert pattern.fitted(grid).kernel_size == fitted_kernel


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 7), (1, 6, 1), (2, 1, 1), (1, 4, 4)])
def test_one_frame_calls_and_one_token_axes_are_dense_along_the_short_axes(shape):
    grid = VideoGrid(*shape, text_tokens=2)
    pattern = Neighborhood(kernel_size=(3, 5, 5), dilation=(1, 2, 1))
    mask = pattern.token_mask(grid)
    # Only w of (1, 1, 7) is longer than its kernel; h's dilation 2 no longer fits anywhere.
    expected = natten_token_mask(shape, tuple(min(5 if a else 3, s) for a, s in enumerate(shape)),
                                 (1, 1, 1), (1, 1, 1), (False,) * 3, 2)
    assert torch.equal(mask, expected)
    assert torch.equal(pattern.layout(grid, block_size=128, tile_shape=(1, 8, 16)).token_mask(), expected)


def test_fitted_is_the_pattern_itself_when_the_window_fits_and_the_freeswim_window_keeps_none():
    pattern = Neighborhood(kernel_size=(None, 5, 7), dilation=(3, 1, 2))
    assert pattern.fitted(VideoGrid(4, 5, 14)) is pattern
    assert pattern.fitted(VideoGrid(1, 3, 9)) == Neighborhood(kernel_size=(None, 3, 7), dilation=(3, 1, 1))
