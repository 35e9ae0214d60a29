"""Branch scores from calibration statistics: small callables in an explicit registry.

Lower score = less useful branch (cheaper to replace). Each takes the branch's statistics and its
candidate bypass fit.

Example:
    >>> from subfit_fx.stats import BranchStats
    >>> s = BranchStats.empty(2, 2); s.update(torch.ones(4, 2), {"normalized": torch.ones(4, 2)},
    ...                                        torch.zeros(4, 2))
    >>> SCORES["rotation"](s, None)
    0.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from subfit_fx.fit import Fit
from subfit_fx.stats import BranchStats

__all__ = ["SCORES", "Score", "block_influence", "fit_residual", "magnitude", "rotation"]

Score = Callable[[BranchStats, Fit | None], float]


def rotation(stats: BranchStats, fit: Fit | None = None) -> float:
    """Mean angular distance between x and x + y, in [0, 1] (LLM-Drop / ShortGPT family).

    Example:
        >>> rotation(BranchStats.empty(2, 2))
        0.0
    """
    return stats.mean("angle_sum")


def block_influence(stats: BranchStats, fit: Fit | None = None) -> float:
    """1 - mean cos(x, x + y) (ShortGPT's Block Influence, per branch).

    Example:
        >>> block_influence(BranchStats.empty(2, 2))
        1.0
    """
    return 1.0 - stats.mean("cos_sum")


def magnitude(stats: BranchStats, fit: Fit | None = None) -> float:
    """Mean ||y|| / ||x||.

    Example:
        >>> magnitude(BranchStats.empty(2, 2))
        0.0
    """
    return stats.mean("ratio_sum")


def fit_residual(stats: BranchStats, fit: Fit | None) -> float:
    """Energy the bypass leaves unexplained, relative to the stream after the branch:
    ||y - g(z)||^2 / ||x + y||^2.

    Example:
        >>> fit_residual(BranchStats.empty(2, 2), None)
        0.0
    """
    unexplained = fit.error if fit is not None else float(stats.scalars["y_sq"])
    return unexplained / max(float(stats.scalars["out_sq"]), 1e-30)


SCORES: dict[str, Score] = {
    "fit_residual": fit_residual,
    "rotation": rotation,
    "magnitude": magnitude,
    "block_influence": block_influence,
}
_ = torch  # statistics are tensors; scores return floats
