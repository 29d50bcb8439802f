"""torch.compile of a whole sparse transformer: one graph per kind of step (dense warm-up, sparse),
no graph break at the sparse call, no recompile across layers or steps, the eager output.

"aot_eager" runs dynamo and AOTAutograd (the graph inductor would receive) without inductor's code
generation, which would take minutes per graph on a 2-core CPU.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from diffattn import Neighborhood, SparsityConfig
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.errors import DenseFallbackWarning, UserError
from tests.adapters.tiny_pipelines import tiny_wan_pipeline
from tests.kernels.test_compile import fresh_dynamo, graph_breaks  # noqa: F401 (an autouse fixture)

STEPS = 4
CONFIG = SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32, dense_steps=1)
# 3 x 4 x 4 = 48 tokens: two ragged 32-token blocks, and a 3x3x3 window that is sparse on each axis.
LATENTS = (1, 16, 3, 8, 8)


class Denoiser:
    """Direct transformer calls at each step of a ``STEPS``-step schedule (what the pipeline does)."""

    def __init__(self, num_layers: int, config: SparsityConfig = CONFIG, dtype: torch.dtype = torch.float32) -> None:
        self.pipe = tiny_wan_pipeline(num_layers=num_layers)
        self.pipe.transformer.to(dtype)
        self.pipe.scheduler.set_timesteps(STEPS)
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(LATENTS, generator=generator).to(dtype)
        self.text = torch.randn(1, 8, 32, generator=generator).to(dtype)
        if config is not None:
            apply(self.pipe, config)

    def __call__(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        self.pipe.scheduler._step_index = step
        timestep = self.pipe.scheduler.timesteps[step : step + 1]
        return model(hidden_states=self.latents, timestep=timestep, encoder_hidden_states=self.text,
                     return_dict=False)[0]


def compile_transformer(transformer: torch.nn.Module, how: str, backend: object,
                        fullgraph: bool = True) -> torch.nn.Module:
    """``"whole"``: ``torch.compile(transformer)``; ``"blocks"``: diffusers' ``compile_repeated_blocks``
    (each block compiled on its own: the layers must share graphs, not recompile per layer)."""
    if how == "whole":
        return torch.compile(transformer, backend=backend, fullgraph=fullgraph)
    transformer.compile_repeated_blocks(backend=backend, fullgraph=fullgraph)
    return transformer


def check_compiles_once_per_kind_of_step(num_layers: int, how: str = "whole") -> None:
    run = Denoiser(num_layers)
    transformer = run.pipe.transformer
    eager = [run(transformer, step) for step in range(STEPS)]
    state = sparsity_state(run.pipe)
    eager_calls = dict(state.sparse_calls)
    assert eager_calls == {(step, layer): 1 for step in range(1, STEPS) for layer in range(num_layers)}
    state.sparse_calls.clear()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_transformer(transformer, how, counter)
    for step in range(STEPS):
        torch.testing.assert_close(run(compiled, step), eager[step], atol=1e-5, rtol=1e-5)
    # One graph for the dense warm-up step, one for all sparse steps (whatever the step index).
    assert counter.frame_count == 2 and graph_breaks() == 0
    # The compiled forward really ran the sparse kernel, on every layer of every sparse step.
    assert dict(state.sparse_calls) == eager_calls
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(STEPS):
            torch.testing.assert_close(run(compiled, step), eager[step], atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 2

    remove(run.pipe)  # the sparse steps are not the stock ones: the comparison above is not trivial
    with torch.compiler.set_stance("force_eager"):
        assert not torch.allclose(run(transformer, STEPS - 1), eager[STEPS - 1], atol=1e-4)


@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_compiled_transformer_has_one_graph_per_kind_of_step_and_the_eager_output(how):
    check_compiles_once_per_kind_of_step(num_layers=3, how=how)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFATTN_SLOW_COMPILE"),
                    reason="compiles a 40-block transformer (~2 minutes): set DIFFATTN_SLOW_COMPILE=1")
def test_forty_blocks_compile_once_per_kind_of_step():
    check_compiles_once_per_kind_of_step(num_layers=40)


@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_fallbacks_of_a_compiled_transformer_warn_once_after_the_call_without_a_graph_break(how):
    """float64 inputs, which the CPU kernel refuses: every sparse call runs the stock attention;
    the compiled code notes the reason and the post-hook warns, as eager calls do."""
    run = Denoiser(num_layers=2, dtype=torch.float64)
    stock = Denoiser(num_layers=2, dtype=torch.float64, config=None)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_transformer(run.pipe.transformer, how, counter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [run(compiled, step) for step in range(STEPS)]
    fallback_warnings = [w for w in caught if issubclass(w.category, DenseFallbackWarning)]
    assert len(fallback_warnings) == 1 and "float64" in str(fallback_warnings[0].message)
    state = sparsity_state(run.pipe)
    assert sum(state.fallbacks.values()) == 2 * (STEPS - 1) and not state.sparse_calls
    assert graph_breaks() == 0 and counter.frame_count == 2
    for step, output in enumerate(outputs):
        torch.testing.assert_close(output, stock(stock.pipe.transformer, step), atol=1e-10, rtol=1e-10)


def test_on_unsupported_raise_still_raises_when_compiled():
    run = Denoiser(num_layers=1, dtype=torch.float64,
                   config=SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), block_size=32,
                                         on_unsupported="raise"))
    compiled = torch.compile(run.pipe.transformer, backend="aot_eager", fullgraph=True)
    with pytest.raises(UserError, match="float64"):
        run(compiled, 1)
