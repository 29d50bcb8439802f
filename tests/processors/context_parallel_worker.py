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


def run_case(case: str, ulysses_degree: int | None) -> dict[str, Any]:
    """Latents of a 2-step tiny Wan run, and what diffattn booked (``ulysses_degree`` None: no CP)."""
    from diffattn.adapters import apply, sparsity_state

    pipe = tiny_wan_pipeline()
    config = case_config(case)
    if config is not None:
        apply(pipe, config)
    if ulysses_degree is not None:
        from diffusers import ContextParallelConfig

        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))
    latents = pipe(**wan_call_kwargs(steps=STEPS)).frames
    result: dict[str, Any] = {"latents": latents}
    if config is not None:
        state = sparsity_state(pipe)
        grid = state.grid
        result.update(sparse_calls=sum(state.sparse_calls.values()), fallbacks=dict(state.fallbacks),
                      grid=(grid.frames, grid.height, grid.width))
    return result


def stand_in_for_an_accelerator() -> None:
    torch.accelerator.device_count = lambda: 1
    torch._C._get_accelerator = lambda: torch.device("cpu")


def rank_main(rank: int, world_size: int, port: int, out_dir: str, cases: list[str]) -> None:
    """Entry point of one spawned rank: writes ``<case>-<rank>.pt`` under ``out_dir``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    stand_in_for_an_accelerator()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for case in cases:
            torch.save(run_case(case, world_size), Path(out_dir) / f"{case}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
