"""Block-sparse Triton kernels (forward and backward) against an independent masked-attention reference.

On machines without a GPU these run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before
Triton is imported) on small shapes, in fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is
wrong). Tests marked ``cuda`` run larger shapes in bf16/fp16 on a real GPU.

Numerics rule (flash-attention's): ``max|kernel - ref| <= 2 * max|plain torch in the same dtype -
ref| + floor``, where ``ref`` is float64 math on the same (rounded) inputs and the plain torch
version is scores / masked_fill / softmax / matmul in the input dtype.

Every CPU input is a slice ``big[..., :N, :D]`` of a NaN-filled buffer, so an out-of-bounds read
along the tokens or the (padded) head dim shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from diffattn import BlockLayout, Dense, Neighborhood, Radial, VideoGrid
from diffattn.errors import UserError
from diffattn.kernels.triton_attention import _attention, triton_block_sparse_attention, triton_support_problems
from diffattn.patterns.layout import pack_tile_masks

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
GRID_110 = VideoGrid(3, 5, 7, text_tokens=5)  # N = 110: not a multiple of 32 or 64
GRID_247 = VideoGrid(4, 6, 10, text_tokens=7, text_position="start")  # N = 247
# Absolute floors of the 2x rule, relative to max|ref| (covers rounding of the final store).
FLOOR = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ------------------------------------------------------------------------------------ helpers
def poisoned(values: torch.Tensor, pad_tokens: int = 37, pad_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy ``values`` [B, H, N, D] into a NaN buffer that is larger along N and D.

    Returns ``(view, buffer)``: ``view`` is ``buffer[..., :N, :D]`` (head dim unit-stride, tokens
    strided), ``buffer`` is a leaf that may require grad.
    """
    b, h, n, d = values.shape
    buf = torch.full((b, h, n + pad_tokens, d + pad_dim), float("nan"), dtype=values.dtype, device=values.device)
    buf[..., :n, :d] = values
    return buf[..., :n, :d], buf


def make_inputs(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0, grad: bool = False):
    """q, k, v as NaN-poisoned views (plus their buffers when ``grad``)."""
    gen = torch.Generator().manual_seed(seed)
    views, bufs = [], []
    for _ in range(3):
        x = torch.randn(b, h, n, d, generator=gen).to(device=DEVICE, dtype=dtype)
        view, buf = poisoned(x)
        if grad:
            buf.requires_grad_(True)
            view = buf[..., :n, :d]
        views.append(view)
        bufs.append(buf)
    return views, bufs


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, dtype=None):
    """Masked softmax attention in plain torch, in ``dtype`` (default: the inputs' dtype).

    mask: bool [N, N] or [H, N, N], True = allowed. Rows with no allowed key give output 0 (the
    softmax of such a row is NaN; it is zeroed) and LSE -inf. Returns (out, lse, scores).
    """
    dtype = dtype or q.dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    mask = mask.to(q.device)
    if mask.dim() == 3:
        mask = mask[None]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores if scores.dtype == torch.float64 else scores.float(), dim=-1)
    any_allowed = mask.any(-1, keepdim=True)
    # Empty rows: softmax of all -inf is NaN; give them finite scores and zero their weights so
    # that the autograd graph stays NaN-free too (nan_to_num would not stop NaN gradients).
    probs = torch.softmax(torch.where(any_allowed, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(any_allowed, probs, torch.zeros_like(probs))
    return probs @ v, lse, scores


def assert_close_2x(name: str, got: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """The flash-attention rule: kernel error <= 2 x plain-torch error + floor."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    ref = ref.double()
    err = (got.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    floor = FLOOR[dtype] * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * plain_err + floor, f"{name}: max error {err:.3g} > 2 * {plain_err:.3g} + {floor:.3g}"


def run_and_check(
    q_views,
    mask: torch.Tensor,
    layout: BlockLayout,
    dtype: torch.dtype,
    *,
    backward: bool = False,
    bufs=None,
    lse_grad: bool = False,
    configs: dict | None = None,
) -> None:
    """Run the kernel on kernel-order inputs and check out, lse (and grads) against the reference."""
    q, k, v = q_views
    d = q.shape[-1]
    scale = d**-0.5
    out, lse = _attention(q, k, v, layout, scale, True, configs=configs)
    ref_out, ref_lse, _ = reference(q, k, v, mask, scale, torch.float64)
    plain_out, _, _ = reference(q, k, v, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close_2x("out", out, plain_out, ref_out, dtype)
    # LSE: fp32 in the kernel either way; -inf exactly where the reference row is empty.
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and not torch.isnan(lse).any()
    assert (lse[~finite] == float("-inf")).all()
    lse_tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite].double(), atol=lse_tol, rtol=lse_tol)
    if not backward:
        return

    gen = torch.Generator().manual_seed(123)
    do_view, _ = poisoned(torch.randn(q.shape, generator=gen).to(device=q.device, dtype=dtype))
    dlse = torch.randn(q.shape[:3], generator=gen).to(q.device) if lse_grad else None

    def grads(o, lse_out, inputs):
        outs, g_outs = [o], [do_view.to(o.dtype)]
        if lse_grad:
            outs.append(lse_out)
            g_outs.append(dlse.to(lse_out.dtype))
        return torch.autograd.grad(outs, inputs, g_outs)

    got = []
    for g_buf in grads(out, lse, bufs):
        # The NaN padding of the buffers must receive exactly zero gradient.
        pad = g_buf.clone()
        pad[..., : q.shape[2], :d] = 0
        assert not pad.any(), "gradient leaked into the padding"
        got.append(g_buf[..., : q.shape[2], :d])
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    r_out, r_lse, _ = reference(*leaves64, mask, scale, torch.float64)
    want = grads(r_out, r_lse, leaves64)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    p_out, p_lse, _ = reference(*leaves, mask, scale)
    plain = grads(p_out, p_lse, leaves)
    for name, g, p, w in zip(("dq", "dk", "dv"), got, plain, want):
        assert g.dtype == dtype
        assert_close_2x(name, g, p, w, dtype)


def pattern_case(pattern, grid: VideoGrid, block_q: int, block_k: int, tile_shape=None):
    """(layout, mask in kernel order) for a pattern; the mask comes from ``pattern.token_mask``."""
    layout = pattern.layout(grid, block_q=block_q, block_k=block_k, tile_shape=tile_shape)
    mask = pattern.token_mask(grid)
    if layout.permutation is not None:
        perm = layout.permutation
        mask = mask[perm][:, perm]  # kernel position p is caller token perm[p]
    return layout, mask


def layout_from_mask(mask: torch.Tensor, block_q: int, block_k: int) -> BlockLayout:
    """A BlockLayout for an arbitrary bool mask ([N, N]), built here independently of the pattern
    code: a tile is listed when any pair is allowed, full when every in-range pair is."""
    n = mask.shape[-1]
    mq, mk = -(-n // block_q), -(-n // block_k)
    padded = torch.zeros(mq * block_q, mk * block_k, dtype=torch.bool)
    padded[:n, :n] = mask
    tiles = padded.view(mq, block_q, mk, block_k).permute(0, 2, 1, 3)  # [mq, mk, bq, bk]
    in_range = torch.zeros_like(padded)
    in_range[:n, :n] = True
    in_range = in_range.view(mq, block_q, mk, block_k).permute(0, 2, 1, 3)
    rows_idx, rows_mid, partial = [], [], []
    for qb in range(mq):
        idx, mid = [], []
        for kb in range(mk):
            tile = tiles[qb, kb]
            if not tile.any():
                continue
            idx.append(kb)
            if torch.equal(tile, in_range[qb, kb]):
                mid.append(-1)
            else:
                mid.append(len(partial))
                partial.append(tile)
        rows_idx.append(idx)
        rows_mid.append(mid)
    width = max(1, max(len(r) for r in rows_idx))
    kv_indices = torch.zeros(1, mq, width, dtype=torch.int32)
    kv_mask_ids = torch.full((1, mq, width), -1, dtype=torch.int32)
    for qb, (idx, mid) in enumerate(zip(rows_idx, rows_mid)):
        kv_indices[0, qb, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
        kv_mask_ids[0, qb, : len(mid)] = torch.tensor(mid, dtype=torch.int32)
    if partial:
        masks = pack_tile_masks(torch.stack(partial))
    else:
        masks = torch.zeros(0, block_q, block_k // 32, dtype=torch.int32)
    return BlockLayout(
        num_tokens=n,
        block_q=block_q,
        block_k=block_k,
        kv_counts=torch.tensor([[len(r) for r in rows_idx]], dtype=torch.int32),
        kv_indices=kv_indices,
        kv_mask_ids=kv_mask_ids,
        masks=masks,
        allowed_pairs=(int(mask.sum()),),
    )


def random_block_mask(n: int, block_q: int, block_k: int, seed: int) -> torch.Tensor:
    """A mask with empty, full and partial tiles, a fully empty query block and empty rows."""
    gen = torch.Generator().manual_seed(seed)
    mq, mk = -(-n // block_q), -(-n // block_k)
    kind = torch.randint(0, 3, (mq, mk), generator=gen)  # 0 empty, 1 full, 2 partial
    kind[1, :] = 0  # query block 1 has no key block at all
    kind[0, -1] = 1  # a full tile on the ragged last key block
    dense = torch.rand(mq * block_q, mk * block_k, generator=gen) < 0.4
    tile_kind = kind.repeat_interleave(block_q, 0).repeat_interleave(block_k, 1)
    mask = torch.where(tile_kind == 1, True, torch.where(tile_kind == 2, dense, False))[:n, :n].clone()
    mask[3, :] = False  # an empty row inside otherwise non-empty query block 0
    mask[-2, :] = False  # and one in the ragged last query block
    return mask


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128])
def test_forward_head_dims(dtype, head_dim):
    layout, mask = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    views, _ = make_inputs(1, 2, GRID_110.num_tokens, head_dim, dtype)
    run_and_check(views, mask, layout, dtype)


PATTERN_CASES = [
    pytest.param(Dense(), GRID_110, 32, 64, None, id="dense-110-32x64"),
    pytest.param(Dense(), GRID_247, 64, 64, None, id="dense-247-64x64"),
    pytest.param(Neighborhood(kernel_size=(3, 3, 5)), GRID_247, 32, 32, None, id="na-247-32"),
    pytest.param(Neighborhood(kernel_size=(3, 3, 5)), GRID_247, 64, 32, (1, 4, 8), id="na-247-64x32-tiled"),
    pytest.param(
        Neighborhood(kernel_size=(2, 3, 3), dilation=(1, 1, 2), causal=(True, False, False)),
        GRID_110, 32, 32, (1, 3, 4), id="na-causal-110-tiled",
    ),
    pytest.param(Radial(block_size=32), GRID_247, 32, 32, None, id="radial-247-32"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("pattern, grid, block_q, block_k, tile_shape", PATTERN_CASES)
def test_forward_patterns(pattern, grid, block_q, block_k, tile_shape, dtype):
    layout, mask = pattern_case(pattern, grid, block_q, block_k, tile_shape)
    views, _ = make_inputs(1, 2, grid.num_tokens, 32, dtype, seed=1)
    run_and_check(views, mask, layout, dtype)


def test_forward_in_caller_order_with_permutation():
    """Permute q/k/v with the layout, run, unpermute: equals attention under the caller's mask."""
    pattern = Neighborhood(kernel_size=(3, 3, 5))
    layout = pattern.layout(GRID_247, block_size=32, tile_shape=(1, 4, 8))
    assert layout.permutation is not None
    (q, k, v), _ = make_inputs(1, 1, GRID_247.num_tokens, 64, torch.float32, seed=2)
    qk, kk, vk = (layout.permute_tokens(x) for x in (q, k, v))
    out = layout.unpermute_tokens(triton_block_sparse_attention(qk, kk, vk, layout, 0.125, False))
    ref, _, _ = reference(q, k, v, pattern.token_mask(GRID_247), 0.125, torch.float64)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_through_the_public_dispatcher():
    """block_sparse_attention(backend="triton") permutes, calls this backend and unpermutes:
    forward and backward in the caller's token order match the reference on the caller's mask."""
    api = pytest.importorskip("diffattn.kernels.api")
    pattern = Neighborhood(kernel_size=(3, 3, 5))
    layout = pattern.layout(GRID_110, block_size=32, tile_shape=(1, 4, 8))
    (q, k, v), bufs = make_inputs(1, 2, GRID_110.num_tokens, 64, torch.float32, seed=13, grad=True)
    out, lse = api.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref, ref_lse, _ = reference(*leaves, pattern.token_mask(GRID_110), 64**-0.5, torch.float64)
    want = torch.autograd.grad(ref, leaves, do.double())
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (lse.double() - ref_lse).abs().max().item() < 1e-5
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max().item() < 1e-5 * max(1.0, w.abs().max().item())


def test_forward_batch_and_per_head_layout():
    """B = 2 with a per-head layout: head 0 dense, head 1 a local window."""
    dense, _ = pattern_case(Dense(), GRID_110, 32, 32)
    local_pattern = Neighborhood(kernel_size=(1, 3, 3))
    local, _ = pattern_case(local_pattern, GRID_110, 32, 32)
    layout = BlockLayout.stack([dense, local])
    mask = torch.stack([Dense().token_mask(GRID_110), local_pattern.token_mask(GRID_110)])
    views, bufs = make_inputs(2, 2, GRID_110.num_tokens, 64, torch.float32, seed=3, grad=True)
    run_and_check(views, mask, layout, torch.float32, backward=True, bufs=bufs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_rows_and_random_tiles(dtype):
    """Hand-built layout: empty query block (kv_counts 0), empty rows inside partial tiles, a full
    tile on the ragged last key block. Output 0, lse -inf, gradients 0 there, no NaN anywhere."""
    n, bq, bk = 150, 32, 64
    mask = random_block_mask(n, bq, bk, seed=4)
    layout = layout_from_mask(mask, bq, bk)
    assert int(layout.kv_counts[0, 1]) == 0
    assert torch.equal(layout.token_mask(), mask)  # the hand-built layout is what we think it is
    views, bufs = make_inputs(1, 2, n, 64, dtype, seed=5, grad=True)
    run_and_check(views, mask, layout, dtype, backward=True, bufs=bufs)
    out, lse = triton_block_sparse_attention(*[x.detach() for x in views], layout, 0.125, True)
    empty = ~mask.any(-1)
    assert empty[bq : 2 * bq].all() and empty[3] and empty[n - 2]
    empty = empty.to(out.device)
    assert (out[:, :, empty] == 0).all() and (lse[:, :, empty] == float("-inf")).all()


def test_forward_strided_views_and_fully_empty_layout():
    """[B, N, H, D] storage viewed as [B, H, N, D] runs without a copy; a layout with no tiles at
    all gives zeros and -inf."""
    n, d = 110, 64
    base = torch.randn(3, 1, n, 2, d, device=DEVICE)  # q, k, v interleaved like a fused qkv projection
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    layout, mask = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    out = triton_block_sparse_attention(q, k, v, layout, d**-0.5, False)
    ref, _, _ = reference(q, k, v, mask, d**-0.5, torch.float64)
    assert (out.double() - ref).abs().max().item() < 1e-5

    empty = layout_from_mask(torch.zeros(n, n, dtype=torch.bool), 32, 32)
    out, lse = triton_block_sparse_attention(q, k, v, empty, d**-0.5, True)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_forward_is_deterministic():
    layout, _ = pattern_case(Radial(block_size=32), GRID_247, 32, 32)
    (q, k, v), _ = make_inputs(1, 2, GRID_247.num_tokens, 64, torch.float16, seed=6)
    out1, lse1 = triton_block_sparse_attention(q, k, v, layout, 0.125, True)
    out2, lse2 = triton_block_sparse_attention(q, k, v, layout, 0.125, True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


# ------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize(
    "dtype, head_dim",
    [(torch.float32, 64), (torch.float32, 80), (torch.float16, 64), (torch.float16, 96)],
    ids=str,
)
def test_backward_head_dims(dtype, head_dim):
    layout, mask = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    views, bufs = make_inputs(1, 2, GRID_110.num_tokens, head_dim, dtype, seed=7, grad=True)
    run_and_check(views, mask, layout, dtype, backward=True, bufs=bufs)


@pytest.mark.parametrize(
    "pattern, grid, block_q, block_k, tile_shape",
    [PATTERN_CASES[0], PATTERN_CASES[3], PATTERN_CASES[4], PATTERN_CASES[5]],
)
def test_backward_patterns(pattern, grid, block_q, block_k, tile_shape):
    layout, mask = pattern_case(pattern, grid, block_q, block_k, tile_shape)
    views, bufs = make_inputs(1, 1, grid.num_tokens, 32, torch.float32, seed=8, grad=True)
    run_and_check(views, mask, layout, torch.float32, backward=True, bufs=bufs)


def test_backward_through_lse():
    """The returned LSE is differentiable (dL/dlse enters through delta)."""
    layout, mask = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 64)
    views, bufs = make_inputs(1, 2, GRID_110.num_tokens, 32, torch.float32, seed=9, grad=True)
    run_and_check(views, mask, layout, torch.float32, backward=True, bufs=bufs, lse_grad=True)


def test_split_configs_forward_and_backward():
    """The autotuner's SPLIT > 1 variants (not chosen under the interpreter) give the same result."""
    configs = {name: {"SPLIT": 2, "num_warps": 4, "num_stages": 2} for name in ("fwd", "dkdv", "dq")}
    mask = random_block_mask(150, 32, 64, seed=10)
    layout = layout_from_mask(mask, 32, 64)
    views, bufs = make_inputs(1, 1, 150, 80, torch.float32, seed=11, grad=True)
    run_and_check(views, mask, layout, torch.float32, backward=True, bufs=bufs, configs=configs)


def test_backward_with_some_inputs_frozen():
    """Only the needed gradient kernels run (q alone; k and v alone) and give the same values."""
    layout, _ = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    (q, k, v), _ = make_inputs(1, 1, GRID_110.num_tokens, 32, torch.float32, seed=14)
    do = torch.randn(q.shape, device=q.device)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    all_grads = torch.autograd.grad(triton_block_sparse_attention(*leaves, layout, 0.2, False), leaves, do)
    q_only = q.detach().clone().requires_grad_(True)
    (dq,) = torch.autograd.grad(triton_block_sparse_attention(q_only, k, v, layout, 0.2, False), q_only, do)
    assert torch.equal(dq, all_grads[0])
    kv = [x.detach().clone().requires_grad_(True) for x in (k, v)]
    dk, dv = torch.autograd.grad(triton_block_sparse_attention(q, *kv, layout, 0.2, False), kv, do)
    assert torch.equal(dk, all_grads[1]) and torch.equal(dv, all_grads[2])


def test_backward_is_deterministic():
    layout, _ = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    views, bufs = make_inputs(1, 1, GRID_110.num_tokens, 32, torch.float16, seed=12, grad=True)
    out = triton_block_sparse_attention(*views, layout, 0.2, False)
    do = torch.randn_like(out)
    first = torch.autograd.grad(out, bufs, do, retain_graph=True)
    second = torch.autograd.grad(out, bufs, do)
    # NaN padding gets zero gradient, so plain equality works on the whole buffers.
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------ support checks
def test_support_problems():
    layout, _ = pattern_case(Neighborhood(kernel_size=(3, 3, 5)), GRID_110, 32, 32)
    n = GRID_110.num_tokens
    q = torch.randn(1, 2, n, 64, device=DEVICE)
    assert triton_support_problems(q, q, q, layout) == []

    def problems(x, lay=layout):
        return " | ".join(triton_support_problems(x, x, x, lay))

    assert ("head dim D=48 is not supported by backend='triton'; allowed: 16, 32, 64, 80, 96, 128"
            in problems(torch.randn(1, 2, n, 48, device=DEVICE)))
    assert "float64" in problems(q.double())
    assert "N=110" in problems(torch.randn(1, 2, 100, 64, device=DEVICE))
    assert "layout has 3 heads" in problems(q, BlockLayout.stack([layout] * 3))
    big_blocks = Dense().layout(GRID_110, block_size=256)
    assert "block_q=256" in problems(q, big_blocks) and "block_k=256" in problems(q, big_blocks)
    assert "must be 4-D" in problems(q[0])
    assert "layout must be a BlockLayout" in problems(q, "dense")
    assert "k has shape" in " ".join(triton_support_problems(q, q[:, :1], q, layout))
    if not ON_CUDA:
        assert "bfloat16" in problems(q.bfloat16())
    with pytest.raises(UserError, match="D=48"):
        triton_block_sparse_attention(*(torch.randn(1, 1, n, 48),) * 3, layout, 0.1, False)
    with pytest.raises(UserError, match="scale"):
        triton_block_sparse_attention(q, q, q, layout, -1.0, False)


# ------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not ON_CUDA, reason="needs an NVIDIA GPU (CUDA)")
CUDA_GRID = VideoGrid(8, 24, 32)  # N = 6144
CUDA_CASES = [
    pytest.param(Neighborhood(kernel_size=(3, 7, 7)), CUDA_GRID, 128, 128, (2, 8, 8), id="na-tiled-128"),
    pytest.param(Neighborhood(kernel_size=(3, 7, 7)), VideoGrid(5, 30, 31, text_tokens=77), 64, 64, None,
                 id="na-ragged-64"),
    pytest.param(Radial(block_size=128), CUDA_GRID, 128, 128, None, id="radial-128"),
    pytest.param(Dense(), VideoGrid(4, 30, 33, text_tokens=13), 128, 64, None, id="dense-ragged-128x64"),
]


def _cuda_check(pattern, grid, block_q, block_k, tile_shape, dtype, head_dim=128, heads=2, per_head=False):
    layout, mask = pattern_case(pattern, grid, block_q, block_k, tile_shape)
    if per_head:
        other, other_mask = pattern_case(Dense(), grid, block_q, block_k, tile_shape)
        layout = BlockLayout.stack([layout, other])
        mask = torch.stack([mask, other_mask])
    layout = layout.to("cuda")
    mask = mask.cuda()
    n = grid.num_tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, device="cuda", generator=gen, dtype=dtype) for _ in range(4))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    scale = head_dim**-0.5
    out, lse = triton_block_sparse_attention(q, k, v, layout, scale, True)
    got = torch.autograd.grad(out, (q, k, v), do)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # fp32 reference for 16-bit inputs; float64 for fp32 inputs (else the plain-torch error is 0).
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        leaves32 = [x.detach().to(ref_dtype).requires_grad_(True) for x in (q, k, v)]
        r_out, r_lse, _ = reference(*leaves32, mask, scale, ref_dtype)
        want = torch.autograd.grad(r_out, leaves32, do.to(ref_dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    p_out, _, _ = reference(*leaves, mask, scale)
    plain = torch.autograd.grad(p_out, leaves, do)
    assert_close_2x("out", out, p_out, r_out, dtype)
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), r_lse[finite].double(), atol=2e-2, rtol=2e-3)
    for name, g, p, w in zip(("dq", "dk", "dv"), got, plain, want):
        assert_close_2x(name, g, p, w, dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern, grid, block_q, block_k, tile_shape", CUDA_CASES)
def test_cuda_forward_backward(pattern, grid, block_q, block_k, tile_shape, dtype):
    _cuda_check(pattern, grid, block_q, block_k, tile_shape, dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("head_dim", [64, 80, 96])
def test_cuda_head_dims_per_head_layout(head_dim):
    _cuda_check(Neighborhood(kernel_size=(3, 5, 5)), VideoGrid(4, 24, 40), 64, 64, None, torch.bfloat16, head_dim,
                per_head=True)


@pytest.mark.cuda
@cuda
def test_cuda_fp32_matches_tightly():
    """fp32 inputs use exact fp32 dots (no TF32) unless torch's TF32 switch is on."""
    _cuda_check(Neighborhood(kernel_size=(3, 7, 7)), VideoGrid(4, 24, 32), 64, 64, None, torch.float32, 64)


@pytest.mark.cuda
@cuda
def test_cuda_deterministic():
    layout = Radial(block_size=128).layout(CUDA_GRID, block_size=128, device="cuda")
    q, k, v = (torch.randn(2, 4, CUDA_GRID.num_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = triton_block_sparse_attention(q, k, v, layout, 0.088, False)
    b = triton_block_sparse_attention(q, k, v, layout, 0.088, False)
    assert torch.equal(a, b)


def test_autotune_pruning_fits_the_gpu(monkeypatch):
    """The config pruner keeps pipelined configs that fit shared memory, and never returns nothing."""
    import triton

    from diffattn.kernels import triton_attention, triton_fwd

    configs = [
        triton.Config({"SPLIT": split}, num_warps=warps, num_stages=stages)
        for split in (1, 2, 4)
        for warps in (4, 8)
        for stages in (1, 2, 3)
    ]
    q = torch.empty(1, 1, 8, 128, dtype=torch.float16)
    args = {"Q": q, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 128}
    h100 = 227 * 1024
    monkeypatch.setattr(triton_attention, "shared_memory_limit", lambda device: h100)
    kept = triton_fwd.prune_configs("dkdv")(configs, args)
    assert kept and all(c.num_stages == 2 for c in kept)  # 3 stages do not fit, 1 is not needed
    assert {c.kwargs["SPLIT"] for c in kept} == {1, 2, 4}
    assert all(c.num_warps == 8 for c in kept if c.kwargs["SPLIT"] == 1)  # 128 x 128 tiles: 8 warps
    # fp32, D=128, 128-wide blocks: nothing fits; the pruner still returns one 1-stage config.
    kept = triton_fwd.prune_configs("dkdv")(configs, {**args, "Q": q.float()})
    assert len(kept) == 1 and kept[0].num_stages == 1
    # Measured on sm_90: fwd 128x128, D=128, fp16, 2 stages = 165,888 bytes.
    assert abs(triton_attention.smem_estimate("fwd", 128, 128, 128, 2, 2) - 165_888) < 4096
