"""Closed-form bypass fits from statistics alone (METHOD.md "Fitting").

Every fit returns a `Fit`: a chain of linear maps applied to the bypass input z
(`z -> linear(z, W1, b1) -> linear(., W2, b2) ...`, torch's `linear` convention, W is out x in),
plus its residual error computed from the statistics: ||Y - Z~ W||^2 = S_yy - 2 tr(W^T C) +
tr(W^T G W).

Example:
    >>> z = torch.randn(200, 6, dtype=torch.float64); y = z @ torch.randn(6, 6, dtype=torch.float64) + 1
    >>> g = torch.cat([z, torch.ones(200, 1, dtype=torch.float64)], 1)
    >>> f = ridge(g.T @ g, g.T @ y, (y**2).sum(), lam=0.0)
    >>> f.error < 1e-8
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fit", "head_on_basis", "reduced_rank", "removal", "ridge", "shared_basis", "solve_ridge"]


@dataclass
class Fit:
    """A fitted bypass: `layers` is a chain of (weight, bias or None); `error` the residual
    sum of squares on the statistics it was fitted to; `params` its parameter count, not counting
    tensors named in `shared` (a basis paid once for all branches)."""

    form: str  # "remove" | "linear" | "lowrank" | "shared"
    layers: list[tuple[torch.Tensor, torch.Tensor | None]]
    error: float
    params: int
    shared: tuple[int, ...] = ()  # indexes into `layers` of weights shared across branches
    ridge: float = 0.0
    width_out: int = 0  # only needed by "remove" (no layers to infer it from)
    input: str | None = None  # the input it was fitted on when it must not follow the caller's choice
    # ("stream": a span map reads the stream entering its first branch, whatever the policy's default)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Run the bypass on z (any leading shape) in z's dtype, on z's device.

        Example:
            >>> removal(torch.eye(3, dtype=torch.float64), 2.0, 2).apply(torch.ones(4, 2)).abs().sum().item()
            0.0
        """
        if not self.layers:
            return torch.zeros(*z.shape[:-1], self.width_out, dtype=z.dtype, device=z.device)
        out = z
        for weight, bias in self.layers:
            out = torch.nn.functional.linear(out, weight.to(z.device, z.dtype),
                                             None if bias is None else bias.to(z.device, z.dtype))
        return out


def _residual(gram: torch.Tensor, cross: torch.Tensor, y_sq: torch.Tensor | float, w: torch.Tensor) -> float:
    """||Y - Z~ W||^2 from statistics; W is (p+1) x d (bias row last)."""
    value = float(y_sq) - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
    return max(value, 0.0)


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """W = (G + lam * tr(G)/p * I)^-1 C in float64, the bias row left unregularized.

    Cholesky first; least squares when G is singular.

    Example:
        >>> solve_ridge(torch.eye(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64), 0.0).shape
        torch.Size([3, 2])
    """
    g = gram.double()
    p = g.shape[0] - 1
    reg = torch.zeros_like(g)
    if lam > 0 and p > 0:
        scale = lam * float(torch.diagonal(g)[:p].sum()) / p
        reg[range(p), range(p)] = scale
    g_l = g + reg
    try:
        chol = torch.linalg.cholesky(g_l)
        return torch.cholesky_solve(cross.double(), chol)
    except RuntimeError:
        return torch.linalg.lstsq(g_l, cross.double(), driver="gelsd").solution


def _split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p+1) x d -> (torch weight d x p, bias d)."""
    return w[:-1].T.contiguous(), w[-1].contiguous()


def removal(gram: torch.Tensor, y_sq: torch.Tensor | float, width_out: int) -> Fit:
    """No bypass: the branch is deleted (error = energy of y).

    Example:
        >>> removal(torch.eye(3, dtype=torch.float64), 5.0, 2).error
        5.0
    """
    return Fit("remove", [], float(y_sq), 0, width_out=width_out)


def ridge(gram: torch.Tensor, cross: torch.Tensor, y_sq: torch.Tensor | float, lam: float = 1e-3) -> Fit:
    """Full-rank ridge bypass g(z) = z W + b.

    Example:
        >>> g = torch.eye(3, dtype=torch.float64); c = torch.zeros(3, 2, dtype=torch.float64)
        >>> ridge(g, c, 0.0).params
        6
    """
    w = solve_ridge(gram, cross, lam)
    weight, bias = _split(w)
    return Fit("linear", [(weight, bias)], _residual(gram, cross, y_sq, w), weight.numel() + bias.numel(),
               ridge=lam)


def reduced_rank(gram: torch.Tensor, cross: torch.Tensor, y_sq: torch.Tensor | float, rank: int,
                 lam: float = 1e-3) -> Fit:
    """Reduced-rank regression: W_full = G_l^-1 C; V_r = top-r eigenvectors of W^T G W;
    deploy A = W V_r (p x r, bias folded to the output), B = V_r^T.

    At full rank it equals `ridge`.

    Example:
        >>> g = torch.eye(5, dtype=torch.float64); c = torch.randn(5, 4, dtype=torch.float64)
        >>> reduced_rank(g, c, 10.0, rank=2).params  # 4*2 + 2*4 + 4
        20
    """
    w = solve_ridge(gram, cross, lam)
    d = w.shape[1]
    rank = max(1, min(rank, d, w.shape[0] - 1))
    m = w.T @ gram.double() @ w
    _, vecs = torch.linalg.eigh((m + m.T) / 2)
    v = vecs[:, -rank:].flip(1)  # descending eigenvalues
    w_r = w @ v @ v.T
    a = w[:-1] @ v  # p x r
    bias = w[-1] @ v @ v.T  # d
    layers = [(a.T.contiguous(), None), (v.contiguous(), bias.contiguous())]
    params = a.numel() + v.numel() + bias.numel()
    return Fit("lowrank", layers, _residual(gram, cross, y_sq, w_r), params, ridge=lam)


def _centered_cov(gram: torch.Tensor, p: int) -> torch.Tensor:
    """Centered input covariance from a Gram matrix whose last row/column is the bias."""
    g = gram.double()
    n = float(g[-1, -1])
    mu = g[-1, :p] / n
    return g[:p, :p] / n - torch.outer(mu, mu)


def _centered_xcov(gram: torch.Tensor, cross: torch.Tensor, p: int) -> torch.Tensor:
    """Centered input-target cross-covariance from G and C (bias row last)."""
    g, c = gram.double(), cross.double()
    n = float(g[-1, -1])
    return c[:p] / n - torch.outer(g[-1, :p] / n, c[-1] / n)


def shared_basis(grams: list[torch.Tensor], crosses: list[torch.Tensor], k: int,
                 lam: float = 1e-3) -> torch.Tensor:
    """A common input basis P (p x k) for several branches' bypasses.

    Whitens with the mean (centered) input covariance, sums each branch's cross-covariance
    outer product normalized to unit energy (so no single layer dominates), and keeps the top-k
    directions: P = Σ^-1/2 Q_k.

    Example:
        >>> g = torch.eye(5, dtype=torch.float64) * 10; g[-1, -1] = 10
        >>> shared_basis([g, g], [torch.randn(5, 3, dtype=torch.float64)] * 2, k=2).shape
        torch.Size([4, 2])
    """
    p = grams[0].shape[0] - 1
    k = max(1, min(k, p))
    # Two streaming passes: O(p^2) memory however many branches (whose statistics may be
    # memory-mapped from disk by the sequential pipeline), instead of 2 p^2 per branch.
    cov = sum(_centered_cov(g, p) for g in grams) / len(grams)
    cov = cov + lam * float(torch.diagonal(cov).mean()) * torch.eye(p, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    whiten = evecs @ torch.diag(evals.clamp_min(1e-12 * float(evals.max())).rsqrt()) @ evecs.T
    m = torch.zeros(p, p, dtype=torch.float64)
    for g, c in zip(grams, crosses):
        wx = whiten @ _centered_xcov(g, c, p)
        m += wx @ wx.T / max(float((wx**2).sum()), 1e-30)
    _, q = torch.linalg.eigh((m + m.T) / 2)
    return (whiten @ q[:, -k:].flip(1)).contiguous()


def head_on_basis(gram: torch.Tensor, cross: torch.Tensor, y_sq: torch.Tensor | float, basis: torch.Tensor,
                  lam: float = 1e-3) -> Fit:
    """Per-branch head on a shared basis: B = (P~^T G P~ + ridge)^-1 P~^T C, P~ = diag(P, 1).

    `params` counts the head only (k*d + d); the basis (layer 0) is shared.

    Example:
        >>> g = torch.eye(5, dtype=torch.float64); c = torch.randn(5, 3, dtype=torch.float64)
        >>> head_on_basis(g, c, 9.0, torch.eye(4, dtype=torch.float64)[:, :2]).params
        9
    """
    p, k = basis.shape
    pt = torch.zeros(p + 1, k + 1, dtype=torch.float64)
    pt[:p, :k] = basis.double()
    pt[p, k] = 1.0
    g_r, c_r = pt.T @ gram.double() @ pt, pt.T @ cross.double()
    b = solve_ridge(g_r, c_r, lam)
    head, bias = _split(b)
    error = _residual(g_r, c_r, y_sq, b)
    return Fit("shared", [(basis.T.contiguous(), None), (head, bias)], error, head.numel() + bias.numel(),
               shared=(0,), ridge=lam)
