"""diffattn next to other diffusers/PyTorch machinery, on the tiny Wan pipeline: model CPU offload
(accelerate hooks) before and after ``apply``, and ``torch.compile`` of the transformer."""

from __future__ import annotations

import pytest
import torch

from diffattn import Neighborhood, VideoGrid
from diffattn.adapters import apply, remove, sparsity_state
from diffattn.adapters.base import INSTALLED_ATTRIBUTE
from diffattn.processors import SparsityConfig, WanSparseAttnProcessor

from .tiny_pipelines import tiny_wan_pipeline, wan_call_kwargs

# 9 frames -> 3 latent frames; 64 px / 8 (VAE) / 2 (patch) = 4 tokens per side.
GRID = VideoGrid(3, 4, 4)
# Step 0 dense, the rest sparse: the step index decides per call, so a stale step would show.
CONFIG = SparsityConfig(pattern=Neighborhood(kernel_size=(3, 3, 3)), dense_steps=1, block_size=32)


@pytest.fixture(scope="module")
def references():
    """Stock and sparse (uncompiled, no offload) latents of the 2-layer tiny pipeline, 2 steps."""
    pipe = tiny_wan_pipeline()
    stock = pipe(**wan_call_kwargs(steps=2)).frames
    apply(pipe, CONFIG)
    sparse = pipe(**wan_call_kwargs(steps=2)).frames
    calls = dict(sparsity_state(pipe).sparse_calls)
    remove(pipe)
    assert calls == {(1, 0): 2, (1, 1): 2}  # step 1 x layers x (cond, uncond); step 0 is dense
    assert not torch.allclose(sparse, stock)
    return stock, sparse, calls


@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload_before_or_after_apply(order, references, recorded):
    """``enable_model_cpu_offload`` wraps each model's ``forward`` with accelerate's
    ``cpu_offload_with_hook`` and, after every pipeline call (``maybe_free_model_hooks``), removes and
    re-creates those hooks. diffattn's step/grid hook is a plain ``register_forward_pre_hook``, which
    runs in ``Module.__call__`` before the (wrapped) ``forward`` and survives both.

    Without an accelerator diffusers refuses the default call (``RuntimeError: enable_model_cpu_offload
    requires accelerator``) but runs its real code path with an explicit ``device="cpu"``: the same
    accelerate hooks, with no-op device moves. Our hook only reads shapes and the timestep, so the
    device the model is moved to does not matter to it.
    """
    stock, sparse, calls = references
    pipe = tiny_wan_pipeline()
    if order == "offload_then_apply":
        pipe.enable_model_cpu_offload(device="cpu")
        apply(pipe, CONFIG)
    else:
        apply(pipe, CONFIG)
        pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's offload hook is really in place
    assert isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)

    for run in (1, 2):  # the second run goes through hooks that maybe_free_model_hooks re-created
        latents = pipe(**wan_call_kwargs(steps=2)).frames
        assert hasattr(pipe.transformer, "_hf_hook")
        torch.testing.assert_close(latents, sparse, atol=1e-6, rtol=1e-6)
        assert dict(sparsity_state(pipe).sparse_calls) == {key: run * count for key, count in calls.items()}
    assert len(recorded) == 2 * sum(calls.values())
    assert all(layout.num_tokens == GRID.num_tokens for *_, layout, _ in recorded)

    remove(pipe)  # with offload still active
    assert not isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)
    assert not pipe.transformer._forward_pre_hooks
    torch.testing.assert_close(pipe(**wan_call_kwargs(steps=2)).frames, stock, atol=1e-6, rtol=1e-6)


# "aot_eager" runs dynamo and AOTAutograd (functionalization, the graph inductor would receive)
# without inductor's C++ code generation, which takes over a minute per graph set on this 2-core CPU.
BACKEND = "aot_eager"


@pytest.mark.parametrize("how", ["apply_then_compile_in_place", "compile_wrapper_then_apply"])
def test_torch_compile_gives_the_uncompiled_output(how, recorded):
    """Compiled and uncompiled sparse runs agree, including the step-dependent dense/sparse switch.

    The hooks (step, grid and layout before the forward; counts after it) run eagerly
    (``torch.compiler.disable``); the processors and the kernel's custom op are traced. The
    graph-count checks are in tests/processors/test_compile.py.
    ``torch.compile(module)`` returns a wrapper (``OptimizedModule``): apply/remove reach through it.
    """
    pipe = tiny_wan_pipeline(num_layers=1)  # one block: half the graphs to compile
    kwargs = dict(steps=2)  # step 0 dense, step 1 sparse
    apply(pipe, CONFIG)
    expected = pipe(**wan_call_kwargs(**kwargs)).frames
    expected_calls = dict(sparsity_state(pipe).sparse_calls)
    assert expected_calls == {(1, 0): 2}
    remove(pipe)

    torch._dynamo.reset()
    if how == "apply_then_compile_in_place":
        apply(pipe, CONFIG)
        pipe.transformer.compile(backend=BACKEND)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=BACKEND)
        apply(pipe, CONFIG)
        assert type(pipe.transformer).__name__ == "OptimizedModule"
    recorded.clear()
    try:
        for run in (1, 2):  # the second run reuses the compiled graphs
            latents = pipe(**wan_call_kwargs(**kwargs)).frames
            torch.testing.assert_close(latents, expected, atol=1e-6, rtol=1e-6)
            assert dict(sparsity_state(pipe).sparse_calls) == {key: run * n for key, n in expected_calls.items()}
        assert recorded and all(layout.num_tokens == GRID.num_tokens for *_, layout, _ in recorded)
    finally:
        remove(pipe)
        torch._dynamo.reset()
    model = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
    assert not hasattr(model, INSTALLED_ATTRIBUTE) and not model._forward_pre_hooks and not model._forward_hooks
    assert not isinstance(model.blocks[0].attn1.processor, WanSparseAttnProcessor)
