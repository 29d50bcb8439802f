"""The PSA benchmark's bookkeeping (diffattn.profiler.bench_psa): the exact block mass the
estimates are scored against, and the oracle score of the exact mass itself."""

import torch

from diffattn.profiler.bench_psa import selection_scores, true_block_mass


def test_true_block_mass_is_the_mean_attention_mass_per_tile():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 2, 70, 8, generator=gen).unbind(0)  # 70 tokens: blocks of 32, 32, 6
    mass = true_block_mass(q, k, 32)
    probs = (q.double() @ k.double().transpose(-1, -2) / 8**0.5).softmax(-1)
    bounds = [(0, 32), (32, 64), (64, 70)]
    for h in range(2):
        for i, (q0, q1) in enumerate(bounds):
            for j, (k0, k1) in enumerate(bounds):
                expected = probs[:, h, q0:q1, k0:k1].sum(-1).mean()
                assert torch.isclose(mass[h, i, j], expected)
    assert torch.allclose(mass.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_the_exact_mass_scores_as_the_oracle():
    mass = torch.rand(3, 5, 9, dtype=torch.float64).softmax(-1)
    assert selection_scores(mass, mass, 0.35) == {"mass_ratio": 1.0, "recall": 1.0}
