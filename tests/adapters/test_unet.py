"""UNet family (SD 1.5 and SDXL layouts) on tiny offline pipelines: families, stock equivalence,
AgentSD against a brute-force statement of the algorithm, per-level Neighborhood grids, the
step schedule, per-layer overrides, LoRA, batch and CFG, remove(), bad input."""

from __future__ import annotations

import sys

import pytest
import torch

import diffattn
from diffattn import AgentSD, Dense, Neighborhood, Radial, UserError, VideoGrid
from diffattn.adapters import apply, find_adapter, remove, sparsity_state
from diffattn.processors import agent as agent_module
from diffattn.processors import unet as unet_module
from diffattn.processors.agent import level_grid, tome_merges
from diffattn.processors.presets import parse_preset

from .reference import masked_attention
from .tiny_unet import tiny_sd_pipeline, tiny_sdxl_pipeline, unet_call_kwargs

SIZE = 32  # pixels: 16 x 16 latents with the tiny VAE
STEPS = 3
# Self-attention layers of the tiny UNets (execution order) and their downsampling.
SD_LAYERS = {0: 1, 1: 2, 2: 1, 3: 1}  # down_blocks.0, mid_block, up_blocks.1 (x2)
SDXL_LAYERS = {0: 2, 1: 2, 2: 2, 3: 2}  # down_blocks.1, mid_block, up_blocks.0 (x2)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request):
    xl = request.param == "sdxl"
    pipe = tiny_sdxl_pipeline() if xl else tiny_sd_pipeline()

    def call(**kwargs):
        return pipe(**unet_call_kwargs(xl=xl, size=SIZE, steps=STEPS, **kwargs)).images

    remove(pipe)
    return request.param, pipe, call, call(guidance_scale=3.0)


def _module_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_each_pipeline_finds_its_family(family):
    name, pipe, _, _ = family
    assert find_adapter(pipe).family == name


def test_dense_pattern_through_the_kernel_reproduces_the_stock_pipeline(family):
    _, pipe, call, stock = family
    apply(pipe, Dense(), block_size=32)
    try:
        latents = call(guidance_scale=3.0)
        assert sum(sparsity_state(pipe).sparse_calls.values()) == STEPS * 4  # every attn1 of every step
    finally:
        remove(pipe)
    # the random tiny UNet's latents reach hundreds: float32 rounding relative to that
    torch.testing.assert_close(latents, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-4)


def test_agent_preset_changes_the_output_and_remove_restores_stock_exactly(family):
    name, pipe, call, stock = family
    processors = dict(pipe.unet.attn_processors)
    hooks = _module_hooks(pipe.unet)
    apply(pipe, "agent")
    try:
        latents = call(guidance_scale=3.0)
        state = sparsity_state(pipe)
        assert not state.fallbacks
        ran = {layer for (_, layer) in state.sparse_calls}
        # highest-resolution self-attention only: d = 1 for SD; SDXL's first attention level is d = 2
        levels = SD_LAYERS if name == "sd" else SDXL_LAYERS
        assert ran == {layer for layer, d in levels.items() if d == min(levels.values())}
    finally:
        remove(pipe)
    assert torch.isfinite(latents).all() and not torch.allclose(latents, stock, atol=1e-3)
    assert pipe.unet.attn_processors == processors and _module_hooks(pipe.unet) == hooks
    torch.testing.assert_close(call(guidance_scale=3.0), stock, atol=0, rtol=0)


def test_radial_is_refused_for_unets(family):
    _, pipe, _, _ = family
    with pytest.raises(UserError, match="Radial does not apply"):
        apply(pipe, Radial())
    assert sparsity_state(pipe) is None


# -- AgentSD against a brute-force statement -------------------------------------------------


def brute_force_groups(metric: torch.Tensor, height: int, width: int, cell: int, merged: int) -> torch.Tensor:
    """``[N]`` group id of each token of one image: ToMe without randomness (each cell's top-left
    token is its destination; the ``merged`` sources most similar to a destination join it)."""
    tokens = height * width
    rows, cols = torch.arange(tokens) // width, torch.arange(tokens) % width
    covered = (rows < height // cell * cell) & (cols < width // cell * cell)
    is_dst = covered & (rows % cell == 0) & (cols % cell == 0)
    dst, src = is_dst.nonzero().flatten(), (~is_dst).nonzero().flatten()
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best_score, best_dst = (unit[src] @ unit[dst].T).max(dim=-1)
    groups = torch.arange(tokens)
    order = best_score.argsort(descending=True)[:merged]
    groups[src[order]] = dst[best_dst[order]]
    return groups


def grouped_means(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``x`` ``[N, C]`` over each group, and each token's row in them."""
    ids, inverse = groups.unique(return_inverse=True)
    sums = torch.zeros(len(ids), x.shape[-1], dtype=x.dtype).index_add_(0, inverse, x)
    return sums / torch.bincount(inverse)[:, None].to(x.dtype), inverse


def agentsd_reference(attn, block_input: torch.Tensor, hidden: torch.Tensor, height: int, width: int,
                      settings: AgentSD) -> torch.Tensor:
    """AgentSD's self-attention output for one image ``[N, C]``, float64, from the module's weights."""
    tokens = height * width
    cells = (height // settings.sy) * (width // settings.sx)
    r = min(int(tokens * settings.ratio), tokens - cells)
    agent_r = min(int(tokens * settings.agent_ratio), tokens - cells)
    merged, inverse = grouped_means(hidden.double(), brute_force_groups(block_input.double(), height, width,
                                                                        settings.sx, r))
    agent_tokens, _ = grouped_means(hidden.double(), brute_force_groups(block_input.double(), height, width,
                                                                        settings.sx, agent_r))
    assert (tokens - agent_r) * 2 < tokens - r  # the agent branch

    def project(linear, x):
        return (x @ linear.weight.double().T + (linear.bias.double() if linear.bias is not None else 0))

    heads = attn.heads
    q, k, v, a = (project(lin, x).unflatten(-1, (heads, -1)).transpose(0, 1)
                  for lin, x in ((attn.to_q, merged), (attn.to_k, merged), (attn.to_v, merged),
                                 (attn.to_q, agent_tokens)))
    s = q.shape[-1] ** -0.5
    out = torch.softmax(q @ a.mT * s ** settings.k_scale2, -1) @ (torch.softmax(a @ k.mT * s, -1) @ v)
    out = (out + settings.shortcut * v).transpose(0, 1).flatten(1)
    out = project(attn.to_out[0], out)
    return out[inverse]


def test_agentsd_layer_equals_the_brute_force_algorithm():
    pipe = tiny_sd_pipeline()
    settings = AgentSD(use_rand=False, steps={})
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}

    def block_input(module, args, kwargs):
        seen["block"] = args[0] if args else kwargs["hidden_states"]

    def attention_io(module, args, kwargs, out):
        seen["io"] = (args[0] if args else kwargs["hidden_states"], out)

    block.register_forward_pre_hook(block_input, with_kwargs=True)
    attn.register_forward_hook(attention_io, with_kwargs=True)
    apply(pipe, settings)
    pipe(**unet_call_kwargs(size=SIZE, steps=1, batch=2))
    hidden, out = seen["io"]
    assert out.shape == hidden.shape == (2, 256, 32)
    for image in range(2):
        expected = agentsd_reference(attn, seen["block"][image], hidden[image], 16, 16, settings)
        torch.testing.assert_close(out[image].double(), expected, atol=2e-5, rtol=1e-4)


def test_paper_schedule_uses_agents_until_step_19_and_plain_tome_from_step_20():
    preset = diffattn.processors.presets.load_preset("agent", family="sd").config.pattern
    assert preset == AgentSD()  # the preset is the paper's configuration, also AgentSD's defaults
    metric = torch.randn(2, 64 * 64, 8)
    early = tome_merges(metric, 64, 64, preset.settings(step=19), None)
    late = tome_merges(metric, 64, 64, preset.settings(step=20), None)
    # 4 x 4 cells: 256 destinations; 0.95 * N merged away for the agents, 0.4 * N for the tokens
    assert (early.num_agents, early.merged_tokens) == (256, 4096 - 1638)
    assert (late.num_agents, late.agent_merge) == (0, None) and late.merged_tokens == 4096 - 1638


def test_schedule_switches_at_the_configured_step(monkeypatch):
    pipe = tiny_sd_pipeline()
    calls = []
    original = unet_module.tome_merges

    def record(metric, height, width, settings, generator):
        merges = original(metric, height, width, settings, generator)
        calls.append((settings.sx, merges.num_agents))
        return merges

    monkeypatch.setattr(unet_module, "tome_merges", record)
    apply(pipe, AgentSD(steps={2: {"sx": 2, "sy": 2, "agent_ratio": 0.5}}))
    pipe(**unet_call_kwargs(size=SIZE, steps=4))
    per_step = 3  # the d = 1 layers
    assert len(calls) == 4 * per_step
    assert all(sx == 4 and agents == 16 for sx, agents in calls[: 2 * per_step])  # 16 cells of 4 x 4
    assert all(sx == 2 and agents == 0 for sx, agents in calls[2 * per_step:])  # plain ToMe
    assert {step for step, _ in sparsity_state(pipe).sparse_calls} == {0, 1, 2, 3}


def test_per_layer_overrides_by_name_and_index(monkeypatch):
    pipe = tiny_sd_pipeline()
    merged = {}
    original = unet_module.tome_merges

    def record(metric, height, width, settings, generator):
        merges = original(metric, height, width, settings, generator)
        merged.setdefault(metric.shape[1], set()).add(merges.merged_tokens)
        return merges

    monkeypatch.setattr(unet_module, "tome_merges", record)
    config = AgentSD(layers={"mid_block.*": {"max_downsample": 2}, 0: {"ratio": 0.25}}, steps={})
    apply(pipe, config)
    pipe(**unet_call_kwargs(size=SIZE, steps=1))
    assert {layer for _, layer in sparsity_state(pipe).sparse_calls} == {0, 1, 2, 3}  # mid block too
    assert merged[256] == {256 - 64, 256 - 102}  # layer 0 merges 25 %, layers 2, 3 merge 40 %
    assert merged[64] == {64 - 25}


def test_neighborhood_runs_on_each_level_grid(recorded):
    pipe = tiny_sd_pipeline()
    pattern = Neighborhood(kernel_size=(1, 3, 3))
    apply(pipe, pattern, block_size=32)
    pipe(**unet_call_kwargs(size=SIZE, steps=1))
    assert sorted(q.shape[2] for q, *_ in recorded) == [64, 256, 256, 256]
    for q, k, v, layout, out in recorded:
        _, grid = level_grid(VideoGrid(1, 16, 16), q.shape[2])
        torch.testing.assert_close(out.double(), masked_attention(q, k, v, pattern.token_mask(grid)),
                                   atol=1e-5, rtol=1e-5)


def test_bad_agent_counts_and_ratios_are_user_errors():
    q = torch.randn(1, 2, 16, 8)
    for agents in (q[:, :, :0], torch.randn(1, 2, 17, 8)):
        with pytest.raises(UserError, match="agent count A="):
            diffattn.agent_attention(q, q, q, agents)
    with pytest.raises(UserError, match="ratio"):
        parse_preset({"description": "x", "pattern": {"type": "agent", "ratio": 2}}, "bad.yaml")
    with pytest.raises(UserError, match="not a block-sparse pattern"):
        AgentSD().layout(VideoGrid(1, 8, 8))


def test_missing_tomesd_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomesd", None)
    monkeypatch.setitem(sys.modules, "tomesd.merge", None)
    with pytest.raises(UserError, match="pip install 'diffattn\\[unet\\]'"):
        agent_module.tome_merges(torch.randn(1, 64, 4), 8, 8, AgentSD(), None)


def test_sparse_processors_on_a_bare_unet_use_its_family_presets():
    """The diffusers way on ``pipe.unet`` alone: an SDXL UNet gets the sdxl presets (its first
    attention level is downsampled 2x), an SD one the sd presets."""
    for build, ran in ((tiny_sd_pipeline, {0, 2, 3}), (tiny_sdxl_pipeline, {0, 1, 2, 3})):
        pipe = build()
        pipe.unet.set_attn_processor(diffattn.sparse_processors(pipe.unet, "agent", scheduler=pipe.scheduler))
        pipe(**unet_call_kwargs(xl=build is tiny_sdxl_pipeline, size=SIZE, steps=1))
        assert {layer for _, layer in sparsity_state(pipe).sparse_calls} == ran
        remove(pipe.unet)


def test_the_profiler_refuses_unet_pipelines_instead_of_reporting_latent_grid_densities():
    with pytest.raises(UserError, match="does not cover the sd"):
        diffattn.profile(tiny_sd_pipeline(), "agent", prompt_embeds=torch.zeros(1, 7, 32), height=SIZE, width=SIZE,
                         num_inference_steps=1)
