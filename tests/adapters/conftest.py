"""Fixtures shared by the adapter tests (tiny random pipelines, nothing downloaded)."""

from __future__ import annotations

import pytest

from diffattn.processors import base as base_module
from diffattn.processors import state as state_module

from ..threads import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def recorded(monkeypatch):
    """Every sparse kernel call the processors make: ``(q, k, v, layout, out)``, [B, H, N, D]."""
    calls = []
    original = state_module.block_sparse_attention

    def record(q, k, v, layout, **kwargs):
        result = original(q, k, v, layout, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        calls.append((q.detach(), k.detach(), v.detach(), layout, out.detach()))
        return result

    monkeypatch.setattr(state_module, "block_sparse_attention", record)
    return calls


@pytest.fixture
def joint_calls(monkeypatch, request):
    """Every joint (video + text) attention the sparse processors run:
    ``(layer_index, q, k, v, key_padding, out)`` (the processor template's one ``joint_attention``)."""
    module = base_module
    calls = []
    original = module.joint_attention

    def record(state, layer_index, q, k, v, key_padding=None, **kwargs):
        out = original(state, layer_index, q, k, v, key_padding=key_padding, **kwargs)
        calls.append((layer_index, q.detach(), k.detach(), v.detach(), key_padding, out.detach()))
        return out

    monkeypatch.setattr(module, "joint_attention", record)
    return calls
