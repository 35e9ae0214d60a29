from __future__ import annotations

import torch

from subfit_fx.fit import head_on_basis, reduced_rank, removal, ridge, shared_basis


def _linear_problem(n=400, p=8, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, generator=gen, dtype=torch.float64)
    w = torch.randn(p, d, generator=gen, dtype=torch.float64)
    y = z @ w + torch.randn(d, generator=gen, dtype=torch.float64)
    zt = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
    return z, y, zt.T @ zt, zt.T @ y, (y**2).sum()


def test_exactly_linear_branch_is_recovered():
    z, y, g, c, yy = _linear_problem()
    fit = ridge(g, c, yy, lam=0.0)
    assert (fit.apply(z) - y).abs().max() < 1e-5
    assert fit.error < 1e-6


def test_reduced_rank_at_full_rank_equals_ridge():
    z, _, g, c, yy = _linear_problem()
    full, rr = ridge(g, c, yy, lam=1e-3), reduced_rank(g, c, yy, rank=6, lam=1e-3)
    torch.testing.assert_close(rr.apply(z), full.apply(z), rtol=1e-9, atol=1e-9)


def test_error_from_statistics_matches_actual_residual():
    z, y, g, c, yy = _linear_problem(d=8)
    for fit in (reduced_rank(g, c, yy, rank=3), removal(g, yy, 8)):
        actual = float(((fit.apply(z) - y) ** 2).sum())
        assert abs(fit.error - actual) <= 1e-6 * max(actual, 1.0)


def test_shared_basis_of_full_size_recovers_linear_branches():
    z, y, g, c, yy = _linear_problem()
    basis = shared_basis([g, g], [c, c], k=8, lam=0.0)
    fit = head_on_basis(g, c, yy, basis, lam=0.0)
    assert (fit.apply(z) - y).abs().max() < 1e-5
    assert fit.params == 8 * 6 + 6  # the shared basis is not counted per branch


def test_lower_rank_never_fits_better():
    _, _, g, c, yy = _linear_problem(d=8)
    errors = [reduced_rank(g, c, yy, rank=r).error for r in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
