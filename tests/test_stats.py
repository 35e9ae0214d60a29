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


def test_statistics_equal_their_definitions():
    gen = torch.Generator().manual_seed(1)
    x, z, y = (torch.randn(300, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    y[:3] = torch.stack([torch.zeros(5), 2 * x[1], -0.5 * x[2]])  # no change, parallel, antiparallel
    s = _stats(x, z, y)
    zt = torch.cat([z, torch.ones(300, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(s.gram["normalized"], zt.T @ zt)
    torch.testing.assert_close(s.cross["normalized"], zt.T @ y)
    out = x + y
    cos = torch.nn.functional.cosine_similarity(x, out, dim=1)
    expected = {"y_sq": (y * y).sum(), "x_sq": (x * x).sum(), "out_sq": (out * out).sum(), "cos_sum": cos.sum(),
                "angle_sum": (torch.arccos(cos.clamp(-1, 1)) / torch.pi).sum(),
                "ratio_sum": (y.norm(dim=1) / x.norm(dim=1)).sum()}
    for key, value in expected.items():
        torch.testing.assert_close(s.scalars[key], value, rtol=1e-9, atol=1e-7, msg=key)


def test_non_finite_anywhere_is_detected():
    """is_finite reads only sums of squares; a NaN or Inf in any input at any place reaches them."""
    for name in ("x", "z", "y"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for row, col in ((0, 0), (3, 1), (5, 2)):
                x, z, y = (torch.randn(6, 3) for _ in range(3))
                {"x": x, "z": z, "y": y}[name][row, col] = bad
                s = BranchStats.empty(3, 3)
                s.update(x, {"normalized": z}, y)
                assert not s.is_finite(), (name, bad, row, col)
    assert BranchStats.empty(3, 3).is_finite()
