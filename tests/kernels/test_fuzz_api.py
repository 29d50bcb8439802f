"""Bad input, fuzzed: block_sparse_attention answers every wrong type, shape, dtype, device and size
with a UserError naming the value and what is allowed (huge sizes refused before any allocation),
runs every valid input exactly, and gives NaN data the NaN behaviour of scaled_dot_product_attention
with the same mask."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffattn import BlockLayout, Dense, Neighborhood, Radial, VideoGrid
from diffattn.errors import UserError
from diffattn.kernels import block_sparse_attention, masked_attention_reference

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRID = VideoGrid(2, 4, 8, text_tokens=3)  # N = 67
N = GRID.num_tokens
LAYOUTS = {
    "dense": Dense().layout(GRID, block_size=32),
    "window": Neighborhood(kernel_size=(1, 3, 3)).layout(GRID, block_size=32),
    "window-tiled": Neighborhood(kernel_size=(1, 3, 5)).layout(GRID, block_q=16, block_k=32, tile_shape=(1, 4, 8)),
    "radial": Radial(block_size=32).layout(GRID, block_size=32),
    "per-head": BlockLayout.stack(
        [Dense().layout(GRID, block_size=32), Neighborhood(kernel_size=(1, 3, 3)).layout(GRID, block_size=32)]
    ),
}
BACKENDS = ("auto", "cpu", "reference")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OTHER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float64,
                torch.complex64, torch.float8_e4m3fn)  # fmt: skip


def refusal(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        block_sparse_attention(*args, **kwargs)
    return str(info.value)


def valid_qkv(heads: int = 2, d: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, N, d, generator=gen).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------------------------- types
BAD_VALUES = [None, 1, 2.5, "q", [1.0, 2.0], (1, 2), {"q": 1}, object()]


@FUZZ
@given(position=st.sampled_from(["q", "k", "v", "layout"]), bad=st.sampled_from(BAD_VALUES))
def test_wrong_argument_types(position, bad):
    args = dict(zip("qkv", valid_qkv()), layout=LAYOUTS["window"])
    args[position] = bad
    msg = refusal(args["q"], args["k"], args["v"], args["layout"])
    assert f"{position} must be a" in msg and type(bad).__name__ in msg


@FUZZ
@given(scale=st.one_of(st.sampled_from([0, 0.0, -1.0, math.inf, -math.inf, math.nan, True, "0.1", None, 1j]),
                       st.floats(max_value=0.0)))
def test_bad_scale(scale):
    q, k, v = valid_qkv()
    if scale is None:  # the default
        block_sparse_attention(q, k, v, LAYOUTS["window"], scale=scale)
        return
    msg = refusal(q, k, v, LAYOUTS["window"], scale=scale)
    assert f"scale must be None or a finite number > 0, got {scale!r}" in msg


@FUZZ
@given(
    return_lse=st.sampled_from([1, 0, "yes", None, 1.0]),
    backend=st.one_of(st.text(max_size=8), st.integers(), st.none()),
)
def test_bad_flags_and_backend_names(return_lse, backend):
    q, k, v = valid_qkv()
    msg = refusal(q, k, v, LAYOUTS["window"], return_lse=return_lse, backend=backend)
    assert f"return_lse must be a bool, got {return_lse!r}" in msg
    if backend not in ("auto", "cpu", "triton", "reference"):
        assert f"backend={backend!r} is unknown; allowed: 'auto', 'cpu', 'triton', 'reference'" in msg


# ---------------------------------------------------------------------------------- shapes
dims = st.integers(min_value=0, max_value=3)


@FUZZ
@given(
    layout_name=st.sampled_from(sorted(LAYOUTS)),
    backend=st.sampled_from(BACKENDS),
    q_shape=st.lists(dims, min_size=1, max_size=6),
    n=st.sampled_from([0, 1, N - 1, N, N + 1]),
    d=st.sampled_from([0, 1, 8]),
    change=st.sampled_from(["none", "k", "v"]),
    rank4=st.booleans(),
)
def test_shapes(layout_name, backend, q_shape, n, d, change, rank4):
    layout = LAYOUTS[layout_name]
    shape = [q_shape[0] % 2 + (q_shape[0] > 1), q_shape[-1] % 3, n, d] if rank4 else q_shape
    shapes = {"q": shape, "k": list(shape), "v": list(shape)}
    if change != "none" and len(shape) == 4:
        shapes[change][3] += 1
    q, k, v = (torch.randn(*shapes[name]) for name in "qkv")
    heads, n, d = shape[1:] if len(shape) == 4 else (None, None, None)
    valid = (
        len(shape) == 4 and change == "none" and n == N and d >= 1 and layout.num_heads in (1, heads)
    )
    if valid:
        out = block_sparse_attention(q, k, v, layout, backend=backend)
        mask = layout.token_mask()
        assert out.shape == q.shape
        if out.numel():
            torch.testing.assert_close(out, masked_attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
        return
    msg = refusal(q, k, v, layout, backend=backend)
    if len(shape) != 4:
        assert f"q must have 4 dimensions [B, H, N, D], got {len(shape)} (shape {tuple(shape)})" in msg
    elif change != "none":
        assert "q, k and v must have the same shape" in msg and str(tuple(shapes[change])) in msg
    elif n != N:
        assert f"N={n} (q.shape[2]) does not match layout.num_tokens={N}" in msg
    elif d == 0:
        assert "head dim D (q.shape[3]) must be >= 1, got 0" in msg
    else:
        assert f"layout.num_heads={layout.num_heads} does not match the H={heads} heads" in msg


# ---------------------------------------------------------------------------------- dtypes, devices
@FUZZ
@given(dtype=st.sampled_from(ALLOWED_DTYPES + OTHER_DTYPES), backend=st.sampled_from(BACKENDS + ("triton",)))
def test_dtypes(dtype, backend):
    q, k, v = (torch.zeros(1, 2, N, 16).to(dtype) for _ in range(3))
    name = str(dtype).replace("torch.", "")
    if dtype in ALLOWED_DTYPES and backend != "triton":
        assert block_sparse_attention(q, k, v, LAYOUTS["window"], backend=backend).dtype == dtype
        return
    if dtype in ALLOWED_DTYPES:  # triton: refused only for its own reasons, which are named
        try:
            block_sparse_attention(q, k, v, LAYOUTS["window"], backend=backend)
        except UserError as error:
            assert "backend='triton'" in str(error) or "TRITON_INTERPRET" in str(error)
        return
    assert f"dtype={name} is not supported by backend=" in refusal(q, k, v, LAYOUTS["window"], backend=backend)
    assert "allowed: float16, bfloat16, float32" in refusal(q, k, v, LAYOUTS["window"], backend=backend)


@FUZZ
@given(backend=st.sampled_from(BACKENDS + ("triton",)), which=st.sampled_from(["all", "q", "k", "v"]))
def test_meta_tensors_are_refused(backend, which):
    tensors = dict(zip("qkv", valid_qkv()))
    for name in "qkv" if which == "all" else which:
        tensors[name] = tensors[name].to("meta")
    msg = refusal(*tensors.values(), LAYOUTS["window"], backend=backend)
    if which != "all":
        assert "q, k and v must be on the same device" in msg and "meta" in msg
    elif backend == "auto":
        assert "backend='auto' has no kernel for tensors on meta" in msg
    else:
        assert f"backend={backend!r} cannot compute on tensors on meta" in msg and "allowed: tensors on" in msg


# ---------------------------------------------------------------------------------- huge and empty
HUGE = 1 << 40


@FUZZ
@given(axis=st.sampled_from(["batch", "heads", "tokens", "dim"]), device=st.sampled_from(["cpu", "meta"]),
       backend=st.sampled_from(BACKENDS))
def test_huge_sizes_are_refused_before_any_allocation(axis, device, backend):
    # Zero-stride views (CPU) and meta tensors: terabyte shapes that hold a few bytes.
    shape = {
        "batch": (HUGE, 2, N + 1, 8), "heads": (1, HUGE, N, 8), "tokens": (1, 2, HUGE, 8), "dim": (1, 2, N + 1, HUGE),
    }[axis]
    q = torch.zeros((), device=device).expand(*shape)
    layout = LAYOUTS["per-head"] if axis == "heads" else LAYOUTS["window"]
    msg = refusal(q, q, q, layout, backend=backend)
    assert str(tuple(shape)) in msg or str(shape[2]) in msg


@FUZZ
@given(batch=st.integers(0, 2), heads=st.integers(0, 2), backend=st.sampled_from(BACKENDS), lse=st.booleans())
def test_empty_batches_and_heads(batch, heads, backend, lse):
    q = torch.randn(batch, heads, N, 8, requires_grad=True)
    layout = LAYOUTS["window"]
    result = block_sparse_attention(q, q, q, layout, return_lse=lse, backend=backend)
    out = result[0] if lse else result
    assert out.shape == q.shape
    if lse:
        assert result[1].shape == q.shape[:-1]
    out.sum().backward()
    assert q.grad.shape == q.shape


# ---------------------------------------------------------------------------------- NaN data
def visited_keys(layout: BlockLayout, backend: str) -> torch.Tensor:
    """bool [H?, N, N] (caller order): the keys a backend reads for each query (a NaN there may
    spread to the query's row, as in SDPA): every key for the dense reference, else the keys of
    the tiles the query's block visits."""
    if backend == "reference":
        return torch.ones(N, N, dtype=torch.bool)
    full = BlockLayout(layout.num_tokens, layout.block_q, layout.block_k, layout.kv_counts, layout.kv_indices,
                       torch.full_like(layout.kv_mask_ids, -1), layout.masks[:0], layout.permutation)  # fmt: skip
    return full.token_mask()


@FUZZ
@given(
    layout_name=st.sampled_from(sorted(LAYOUTS)),
    backend=st.sampled_from(BACKENDS),
    poisoned=st.lists(
        st.tuples(st.sampled_from("qkv"), st.integers(0, 1), st.integers(0, N - 1)), min_size=1, max_size=3
    ),
)
def test_nan_rows_follow_sdpa(layout_name, backend, poisoned):
    layout = LAYOUTS[layout_name]
    q, k, v = valid_qkv(heads=2, seed=len(poisoned))
    tensors = {"q": q, "k": k, "v": v}
    for name, head, token in poisoned:
        tensors[name][0, head, token, 0] = math.nan
    out = block_sparse_attention(q, k, v, layout, backend=backend)
    mask = layout.token_mask().expand(2, N, N)
    visited = visited_keys(layout, backend).expand(2, N, N)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    row_nan = out.isnan().any(-1)[0]
    q_nan = q.isnan().any(-1)[0]  # [H, N]
    kv_nan = (k.isnan() | v.isnan()).any(-1)[0]  # [H, N]
    has_key = mask.any(-1)
    # SDPA's rules: a NaN query poisons its row, a NaN key or value poisons every row attending it.
    must_nan = has_key & (q_nan | (mask & kv_nan[:, None, :]).any(-1))
    assert row_nan[must_nan].all()
    assert sdpa.isnan().any(-1)[0][must_nan].all()
    # Rows without any allowed key are 0 (the contract; SDPA gives NaN there).
    assert (out[0][~has_key] == 0).all()
    # A row whose query is finite and whose visited tiles hold no NaN is finite and exact.
    clean = has_key & ~q_nan & ~(visited & kv_nan[:, None, :]).any(-1)
    assert not row_nan[clean].any()
    expected = masked_attention_reference(*(x.nan_to_num(0.0) for x in (q, k, v)), layout.token_mask())
    torch.testing.assert_close(out[0][clean], expected[0][clean], rtol=1e-5, atol=1e-5)
