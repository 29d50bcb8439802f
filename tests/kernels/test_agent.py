"""Agent attention (AgentSD) against a plain PyTorch statement of its formula: forward, gradients,
low-precision error, bad input and memory (no N x N tensor)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import diffattn
from diffattn import UserError, agent_attention


def plain_agent_attention(q, k, v, agents, k_scale2=0.3, shortcut=0.075, scale=None):
    """The formula as written in the issue and in agentsd/patch.py: explicit softmax of matmuls."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    agent_feature = torch.softmax(agents @ k.transpose(-1, -2) * s, dim=-1) @ v
    return torch.softmax(q @ agents.transpose(-1, -2) * s**k_scale2, dim=-1) @ agent_feature + shortcut * v


def inputs(b=1, h=2, n=37, a=5, d=16, dtype=torch.float64, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    agents = torch.randn(b, h, a, d, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(grad) for x in (q, k, v, agents)]


def test_exported_from_diffattn():
    assert "agent_attention" in diffattn.__all__
    assert diffattn.agent_attention is diffattn.kernels.agent_attention


# ---------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "b, h, n, a, d",
    [
        (1, 1, 37, 1, 64),     # one agent: every query gets the same agent feature
        (1, 2, 37, 37, 64),    # A = N
        (2, 3, 101, 7, 80),    # batch > 1, N and A prime, D = 80
        (2, 1, 130, 16, 128),
        (1, 2, 1, 1, 8),       # a single token
    ],
)
def test_forward_matches_formula_float64(b, h, n, a, d):
    q, k, v, agents = inputs(b, h, n, a, d)
    torch.testing.assert_close(agent_attention(q, k, v, agents), plain_agent_attention(q, k, v, agents),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k_scale2, shortcut, scale", [(1.0, 0.0, None), (0.0, 1.0, 0.5), (0.3, -0.2, 2.0),
                                                       (2, 0, 0.01)])
def test_parameters_mean_what_the_formula_says(k_scale2, shortcut, scale):
    q, k, v, agents = inputs()
    torch.testing.assert_close(
        agent_attention(q, k, v, agents, k_scale2=k_scale2, shortcut=shortcut, scale=scale),
        plain_agent_attention(q, k, v, agents, k_scale2, shortcut, scale), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), d=st.sampled_from([1, 8, 24]),
       agent_fraction=st.floats(0, 1), k_scale2=st.floats(-1, 2), shortcut=st.floats(-1, 1),
       scale=st.one_of(st.none(), st.floats(0.01, 4)), seed=st.integers(0, 2**16))
def test_forward_matches_formula_for_any_shape(b, h, n, d, agent_fraction, k_scale2, shortcut, scale, seed):
    a = 1 + round(agent_fraction * (n - 1))
    q, k, v, agents = inputs(b, h, n, a, d, seed=seed)
    torch.testing.assert_close(agent_attention(q, k, v, agents, k_scale2, shortcut, scale),
                               plain_agent_attention(q, k, v, agents, k_scale2, shortcut, scale),
                               rtol=1e-9, atol=1e-9)


def test_k_scale2_one_and_agents_equal_keys_is_attention_through_the_keys():
    """An independent statement: with A = K (all keys as agents) and k_scale2 = 1 the first step is
    softmax(K K^T s) V, read by the queries with the ordinary score scale."""
    q, k, v, _ = inputs(n=23, d=8)
    s = 8**-0.5
    through_keys = torch.softmax(q @ k.mT * s, -1) @ (torch.softmax(k @ k.mT * s, -1) @ v)
    torch.testing.assert_close(agent_attention(q, k, v, k, k_scale2=1.0, shortcut=0.0), through_keys)


def test_reference_scale_is_head_dim_to_the_minus_half_times_k_scale2():
    """agentsd/patch.py: sim2 = q agent^T * self.scale ** k_scale2 with self.scale = d ** -0.5."""
    q, k, v, agents = inputs(d=16)
    s2 = 16 ** (-0.5 * 0.3)
    agent_feature = torch.softmax(agents @ k.mT / 4, -1) @ v
    expected = torch.softmax(q @ agents.mT * s2, -1) @ agent_feature + 0.075 * v
    torch.testing.assert_close(agent_attention(q, k, v, agents), expected)


# ---------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("a, scale", [(1, None), (4, 0.7), (9, None)])
def test_gradcheck_float64(a, scale):
    q, k, v, agents = inputs(b=2, h=1, n=9, a=a, d=4, grad=True)
    assert torch.autograd.gradcheck(lambda *t: agent_attention(*t, scale=scale), (q, k, v, agents))


def test_gradients_match_formula_float64():
    leaves = inputs(b=2, h=2, n=50, a=6, d=80, grad=True)
    grad_out = torch.randn(2, 2, 50, 80, dtype=torch.float64)
    ours = torch.autograd.grad(agent_attention(*leaves), leaves, grad_out)
    plain = torch.autograd.grad(plain_agent_attention(*leaves), leaves, grad_out)
    for name, got, want in zip(("q", "k", "v", "agents"), ours, plain):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------- low precision
# The flash-attention rule: ours in dtype X is at most 2x as far from the float64 truth as the plain
# PyTorch formula in dtype X, plus a small absolute floor (values and gradients here are O(1)). In
# float32 the CPU SDPA backward sums in another order than the plain matmuls: its gradient errors are
# up to ~6x plain's but below 1.5e-5 (about 50 float32 ulps of the largest gradient).
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_low_precision_error_within_twice_plain(dtype, d):
    truth_leaves = inputs(b=2, h=2, n=97, a=12, d=d, grad=True)
    low_leaves = [x.detach().to(dtype).requires_grad_() for x in truth_leaves]
    grad_out = torch.randn(2, 2, 97, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def forward_and_grads(fn, leaves, go):
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, go)]

    truth = forward_and_grads(plain_agent_attention, truth_leaves, grad_out)
    ours = forward_and_grads(agent_attention, low_leaves, grad_out.to(dtype))
    plain = forward_and_grads(plain_agent_attention, low_leaves, grad_out.to(dtype))
    for name, t, o, p in zip(("out", "dq", "dk", "dv", "dagents"), truth, ours, plain):
        assert o.dtype == dtype, name
        ours_error = (o.double() - t).abs().max().item()
        plain_error = (p.double() - t).abs().max().item()
        assert ours_error <= 2 * plain_error + FLOOR[dtype], (name, ours_error, plain_error)


# -------------------------------------------------------------------------------- bad input
GOOD = dict(zip(("q", "k", "v", "agents"), inputs(n=10, a=3, d=8, dtype=torch.float32)))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"q": "not a tensor"}, "q must be a torch.Tensor, got str"),
        ({"agents": None}, "agents must be a torch.Tensor, got NoneType"),
        ({"k": torch.zeros(2, 10, 8)}, "k must have 4 dimensions [B, H, N, D], got 3"),
        ({"agents": torch.zeros(1, 2, 3, 8, 1)}, "agents must have 4 dimensions [B, H, A, D], got 5"),
        ({"v": torch.zeros(1, 2, 11, 8)}, "v=(1, 2, 11, 8)"),
        ({"agents": torch.zeros(2, 2, 3, 8)}, "agents B=2"),
        ({"agents": torch.zeros(1, 1, 3, 8)}, "agents H=1"),
        ({"agents": torch.zeros(1, 2, 3, 4)}, "agents D=4"),
        ({"agents": torch.zeros(1, 2, 0, 8)}, "agent count A=0 (agents.shape[2]) must be in [1, N=10]"),
        ({"agents": torch.zeros(1, 2, 11, 8)}, "agent count A=11 (agents.shape[2]) must be in [1, N=10]"),
        ({"agents": torch.zeros(1, 2, 3, 8, dtype=torch.float64)}, "agents=torch.float64"),
        ({"agents": torch.zeros(1, 2, 3, 8, device="meta")}, "agents=meta"),
        ({"q": torch.zeros(1, 2, 10, 8, dtype=torch.int64)},
         "q must be a floating-point tensor, got dtype torch.int64"),
        ({"scale": 0.0}, "scale must be None or a finite number > 0, got 0.0"),
        ({"scale": -1}, "got -1"),
        ({"scale": float("nan")}, "got nan"),
        ({"scale": float("inf")}, "got inf"),
        ({"scale": "0.1"}, "got '0.1'"),
        ({"k_scale2": float("nan")}, "k_scale2 must be a finite real number (int or float), got nan"),
        ({"k_scale2": True}, "k_scale2 must be a finite real number (int or float), got True"),
        ({"shortcut": float("-inf")}, "shortcut must be a finite real number (int or float), got -inf"),
        ({"shortcut": torch.tensor(0.1)}, "shortcut must be a finite real number (int or float), got tensor(0.1000)"),
    ],
)
def test_bad_input_is_a_user_error_naming_the_value(change, expected):
    with pytest.raises(UserError) as info:
        agent_attention(**{**GOOD, **change})
    assert expected in str(info.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(UserError) as info:
        agent_attention(GOOD["q"], GOOD["k"], GOOD["v"], torch.zeros(2, 2, 0, 8), k_scale2=None, scale=-2.0)
    message = str(info.value)
    for part in ("scale must be", "k_scale2 must be", "agents B=2", "agent count A=0"):
        assert part in message


# ----------------------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def largest_tensor(fn, n, a, d=64):
    leaves = inputs(n=n, a=a, d=d, h=1, dtype=torch.float32, grad=True)
    with LargestTensor() as mode:
        fn(*leaves).sum().backward()
    return mode.numel


def test_the_detector_sees_the_plain_formulas_n_by_n():
    """The check below could fail: attention through the keys materialises N x N."""
    def dense(q, k, v, agents):
        return torch.softmax(q @ k.mT, -1) @ v + 0 * agents.sum()
    assert largest_tensor(dense, 300, 4) >= 300 * 300


def test_no_n_by_n_tensor_at_16k_tokens():
    n, a = 16384, 64
    assert largest_tensor(agent_attention, n, a) <= n * a


def test_peak_memory_at_16k_tokens_is_far_below_one_n_by_n():
    """In a fresh process (ru_maxrss is a lifetime peak): forward and backward at N = 16384, A = 64,
    D = 64 in float32 peak well below the 1 GiB that one N x N float32 matrix would take alone
    (measured: about 40 MiB; the plain formula through the keys: about 3 GiB)."""
    script = textwrap.dedent("""
        import resource, torch
        from diffattn import agent_attention
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        q, k, v = (torch.randn(1, 1, 16384, 64, requires_grad=True) for _ in range(3))
        agents = torch.randn(1, 1, 64, 64, requires_grad=True)
        agent_attention(q, k, v, agents).sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               timeout=120).stdout.strip())
    assert grown < 256 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"
