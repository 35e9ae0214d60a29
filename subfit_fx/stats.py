"""Additive sufficient statistics of one residual branch (METHOD.md), accumulated in float64.

For bypass input z (with a bias column, z~ = [z, 1]), stream x and branch output (or target) y:
G = sum z~^T z~, C = sum z~^T y, plus the scalar sums the scores need. Two batches give exactly
the statistics of their concatenation (up to float64 rounding), and ranks can all-reduce them.

Example:
    >>> x, z, y = torch.randn(10, 4), torch.randn(10, 4), torch.randn(10, 4)
    >>> s = BranchStats.empty(4, 4); s.update(x, {"normalized": z}, y)
    >>> int(s.tokens), tuple(s.gram["normalized"].shape)
    (10, (5, 5))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SCALARS", "BranchStats", "InnerStats"]

# Per-token sums used by the scores (all from the same pass).
SCALARS = ("y_sq", "x_sq", "out_sq", "cos_sum", "angle_sum", "ratio_sum")


@dataclass
class BranchStats:
    """Sufficient statistics of one branch. `gram` / `cross` are keyed by bypass-input kind."""

    width_in: int
    width_out: int
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, width_in: int, width_out: int, inputs: tuple[str, ...] = ("normalized",)) -> BranchStats:
        """Zero statistics for inputs of width `width_in` and outputs of width `width_out`.

        Example:
            >>> BranchStats.empty(8, 8, ("normalized", "stream")).gram["stream"].shape
            torch.Size([9, 9])
        """
        f64 = torch.float64
        return cls(
            width_in, width_out,
            gram={k: torch.zeros(width_in + 1, width_in + 1, dtype=f64) for k in inputs},
            cross={k: torch.zeros(width_in + 1, width_out, dtype=f64) for k in inputs},
            scalars={k: torch.zeros((), dtype=f64) for k in SCALARS},
        )

    @torch.no_grad()
    def update(self, x: torch.Tensor, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        """Add tokens: rows of `x` (stream), `inputs[kind]` (bypass inputs) and `y` (target).

        All are 2-D (tokens, width); padding must already be dropped.

        Example:
            >>> s = BranchStats.empty(2, 2); s.update(torch.ones(3, 2), {"normalized": torch.ones(3, 2)},
            ...                                        torch.ones(3, 2))
            >>> float(s.scalars["y_sq"])
            6.0
        """
        # Rows in chunks: float64 temporaries stay a few MB however large the batch.
        for start in range(0, x.shape[0], self.CHUNK):
            rows = slice(start, start + self.CHUNK)
            self._update_rows(x[rows], {k: z[rows] for k, z in inputs.items()}, y[rows])

    CHUNK = 256

    def _update_rows(self, x: torch.Tensor, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        for kind, z in inputs.items():
            z = z.double()
            _add_biased_gram(self.gram[kind], z, z.sum(0))
            cross, width = self.cross[kind], z.shape[1]
            cross[:width].addmm_(z.T, y)
            cross[width] += y.sum(0)
        # Every per-token scalar comes from three row dot products, without float64 temporaries for
        # x + y, unit vectors and their differences (as costly as the Gram GEMMs at d = 2048 on a
        # loaded machine; no measurable end-to-end change idle: docs/results/scale_before_s21.md).
        xx, yy, xy = (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)
        x_out = xx + xy  # <x, x + y>
        out_sq = (x_out + xy + yy).clamp_min(0)
        x_norm, y_norm, out_norm = xx.sqrt(), yy.sqrt(), out_sq.sqrt()
        cos = (x_out / (x_norm * out_norm).clamp_min(1e-30)).clamp(-1, 1)
        # angle between x and x + y from |x ^ (x + y)| = |x ^ y| (Lagrange's identity) and <x, x + y>:
        # atan2 keeps it accurate near 0, where arccos(cos) loses half the digits
        angle = torch.atan2((xx * yy - xy * xy).clamp_min(0).sqrt(), x_out)
        s = self.scalars
        s["y_sq"] += yy.sum()
        s["x_sq"] += xx.sum()
        s["out_sq"] += out_sq.sum()
        s["cos_sum"] += cos.sum()
        s["angle_sum"] += (angle / torch.pi).sum()
        s["ratio_sum"] += (y_norm / x_norm.clamp_min(1e-30)).sum()
        self.tokens += x.shape[0]

    def to(self, device: torch.device | str) -> BranchStats:
        """Move every statistic to `device`, in place (float64 stays float64); returns self.

        Example:
            >>> BranchStats.empty(2, 2).to("cpu").gram["normalized"].device
            device(type='cpu')
        """
        self.tokens = self.tokens.to(device)
        for table in (self.gram, self.cross, self.scalars):
            for key, t in table.items():
                table[key] = t.to(device)
        return self

    def add_(self, other: BranchStats) -> BranchStats:
        """Accumulate `other` into self (statistics are additive) and return self.

        Example:
            >>> a = BranchStats.empty(2, 2); b = BranchStats.empty(2, 2)
            >>> int(a.add_(b).tokens)
            0
        """
        for kind in self.gram:
            self.gram[kind] += other.gram[kind]
            self.cross[kind] += other.cross[kind]
        for key in self.scalars:
            self.scalars[key] += other.scalars[key]
        self.tokens += other.tokens
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """All statistics as a flat name -> tensor dict (for all-reduce and serialization).

        Example:
            >>> sorted(BranchStats.empty(2, 2).tensors())[:2]
            ['cross.normalized', 'gram.normalized']
        """
        out = {"tokens": self.tokens}
        out.update({f"gram.{k}": v for k, v in self.gram.items()})
        out.update({f"cross.{k}": v for k, v in self.cross.items()})
        out.update({f"scalar.{k}": v for k, v in self.scalars.items()})
        return out

    def is_finite(self) -> bool:
        """False when any statistic holds NaN or Inf (non-finite activations).

        Example:
            >>> BranchStats.empty(2, 2).is_finite()
            True
        """
        # Diagonals suffice: a non-finite input makes its squares' sum (a Gram diagonal, y_sq or
        # x_sq) non-finite, and every other entry is bounded by them (Cauchy-Schwarz); scanning
        # whole float64 Grams costs seconds per model.
        return _all_finite(self.tokens, *self.scalars.values(), *(g.diagonal() for g in self.gram.values()))

    def mean(self, key: str) -> float:
        """Per-token mean of one scalar sum (e.g. `cos_sum`).

        Example:
            >>> s = BranchStats.empty(2, 2); s.update(torch.ones(2, 2), {"normalized": torch.ones(2, 2)},
            ...                                        torch.zeros(2, 2))
            >>> round(s.mean("cos_sum"), 9)
            1.0
        """
        return float(self.scalars[key] / self.tokens.clamp_min(1))


@dataclass
class InnerStats:
    """Statistics of a branch's inner input h (the input of its last matmul), in float64.

    `sum` / `sq`: per-channel sums of h and h^2; `gram`: sum of [h, 1]^T [h, 1] (None when not
    asked: it is channels^2, large for wide FFNs); `batch_sq` / `batch_sq2` / `batches`: per
    channel, the sum over batches of each batch's mean h^2 and of its square, so the fluctuation
    of a channel's importance across batches (SAAP) stays an additive statistic.

    Example:
        >>> s = InnerStats.empty(3); s.update(torch.ones(4, 3)); s.update(torch.zeros(4, 3))
        >>> float(s.tokens), s.sq.tolist(), s.fluctuation().tolist()
        (8.0, [4.0, 4.0, 4.0], [1.0, 1.0, 1.0])
    """

    channels: int
    tokens: torch.Tensor
    sum: torch.Tensor
    sq: torch.Tensor
    batch_sq: torch.Tensor
    batch_sq2: torch.Tensor
    batches: torch.Tensor
    gram: torch.Tensor | None = None

    @classmethod
    def empty(cls, channels: int, gram: bool = False) -> InnerStats:
        """Zero statistics for `channels` channels (with the Gram of [h, 1] when `gram`).

        Example:
            >>> InnerStats.empty(4, gram=True).gram.shape
            torch.Size([5, 5])
        """
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64)
        return cls(channels, zeros(), zeros(channels), zeros(channels), zeros(channels), zeros(channels), zeros(),
                   zeros(channels + 1, channels + 1) if gram else None)

    @torch.no_grad()
    def update(self, h: torch.Tensor) -> None:
        """Add the tokens of one batch: rows of `h` (tokens, channels), padding already dropped."""
        if h.shape[0] == 0:
            return
        if self.tokens.device != h.device:  # float64 sums on the model's device (GPU)
            self.to(h.device)
        batch_sq = torch.zeros(self.channels, dtype=torch.float64, device=h.device)
        for start in range(0, h.shape[0], BranchStats.CHUNK):
            rows = h[start:start + BranchStats.CHUNK].double()
            rows_sum = rows.sum(0)
            self.sum += rows_sum
            batch_sq += (rows * rows).sum(0)
            if self.gram is not None:
                _add_biased_gram(self.gram, rows, rows_sum)
        self.sq += batch_sq
        mean_sq = batch_sq / h.shape[0]
        self.batch_sq += mean_sq
        self.batch_sq2 += mean_sq * mean_sq
        self.batches += 1
        self.tokens += h.shape[0]

    def to(self, device: torch.device | str) -> InnerStats:
        """Move every statistic to `device`, in place; returns self.

        Example:
            >>> InnerStats.empty(2, gram=True).to("cpu").gram.device
            device(type='cpu')
        """
        for key, t in self.tensors().items():
            setattr(self, key, t.to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """All statistics as a flat name -> tensor dict (for all-reduce).

        Example:
            >>> sorted(InnerStats.empty(2).tensors())[:2]
            ['batch_sq', 'batch_sq2']
        """
        out = {"tokens": self.tokens, "sum": self.sum, "sq": self.sq, "batch_sq": self.batch_sq,
               "batch_sq2": self.batch_sq2, "batches": self.batches}
        if self.gram is not None:
            out["gram"] = self.gram
        return out

    def is_finite(self) -> bool:
        """False when any statistic holds NaN or Inf (checked on the sums of squares, as
        `BranchStats.is_finite`).

        Example:
            >>> s = InnerStats.empty(2, gram=True); s.update(torch.tensor([[1.0, float("nan")]])); s.is_finite()
            False
        """
        diagonal = () if self.gram is None else (self.gram.diagonal(),)
        return _all_finite(self.tokens, self.sum, self.sq, self.batch_sq, self.batch_sq2, *diagonal)

    def variance(self) -> torch.Tensor:
        """Per-channel variance of h over all tokens.

        Example:
            >>> s = InnerStats.empty(1); s.update(torch.tensor([[1.0], [3.0]])); s.variance().tolist()
            [1.0]
        """
        n = self.tokens.clamp_min(1)
        mean = self.sum / n
        return (self.sq / n - mean * mean).clamp_min(0)

    def covariance(self) -> torch.Tensor:
        """Covariance of h over all tokens (needs the Gram).

        Example:
            >>> s = InnerStats.empty(2, gram=True); s.update(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
            >>> s.covariance().tolist()
            [[1.0, 0.0], [0.0, 0.0]]
        """
        assert self.gram is not None, "collected without the Gram"
        n = self.tokens.clamp_min(1)
        mean = self.sum / n
        return self.gram[:-1, :-1] / n - torch.outer(mean, mean)

    def fluctuation(self) -> torch.Tensor:
        """Per channel: coefficient of variation across batches of the batch mean of h^2 (0 = the
        channel matters equally on every batch).

        Example:
            >>> s = InnerStats.empty(1); s.update(torch.ones(2, 1)); s.update(torch.ones(2, 1))
            >>> s.fluctuation().tolist()
            [0.0]
        """
        b = self.batches.clamp_min(1)
        mean = self.batch_sq / b
        var = (self.batch_sq2 / b - mean * mean).clamp_min(0)
        return var.sqrt() / mean.clamp_min(1e-30)


def _add_biased_gram(gram: torch.Tensor, z: torch.Tensor, column_sums: torch.Tensor) -> None:
    """Add [z, 1]^T [z, 1] to `gram` in place without building [z, 1]: the copy with a ones
    column costs a pass over z per update, the GEMM writes straight into the leading block."""
    width = z.shape[1]
    gram[:width, :width].addmm_(z.T, z)
    gram[:width, width] += column_sums
    gram[width, :width] += column_sums
    gram[width, width] += z.shape[0]


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
