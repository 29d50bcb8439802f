"""PooledAgents (agent attention with agents pooled over the 3-D token grid, our extension) on a
tiny Wan pipeline: each call equals the plain formula with agents averaged cell by cell."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffattn import PooledAgents, VideoGrid
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.processors import agent as agent_module

from .tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs


def cell_means(q: torch.Tensor, grid: VideoGrid, pool: tuple[int, int, int]) -> torch.Tensor:
    """``[B, H, A, D]``: the mean query of each pool cell, cells in raster order (a loop, float64)."""
    video = q.double().unflatten(2, (grid.frames, grid.height, grid.width))
    starts = [range(0, size, cell) for size, cell in zip((grid.frames, grid.height, grid.width), pool)]
    means = [video[:, :, t:t + pool[0], h:h + pool[1], w:w + pool[2]].flatten(2, 4).mean(2)
             for t, h, w in itertools.product(*starts)]
    return torch.stack(means, 2)


def test_pooled_agents_on_wan_equal_the_plain_formula(monkeypatch):
    calls = []
    original = agent_module.pooled_agent_attention

    def record(query, key, value, grid, pattern):
        out = original(query, key, value, grid, pattern)
        calls.append((query, key, value, grid, out))
        return out

    monkeypatch.setattr(agent_module, "pooled_agent_attention", record)
    pipe = tiny_wan_pipeline()
    stock = pipe(**wan_call_kwargs(steps=2)).frames
    pattern = PooledAgents(pool=(1, 2, 3), k_scale2=0.3, shortcut=0.075)
    apply(pipe, pattern)
    try:
        latents = pipe(**wan_call_kwargs(steps=2)).frames
        assert not sparsity_state(pipe).fallbacks
    finally:
        remove(pipe)
    assert torch.isfinite(latents).all() and not torch.allclose(latents, stock)
    assert len(calls) == 2 * 2 * 2  # steps x CFG passes x layers
    for query, key, value, grid, out in calls:
        assert grid == VideoGrid(3, 4, 4)
        q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
        agents = cell_means(q, grid, pattern.pool)
        assert agents.shape[2] == 3 * 2 * 2
        s = q.shape[-1] ** -0.5
        expected = torch.softmax(q @ agents.mT * s ** 0.3, -1) @ (torch.softmax(agents @ k.mT * s, -1) @ v) + 0.075 * v
        torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


def test_agentsd_on_a_video_transformer_falls_back_to_stock_with_a_warning():
    from diffattn import AgentSD, DenseFallbackWarning

    pipe = tiny_wan_pipeline(num_layers=1)
    stock = pipe(**wan_call_kwargs(steps=1)).frames
    apply(pipe, AgentSD())
    try:
        with pytest.warns(DenseFallbackWarning, match="not a block-sparse pattern"):
            latents = pipe(**wan_call_kwargs(steps=1)).frames
    finally:
        remove(pipe)
    torch.testing.assert_close(latents, stock, atol=0, rtol=0)
