"""torch.compile: the sparse attention is one custom op, traced without graph breaks, compiled once
for layers whose layouts have the same shapes, with the outputs and gradients of eager mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import diffattn.kernels.backends as backends
from diffattn import BlockLayout, Neighborhood, VideoGrid
from diffattn.errors import UserError
from diffattn.kernels import block_sparse_attention
from diffattn.kernels.op import _layout_args

GRID = VideoGrid(2, 8, 8, text_tokens=6)  # N = 134: ragged blocks
LAYOUT = Neighborhood(kernel_size=(1, 3, 3)).layout(GRID, block_size=32, tile_shape=(1, 4, 8))
N = GRID.num_tokens


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def leaves(h: int = 2, d: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, N, d, generator=gen).requires_grad_() for _ in range(3)]


def outputs_and_grads(fn, inputs: list[torch.Tensor], *args) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    result = fn(*inputs, *args)
    result = list(result) if isinstance(result, tuple) else [result]
    sum(r.float().square().sum() for r in result).backward()
    return [r.detach() for r in result], [x.grad for x in inputs]


def assert_same(eager, compiled) -> None:
    """Equal up to float32 rounding (a compiled graph may order the Linear layers' sums differently)."""
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        assert a.shape == b.shape
        assert (b - a).abs().max() <= 1e-5 * a.abs().max() + 1e-6


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def layout_copy(layout: BlockLayout, flip: int) -> BlockLayout:
    """Another layout object with the same shapes (and, for odd ``flip``, other partial masks)."""
    masks = layout.masks.clone()
    masks[:, 0, 0] ^= flip % 2  # key 0 of query 0 of each partial tile: always inside N
    return dataclasses.replace(
        layout, kv_counts=layout.kv_counts.clone(), kv_indices=layout.kv_indices.clone(),
        kv_mask_ids=layout.kv_mask_ids.clone(), masks=masks, permutation=layout.permutation.clone(),
    )  # fmt: skip


def attention_then_sin(q, k, v, layout, backend="auto"):
    out, lse = block_sparse_attention(q * 2, k, v, layout, return_lse=True, backend=backend)
    return out.sin(), lse


def test_custom_op_passes_opcheck():
    q, k, v = leaves(d=16)
    args = (q, k, v, *_layout_args(LAYOUT), 0.25)
    for want_lse in (True, False):
        torch.library.opcheck(torch.ops.diffattn.block_sparse_attention.default, (*args, want_lse, "cpu"))


def test_function_compiles_in_one_graph_with_eager_outputs_and_gradients():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_then_sin, backend=counter, fullgraph=True)
    inputs = leaves()
    assert_same(outputs_and_grads(attention_then_sin, inputs, LAYOUT), outputs_and_grads(compiled, inputs, LAYOUT))
    assert counter.frame_count == 1 and graph_breaks() == 0
    # A second call with another layout object of the same shapes reuses the graph.
    other = layout_copy(LAYOUT, flip=5)
    assert_same(outputs_and_grads(attention_then_sin, inputs, other), outputs_and_grads(compiled, inputs, other))
    assert counter.frame_count == 1


def test_triton_backend_compiles_in_one_graph():
    pytest.importorskip("triton")
    if not backends.triton_interpreter():
        pytest.skip("runs the Triton kernels under TRITON_INTERPRET=1 (CPU)")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_then_sin, backend=counter, fullgraph=True)
    inputs = leaves(h=1, d=16)
    eager = outputs_and_grads(attention_then_sin, inputs, LAYOUT, "triton")
    assert_same(eager, outputs_and_grads(compiled, inputs, LAYOUT, "triton"))
    assert counter.frame_count == 1 and graph_breaks() == 0


class Layer(torch.nn.Module):
    def __init__(self, layout: BlockLayout, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + block_sparse_attention(self.proj(x), x, x, self.layout)


class Stack(torch.nn.Module):
    def __init__(self, layers: int = 8, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(Layer(layout_copy(LAYOUT, flip=i), width) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def module_outputs_and_grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    module.zero_grad()
    return outputs_and_grads(module, [x])[0], [p.grad.clone() for p in module.parameters()]


def test_eight_layers_with_their_own_layouts_compile_once():
    x = torch.randn(1, 2, N, 16)
    stack = Stack()
    eager = module_outputs_and_grads(stack, x)
    counter = CompileCounterWithBackend("aot_eager")
    assert_same(eager, module_outputs_and_grads(torch.compile(stack, backend=counter, fullgraph=True), x))
    assert counter.frame_count == 1 and graph_breaks() == 0


def test_layers_compiled_one_by_one_share_one_graph():
    # diffusers' regional compilation (compile_repeated_blocks) compiles each block's forward:
    # a layout guarded by identity would recompile per layer (and hit dynamo's recompile limit).
    x = torch.randn(1, 2, N, 16)
    stack = Stack()
    eager = module_outputs_and_grads(stack, x)
    counter = CompileCounterWithBackend("aot_eager")
    for layer in stack.layers:
        layer.compile(backend=counter, fullgraph=True)
    assert_same(eager, module_outputs_and_grads(stack, x))
    assert counter.frame_count == 1 and graph_breaks() == 0
    assert not counters["recompiles"]


def test_refused_inputs_still_name_every_reason_when_compiled():
    q = torch.randn(1, 2, N, 32, dtype=torch.float64)
    reason = "dtype=float64 is not supported by backend='cpu'; allowed: float16, bfloat16, float32"
    with pytest.raises(UserError, match=reason):  # the graph breaks at the raise; eager raises it
        torch.compile(lambda x: block_sparse_attention(x, x, x, LAYOUT), backend="aot_eager")(q)
    with pytest.raises(Exception, match=reason):  # fullgraph: dynamo's error carries the message
        torch.compile(lambda x: block_sparse_attention(x, x, x, LAYOUT), backend="aot_eager", fullgraph=True)(q)
