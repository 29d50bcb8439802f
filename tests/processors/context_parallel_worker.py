"""One rank of the context-parallel tests (run by ``torch.multiprocessing.spawn``, gloo backend).

diffusers refuses context parallelism without an accelerator (``_resolve_parallel_config`` divides
by ``torch.accelerator.device_count()``): :func:`stand_in_for_an_accelerator` makes these CPU
processes report one CPU "accelerator", which is enough for a gloo device mesh. Test-only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffattn import Dense, Neighborhood
from diffattn.patterns.layout import BlockLayout
from diffattn.processors import SparsityConfig

from ..adapters.test_ltx_video import tiny_ltx_transformer
from ..adapters.tiny_flux import TEXT_DIM, flux_call_kwargs, tiny_flux_pipeline
from ..adapters.tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs

STEPS = 2


class DenseThenNeighborhood(Dense):
    """A per-head pattern: head 0 dense, the other heads a (3, 3, 3) neighbourhood (test-only)."""

    heads = 2

    def layout(self, grid: Any, block_size: int = 128, tile_shape: Any = None, device: Any = "cpu") -> BlockLayout:
        dense = Dense().layout(grid, block_size=block_size, device=device)
        local = Neighborhood(kernel_size=(3, 3, 3)).layout(grid, block_size=block_size, device=device)
        return BlockLayout.stack([dense, *[local] * (self.heads - 1)])


def case_config(case: str) -> SparsityConfig | None:
    """The diffattn config of a named test case (None: stock diffusers)."""
    return {
        "stock": None,
        "dense": SparsityConfig(pattern=Dense(), block_size=32),
        "neighborhood": SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32),
        "per-head": SparsityConfig(pattern=DenseThenNeighborhood(), block_size=32),
    }[case]


def _flux_call_kwargs(steps: int) -> dict[str, Any]:
    # 8 text tokens: diffusers splits the text stream evenly over the ranks too.
    text = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    return {**flux_call_kwargs(steps=steps), "prompt_embeds": text}


#: family -> (tiny pipeline, its call arguments for ``steps`` steps).
FAMILIES = {
    "wan": (tiny_wan_pipeline, lambda steps: wan_call_kwargs(steps=steps)),
    "flux": (tiny_flux_pipeline, _flux_call_kwargs),
}


def run_case(family: str, case: str, ulysses_degree: int | None) -> dict[str, Any]:
    """Latents of a 2-step run of a tiny pipeline of ``family``, and what diffattn booked
    (``ulysses_degree`` None: no context parallelism)."""
    from diffattn.adapters import apply, sparsity_state

    if family == "ltx_video":
        return _run_ltx_transformer(case, ulysses_degree)
    make_pipeline, call_kwargs = FAMILIES[family]
    pipe = make_pipeline()
    config = case_config(case)
    if config is not None:
        apply(pipe, config)
    if ulysses_degree is not None:
        from diffusers import ContextParallelConfig

        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))
    output = pipe(**call_kwargs(STEPS))
    result: dict[str, Any] = {"latents": output.images if family == "flux" else output.frames}
    if config is not None:
        state = sparsity_state(pipe)
        grid = state.grid
        result.update(sparse_calls=sum(state.sparse_calls.values()), fallbacks=dict(state.fallbacks),
                      grid=(grid.frames, grid.height, grid.width, grid.text_tokens))
    return result


def _run_ltx_transformer(case: str, ulysses_degree: int | None) -> dict[str, Any]:
    """LTX-Video at the transformer level, without a prompt mask: diffusers' own Ulysses attention
    fails on the LTX pipeline's cross-attention mask (prepared for all heads, not the rank's)."""
    from diffattn.adapters import install
    from diffattn.adapters.ltx_video import LTXVideoAdapter
    from diffattn.processors.state import SparsityState

    torch.manual_seed(0)
    transformer = tiny_ltx_transformer()
    install(LTXVideoAdapter(), transformer, case_config(case), scheduler=None)
    if ulysses_degree is not None:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))
    generator = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 3 * 8 * 8, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                  timestep=torch.tensor([500]), encoder_attention_mask=None, num_frames=3, height=8, width=8)
    with torch.no_grad():
        latents = torch.cat([transformer(**inputs, return_dict=False)[0] for _ in range(STEPS)])
    state: SparsityState = transformer._diffattn_installed.state
    grid = state.grid
    return dict(latents=latents, sparse_calls=sum(state.sparse_calls.values()), fallbacks=dict(state.fallbacks),
                grid=(grid.frames, grid.height, grid.width, grid.text_tokens))


def stand_in_for_an_accelerator() -> None:
    torch.accelerator.device_count = lambda: 1
    torch._C._get_accelerator = lambda: torch.device("cpu")


def rank_main(rank: int, world_size: int, port: int, out_dir: str, cases: list[tuple[str, str]]) -> None:
    """Entry point of one spawned rank: runs ``(family, case)`` pairs under Ulysses degree ``world_size``
    and writes ``<family>-<case>-<rank>.pt`` under ``out_dir``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    stand_in_for_an_accelerator()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for family, case in cases:
            torch.save(run_case(family, case, world_size), Path(out_dir) / f"{family}-{case}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
