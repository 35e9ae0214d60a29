from __future__ import annotations

import torch

from subfit_fx.stats import BranchStats


def _stats(x, z, y):
    s = BranchStats.empty(x.shape[1], y.shape[1], ("normalized", "stream"))
    s.update(x, {"normalized": z, "stream": x}, y)
    return s


def test_two_batches_equal_the_concatenated_batch():
    gen = torch.Generator().manual_seed(0)
    x, z, y = (torch.randn(40, 6, generator=gen) for _ in range(3))
    whole = _stats(x, z, y)
    parts = _stats(x[:17], z[:17], y[:17]).add_(_stats(x[17:], z[17:], y[17:]))
    for key, value in whole.tensors().items():
        torch.testing.assert_close(parts.tensors()[key], value, rtol=1e-12, atol=1e-12)
    assert int(parts.tokens) == 40


def test_gram_has_bias_column_and_counts_tokens():
    x = torch.randn(5, 3)
    s = _stats(x, x, x)
    assert s.gram["normalized"][-1, -1] == 5
    torch.testing.assert_close(s.gram["normalized"][:3, -1], x.double().sum(0))


def test_non_finite_is_detected():
    x = torch.randn(4, 2)
    y = x.clone()
    y[0, 0] = float("nan")
    assert not _stats(x, x, y).is_finite()
