"""Rows of the attention mask at real sizes, for tests: read from a layout's tiles, and computed
independently of the library from the patterns' written rules (NATTEN brute force with the
documented fitting rule for Neighborhood, the token-level band rule for Radial)."""

from __future__ import annotations

import torch

from diffattn import BlockLayout, Dense, Neighborhood, Radial, VideoGrid

from .natten_bruteforce import axis_neighbors, fit_axis


def layout_rows(layout: BlockLayout, rows: list[int]) -> torch.Tensor:
    """bool ``[len(rows), N]``: rows of the kernel-order mask, read tile by tile from the layout."""
    n = layout.num_tokens
    out = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        qb, off = divmod(r, layout.block_q)
        count = int(layout.kv_counts[0, qb])
        tiles = layout.tile_masks(layout.kv_mask_ids[0, qb, :count])
        for slot, kb in enumerate(layout.kv_indices[0, qb, :count].tolist()):
            seg = slice(kb * layout.block_k, min((kb + 1) * layout.block_k, n))
            out[i, seg] = tiles[slot, off, : seg.stop - seg.start]
    return out


def layout_rows_in_caller_order(layout: BlockLayout, tokens: list[int]) -> torch.Tensor:
    """bool ``[len(tokens), N]``: the layout's mask rows of caller tokens, keys in caller order."""
    if layout.permutation is None:
        return layout_rows(layout, tokens)
    position = torch.empty_like(layout.permutation)
    position[layout.permutation] = torch.arange(layout.num_tokens)
    kernel_order = layout_rows(layout, position[tokens].tolist())
    out = torch.empty_like(kernel_order)
    out[:, layout.permutation] = kernel_order
    return out


def _neighborhood_video_rows(pattern: Neighborhood, grid: VideoGrid, video: list[int]) -> torch.Tensor:
    key_t, key_h, key_w = grid.coordinates(torch.arange(grid.video_tokens))
    rows = torch.zeros(len(video), grid.video_tokens, dtype=torch.bool)
    settings = [
        fit_axis(length, k, s, d) + (c,)
        for length, k, s, d, c in zip(grid.shape, pattern.kernel_size, pattern.stride, pattern.dilation, pattern.causal)
    ]
    for i, v in enumerate(video):
        allowed = torch.ones(grid.video_tokens, dtype=torch.bool)
        for coordinate, keys, length, (k, s, d, c) in zip(grid.coordinates(torch.tensor(v)), (key_t, key_h, key_w),
                                                           grid.shape, settings):
            near = sorted(axis_neighbors(int(coordinate), length, k, s, d, c))
            allowed &= torch.isin(keys, torch.tensor(near))
        rows[i] = allowed
    return rows


def _radial_token_rule(pattern: Radial, grid: VideoGrid, q_video: torch.Tensor) -> torch.Tensor:
    """The unquantised rule for queries ``q_video`` against every video key (see radial.py)."""
    tpf = grid.tokens_per_frame
    q_frame, q_pos = q_video // tpf, q_video % tpf
    key_frame = torch.arange(grid.frames)
    # Per (query, key frame): dense, or a band of some half-width around the query's position.
    distance = (q_frame[:, None] - key_frame[None, :]).abs()
    dense = (distance <= pattern.dense_frame_distance) | (key_frame < pattern.sink_frames)[None, :]
    half_width = torch.full((grid.frames,), -1.0, dtype=torch.float64)  # per distance; -1: nothing
    top = 2 ** tpf.bit_length()
    for d in range(1, grid.frames):
        band = top / 2 ** d.bit_length() * pattern.decay
        if band >= pattern.block_size:
            half_width[d] = band
        elif d % int(pattern.block_size // band) == 0:
            half_width[d] = pattern.block_size
    spatial = (q_pos[:, None] - torch.arange(tpf)[None, :]).abs().double()  # [Q, tpf]
    inside = spatial[:, None, :] <= half_width[distance][:, :, None]  # [Q, frames, tpf]
    return (dense[:, :, None] | inside).flatten(1)


def _radial_video_rows(pattern: Radial, grid: VideoGrid, video: list[int]) -> torch.Tensor:
    # Block-quantised: a query attends a key block when any token pair of the two blocks is allowed.
    bs = pattern.block_size
    rows = torch.zeros(len(video), grid.video_tokens, dtype=torch.bool)
    padded = -(-grid.video_tokens // bs) * bs
    for i, v in enumerate(video):
        block = torch.arange(v // bs * bs, min(v // bs * bs + bs, grid.video_tokens))
        hit = torch.zeros(padded, dtype=torch.bool)
        hit[: grid.video_tokens] = _radial_token_rule(pattern, grid, block).any(0)
        rows[i] = hit.view(-1, bs).any(1).repeat_interleave(bs)[: grid.video_tokens]
    return rows


def reference_rows(pattern, grid: VideoGrid, tokens: list[int]) -> torch.Tensor:
    """bool ``[len(tokens), N]``: the pattern's mask rows (caller order), text dense."""
    n, off, count = grid.num_tokens, grid.video_offset, grid.video_tokens
    out = torch.ones(len(tokens), n, dtype=torch.bool)
    video = [t - off for t in tokens]
    is_video = [0 <= v < count for v in video]
    chosen = [v for v, ok in zip(video, is_video) if ok]
    if not chosen or isinstance(pattern, Dense):
        return out
    if isinstance(pattern, Neighborhood):
        rows = _neighborhood_video_rows(pattern, grid, chosen)
    elif isinstance(pattern, Radial):
        rows = _radial_video_rows(pattern, grid, chosen)
    else:
        raise TypeError(f"no reference for {type(pattern).__name__}")
    out[torch.tensor(is_video), off : off + count] = rows
    return out
