"""diffattn under diffusers' context parallelism: Ulysses degree 2 on 2 gloo CPU processes.

The two ranks (:mod:`tests.processors.context_parallel_worker`) stand in for diffusers' accelerator
lookup (``torch.accelerator.device_count`` and ``torch._C._get_accelerator`` report one CPU
device): diffusers refuses context parallelism on a machine without an accelerator, and nothing
else in its context-parallel code needs one. The reference is the same run (tiny Wan and FLUX
pipelines, the tiny LTX-Video transformer) in one process, without context parallelism.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffattn import Dense, DenseFallbackWarning, UserError, VideoGrid
from diffattn.adapters import ADAPTERS
from diffattn.processors import SparsityConfig, SparsityState
from diffattn.processors.base import CONTEXT_PARALLEL
from diffattn.processors.parallel import gathered_order

from . import context_parallel_worker as worker

CASES = [("wan", "stock"), ("wan", "dense"), ("wan", "neighborhood"), ("wan", "per-head"),
         ("ltx_video", "dense"), ("ltx_video", "per-head"), ("flux", "dense"), ("flux", "per-head")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ulysses_runs(tmp_path_factory):
    """``{(family, case): [rank 0 result, rank 1 result]}`` of tiny pipelines under Ulysses degree 2."""
    out_dir = tmp_path_factory.mktemp("ulysses")
    mp.spawn(worker.rank_main, args=(2, _free_port(), str(out_dir), CASES), nprocs=2, join=True)
    return {(family, case): [torch.load(out_dir / f"{family}-{case}-{rank}.pt") for rank in range(2)]
            for family, case in CASES}


@pytest.mark.parametrize("family_case", CASES, ids="-".join)
def test_ulysses_degree_2_matches_one_process(ulysses_runs, family_case):
    family, case = family_case
    expected = worker.run_case(family, case, ulysses_degree=None)
    for rank, result in enumerate(ulysses_runs[family_case]):
        torch.testing.assert_close(result["latents"], expected["latents"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, rank=rank: f"rank {rank}: {m}")
        if case == "stock":
            continue
        # Really sparse on every rank (every layer, every transformer call), no fallback, and the
        # grid the layouts were built for is the global one, not a shard's.
        assert result["fallbacks"] == {}, (rank, result["fallbacks"])
        assert result["sparse_calls"] == expected["sparse_calls"] == SPARSE_CALLS[family]
        assert result["grid"] == expected["grid"] == GRIDS[family]


#: Self-attention calls of a 2-step run: layers x transformer calls per step x steps (Wan runs
#: CFG as two calls, LTX batches it, the FLUX test runs no CFG: 1 double + 2 single blocks).
SPARSE_CALLS = {"wan": 2 * 2 * worker.STEPS, "ltx_video": 2 * worker.STEPS, "flux": 3 * worker.STEPS}
#: The global grids (frames, height, width, text tokens) of the test runs.
GRIDS = {"wan": (3, 4, 4, 0), "ltx_video": (3, 8, 8, 0), "flux": (1, 8, 6, 8)}


def test_sparse_presets_differ_from_dense(ulysses_runs):
    # The sparse cases would pass vacuously if their patterns changed nothing.
    for family, case in CASES:
        if case not in ("stock", "dense"):
            dense = ulysses_runs[(family, "dense")][0]["latents"]
            assert (ulysses_runs[(family, case)][0]["latents"] - dense).abs().max() > 1e-3, family


class _ContextParallel:
    """What ``enable_parallelism`` sets on a processor (only the fields diffattn reads)."""

    def __init__(self, ring_degree: int = 1, ulysses_degree: int = 2, ulysses_anything: bool = False) -> None:
        self.context_parallel_config = type("CP", (), dict(
            ring_degree=ring_degree, ulysses_degree=ulysses_degree, ulysses_anything=ulysses_anything))()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.family)
def test_only_ulysses_on_a_dispatch_family_runs_sparse(adapter):
    processor_class = adapter.processor_class
    state = SparsityState(SparsityConfig(pattern=Dense()))
    state.grid = VideoGrid(1, 2, 2)
    processor = processor_class(state=state)
    processor._parallel_config = _ContextParallel()
    assert processor.stock._parallel_config is processor._parallel_config  # the stock path is the CP one
    ulysses = processor.fallback_reason({})
    if adapter.family in ("wan", "ltx_video", "flux"):  # the families with a _cp_plan in diffusers
        assert ulysses is None
    else:
        assert ulysses == CONTEXT_PARALLEL
    for refused in (_ContextParallel(ring_degree=2, ulysses_degree=1), _ContextParallel(ulysses_anything=True)):
        processor._parallel_config = refused
        reason = processor.fallback_reason({})
        assert reason is not None and "Ulysses" in reason


def test_ring_attention_is_refused_naming_ulysses():
    state = SparsityState(SparsityConfig(pattern=Dense(), on_unsupported="raise"))
    state.grid = VideoGrid(1, 2, 2)
    processor = _wan_processor(state)
    processor._parallel_config = _ContextParallel(ring_degree=2, ulysses_degree=1)
    with pytest.raises(UserError, match="Ulysses"):
        processor._decide({})
    state = SparsityState(SparsityConfig(pattern=Dense()))
    state.grid = VideoGrid(1, 2, 2)
    processor = _wan_processor(state)
    processor._parallel_config = _ContextParallel(ring_degree=2, ulysses_degree=1)
    with pytest.warns(DenseFallbackWarning, match="ring attention"):
        processor._decide({})


@pytest.mark.parametrize("text_position", ["start", "end"])
@pytest.mark.parametrize("degree", [2, 4])
def test_gathered_shards_are_put_in_grid_order(text_position, degree):
    grid = VideoGrid(2, 2, 3, text_tokens=8, text_position=text_position)
    tokens = torch.arange(grid.num_tokens)  # grid order
    text_first = text_position == "start"
    text = tokens[:8] if text_first else tokens[grid.video_tokens:]
    video = tokens[8:] if text_first else tokens[:grid.video_tokens]
    # What diffusers' cp plan gives each rank (text and video split apart), joined the family's way.
    shards = [torch.cat([t, v] if text_first else [v, t])
              for t, v in zip(text.chunk(degree), video.chunk(degree))]
    gathered = torch.cat(shards)
    order = gathered_order(grid, degree)
    assert torch.equal(gathered[order], tokens)
    assert gathered_order(VideoGrid(2, 2, 3), degree) is None  # video only: already in order


def _wan_processor(state: SparsityState):
    from diffattn.processors.wan import WanSparseAttnProcessor

    return WanSparseAttnProcessor(state=state)
