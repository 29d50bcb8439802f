"""Issue 24 item 7: bad input to the pattern constructors and to ``pattern.layout`` gets a
``UserError`` naming the argument, the value and what is allowed; valid random input gives a
layout whose mask is the pattern's (never a silent wrong result)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.errors import UserError

from .natten_bruteforce import natten_token_mask

# Values that are not a count: wrong types, NaN and infinities, bools, containers, non-positive ints.
NOT_A_TYPE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.just([2]),
    st.just({"t": 1}),
    st.just(object()),
)
NOT_POSITIVE = st.integers(max_value=0)
NOT_NON_NEGATIVE = st.integers(max_value=-1)


def assert_names(error: pytest.ExceptionInfo, name: str, value: object) -> None:
    message = str(error.value)
    assert name in message, message
    assert repr(value) in message or str(value) in message, message
    assert "must be" in message or "allowed" in message, message


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(["frames", "height", "width", "text_tokens"]),
    data=st.data(),
)
def test_video_grid_refuses_what_is_not_a_count(field, data):
    bad = data.draw(st.one_of(NOT_A_TYPE, NOT_NON_NEGATIVE if field == "text_tokens" else NOT_POSITIVE))
    kwargs = dict(frames=2, height=3, width=4, text_tokens=0)
    kwargs[field] = bad
    with pytest.raises(UserError) as error:
        VideoGrid(**kwargs)
    assert_names(error, f"VideoGrid.{field}", bad)


@settings(max_examples=40, deadline=None)
@given(bad=st.one_of(NOT_A_TYPE, st.sampled_from(["middle", "END", None])))
def test_video_grid_refuses_an_unknown_text_position(bad):
    with pytest.raises(UserError) as error:
        VideoGrid(2, 3, 4, text_tokens=1, text_position=bad)
    assert_names(error, "VideoGrid.text_position", bad)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["kernel_size", "stride", "dilation"]), axis=st.sampled_from([0, 1, 2]), data=st.data())
def test_neighborhood_refuses_a_bad_size_on_any_axis(field, axis, data):
    bad = data.draw(st.one_of(NOT_A_TYPE, NOT_POSITIVE).filter(lambda v: not isinstance(v, (list, dict))))
    value = [1, 1, 1] if field == "stride" else [3, 3, 3]
    value[axis] = bad
    with pytest.raises(UserError) as error:
        Neighborhood(**{field: tuple(value)})
    assert_names(error, f"Neighborhood.{field}[{'thw'[axis]}]", bad)


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(["kernel_size", "stride", "dilation", "causal"]),
    bad=st.one_of(st.just((3, 3)), st.just([1, 2, 3, 4]), st.just(())),
)
def test_neighborhood_refuses_a_tuple_that_is_not_t_h_w(field, bad):
    with pytest.raises(UserError) as error:
        Neighborhood(**{field: bad})
    assert_names(error, f"Neighborhood.{field}", bad)


@settings(max_examples=60, deadline=None)
@given(axis=st.sampled_from([0, 1, 2]), bad=st.one_of(st.integers(), st.floats(), st.none(), st.text(max_size=2)))
def test_neighborhood_causal_and_strict_must_be_bools(axis, bad):
    causal = [False, False, False]
    causal[axis] = bad
    with pytest.raises(UserError) as error:
        Neighborhood(kernel_size=3, causal=tuple(causal))
    assert_names(error, f"Neighborhood.causal[{'thw'[axis]}]", bad)
    with pytest.raises(UserError) as error:
        Neighborhood(kernel_size=3, strict=bad)
    assert_names(error, "Neighborhood.strict", bad)


@settings(max_examples=40, deadline=None)
@given(kernel=st.integers(1, 10**30), extra=st.integers(1, 10**30))
def test_neighborhood_stride_larger_than_kernel_is_refused(kernel, extra):
    with pytest.raises(UserError) as error:
        Neighborhood(kernel_size=kernel, stride=kernel + extra)
    assert_names(error, "Neighborhood.stride[t]", kernel + extra)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["decay", "sink_frames", "dense_frame_distance", "block_size"]), data=st.data())
def test_radial_refuses_bad_settings(field, data):
    if field == "decay":
        bad = data.draw(st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf), st.booleans(),
                                  st.text(max_size=2), st.none()))
    elif field == "block_size":
        bad = data.draw(st.one_of(NOT_A_TYPE, st.integers().filter(lambda v: v not in (32, 64, 128, 256))))
    else:
        bad = data.draw(st.one_of(NOT_A_TYPE, NOT_NON_NEGATIVE))
    with pytest.raises(UserError) as error:
        Radial(**{field: bad})
    assert_names(error, f"Radial.{field}", bad)


PATTERNS = [Dense(), Radial(block_size=32), Neighborhood(kernel_size=(3, 5, 5))]


@settings(max_examples=150, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    field=st.sampled_from(["grid", "block_size", "block_q", "block_k", "tile_shape", "device"]),
    data=st.data(),
)
def test_layout_refuses_bad_arguments(pattern, field, data):
    kwargs = dict(grid=VideoGrid(2, 4, 4), block_size=32)
    if field == "grid":
        bad = data.draw(st.one_of(NOT_A_TYPE, st.just((2, 4, 4)), st.none()))
        name = "grid"
    elif field == "tile_shape":
        if not pattern.supports_permutation:
            bad, name = (1, 2, 4), "tile_shape"
        else:
            axis = data.draw(st.sampled_from([0, 1, 2]))
            item = data.draw(st.one_of(NOT_A_TYPE, NOT_POSITIVE).filter(lambda v: not isinstance(v, (list, dict))))
            tile = [1, 2, 4]
            tile[axis] = item
            bad, name = tuple(tile), f"tile_shape[{'thw'[axis]}]"
            bad_shown = item
    elif field == "device":
        bad = data.draw(st.sampled_from(["gpu", "cuda:99", "tpu", None, 3.5]))
        name = "device"
    else:
        bad = data.draw(st.one_of(NOT_A_TYPE, st.integers().filter(lambda v: v not in (16, 32, 64, 128, 256))))
        name = field
    kwargs[field] = bad
    if field == "device" and bad == "cuda:99" and torch.cuda.device_count() > 99:
        return
    with pytest.raises(UserError) as error:
        pattern.layout(**kwargs)
    assert_names(error, name, bad_shown if field == "tile_shape" and pattern.supports_permutation else bad)


def test_huge_sizes_fit_or_are_refused_never_hang():
    grid = VideoGrid(2, 3, 5, text_tokens=1)
    huge = 10**30
    # A huge window is the whole axis, a huge tile the whole grid, a huge sink every frame.
    assert Neighborhood(kernel_size=huge, dilation=huge, stride=huge).layout(grid, 32).density == 1.0
    assert Neighborhood(kernel_size=(1, 3, 3)).layout(grid, 32, tile_shape=(huge, huge, huge)).num_tokens == 31
    assert Radial(block_size=32, sink_frames=huge, dense_frame_distance=huge).layout(grid, 32).density == 1.0
    with pytest.raises(UserError, match=r"N=\d+.*tiles"):
        Dense().layout(VideoGrid(huge, 2, 2), 128)
    with pytest.raises(UserError, match=r"N=\d+.*tiles"):
        Dense().layout(VideoGrid(1, 1, 1, text_tokens=10**7), block_q=16, block_k=32)
    with pytest.raises(UserError, match="token_mask"):
        Dense().token_mask(VideoGrid(1, 1, 1, text_tokens=huge))


def test_numpy_integers_are_sizes():
    np = pytest.importorskip("numpy")
    assert VideoGrid(np.int64(2), np.int32(3), 4) == VideoGrid(2, 3, 4)
    assert Neighborhood(kernel_size=(np.int64(3), None, 2)) == Neighborhood(kernel_size=(3, None, 2))


@st.composite
def valid_case(draw):
    grid = VideoGrid(draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 7)),
                     text_tokens=draw(st.integers(0, 5)), text_position=draw(st.sampled_from(["end", "start"])))
    kind = draw(st.sampled_from(["dense", "radial", "neighborhood"]))
    if kind == "dense":
        pattern = Dense()
    elif kind == "radial":
        pattern = Radial(decay=draw(st.floats(0.05, 4.0)), sink_frames=draw(st.integers(0, 3)),
                         dense_frame_distance=draw(st.integers(0, 3)), block_size=32)
    else:
        kernel = tuple(draw(st.one_of(st.none(), st.integers(1, 9))) for _ in range(3))
        stride = tuple(draw(st.integers(1, k or 3)) for k in kernel)
        dilation = tuple(draw(st.integers(1, 4)) for _ in range(3))
        causal = tuple(draw(st.booleans()) for _ in range(3))
        pattern = Neighborhood(kernel, stride, dilation, causal)
    block_q = draw(st.sampled_from([16, 32, 64]))
    block_k = draw(st.sampled_from([32, 64]))
    tile = None
    if pattern.supports_permutation and draw(st.booleans()):
        tile = tuple(draw(st.integers(1, 9)) for _ in range(3))
    return grid, pattern, block_q, block_k, tile


@settings(max_examples=120, deadline=None)
@given(valid_case())
def test_valid_random_input_gives_the_patterns_mask(case):
    grid, pattern, block_q, block_k, tile = case
    layout = pattern.layout(grid, block_q=block_q, block_k=block_k, tile_shape=tile)
    expected = pattern.token_mask(grid)
    assert torch.equal(layout.token_mask(), expected)
    if isinstance(pattern, Neighborhood):  # and the pattern's mask is NATTEN's, fitted to the grid
        fitted = pattern.fitted(grid)
        assert all(k is None or k * d <= n for k, d, n in zip(fitted.kernel_size, fitted.dilation, grid.shape))
        reference = natten_token_mask(grid.shape, fitted.kernel_size, fitted.stride, fitted.dilation, fitted.causal,
                                      grid.text_tokens, grid.text_position)
        assert torch.equal(expected, reference)
