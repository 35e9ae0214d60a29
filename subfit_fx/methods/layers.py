"""Shared pieces of the baselines: layers as groups of branches, stream statistics at layer and
branch boundaries, layer budgets, and span Replacements.

The residual stream *after* a branch is what the rewrite replaces (`rewrite.stream_after`): the
residual sum `x + y`, or for post-LN models (BERT) the LayerNorm of it. Every statistic here is
taken on that stream, so scores, fits and the rewritten graph agree for pre- and post-LN models.
Streams are read by forward hooks on the session's probes (the probe sees x and returns y, so the
hook sees both); nothing but per-token cosine sums is kept.

Example:
    >>> from subfit_fx import capture, prepare
    >>> from subfit_fx.zoo import tiny_model
    >>> session = prepare(capture(tiny_model("llama", layers=2)), progress=False)
    >>> [(layer.index, len(layer.labels)) for layer in group_layers(session.branches)]
    [(0, 2), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from subfit_fx.branches import Branch
from subfit_fx.calibrate import Session
from subfit_fx.data import Batch
from subfit_fx.errors import InputError
from subfit_fx.recipe import Recipe, Replacement, branch_records
from subfit_fx.selection import BUDGET_TOLERANCE

__all__ = [
    "TOKEN_MODES",
    "BaselineOptions",
    "Layer",
    "StreamStats",
    "group_layers",
    "layer_recipe",
    "record_stream_after",
    "require_sequential",
    "smallest_span",
    "span_map_statistics",
    "span_replacement",
    "stream_statistics",
]

aten = torch.ops.aten

TOKEN_MODES = ("all", "last")


@dataclass(frozen=True)
class BaselineOptions:
    """Options shared by the baselines; validated on construction with messages that say the fix.

    `distance_tokens`: tokens over which UIDL / ReplaceMe average the angular distance between a
    block's input and output: "last" (the last real token of each sequence, as in the UIDL paper
    and ReplaceMe's code) or "all" (every non-padding token). `ridge`: relative ridge of
    ReplaceMe's least-squares map. `eval_batches`: BlockPruner judges removals on at most this
    many batches (None: all).

    Example:
        >>> BaselineOptions(distance_tokens="all").distance_tokens
        'all'
    """

    distance_tokens: str = "last"
    ridge: float = 1e-3
    eval_batches: int | None = None

    def __post_init__(self) -> None:
        if self.distance_tokens not in TOKEN_MODES:
            raise InputError(f"distance_tokens={self.distance_tokens!r} is invalid; use 'last' or 'all'")
        if not 0 <= self.ridge < 10:
            raise InputError(f"ridge={self.ridge} must be in [0, 10) (a fraction of the mean input energy)")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise InputError(f"eval_batches={self.eval_batches!r} must be a positive integer")


@dataclass(frozen=True)
class Layer:
    """One transformer layer: its branches' labels in graph order and their parameter count."""

    index: int
    labels: tuple[str, ...]
    params: int


def group_layers(branches: list[Branch]) -> list[Layer]:
    """Group branches (graph order) into layers by their layer index.

    Example:
        >>> group_layers([])
        []
    """
    grouped: dict[int, list[Branch]] = {}
    for b in branches:
        grouped.setdefault(b.layer, []).append(b)
    return [Layer(i, tuple(b.label for b in bs), sum(b.params for b in bs)) for i, bs in grouped.items()]


def require_sequential(session: Session, layers: list[Layer]) -> None:
    """Raise `InputError` unless every layer's branches run one after the other (layer-level
    methods replace the stream after a layer; a parallel residual has no such single stream).

    Example:
        >>> require_sequential(session, group_layers(session.branches))  # doctest: +SKIP
    """
    for layer in layers:
        skips = [session.by_label[label].skip for label in layer.labels]
        if len(set(skips)) != len(skips):
            raise InputError(f"layer {layer.index} has parallel residual branches ({', '.join(layer.labels)} "
                             "read the same stream); layer-level methods need sequential layers: use "
                             "subfit, llm-drop or blockpruner for this model")


@dataclass
class StreamStats:
    """Per-token cosine and angular-distance sums between pairs of streams, for two token sets
    ("all" non-padding tokens, "last" real token of each sequence).

    Keys: `("branch", label)` pairs a branch's input stream with the stream after it;
    `("span", i, n)` pairs the stream entering layer i with the stream after layer i + n - 1.

    Example:
        >>> s = StreamStats(); s.add(("span", 0, 1), "all", torch.ones(3, 2), torch.ones(3, 2))
        >>> round(s.cos(("span", 0, 1)), 12), s.angle(("span", 0, 1))
        (1.0, 0.0)
    """

    sums: dict[tuple[str, tuple], torch.Tensor] = field(default_factory=dict)

    def add(self, key: tuple, mode: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate rows of `a` against rows of `b` (tokens, width), in float64."""
        ua = torch.nn.functional.normalize(a.double(), dim=-1, eps=1e-30)
        ub = torch.nn.functional.normalize(b.double(), dim=-1, eps=1e-30)
        cos = (ua * ub).sum(-1).clamp(-1, 1)
        # 2 atan2(|u - v|, |u + v|) is exact near 0 where arccos(cos) is not (identical streams: 0)
        angle = 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)) / torch.pi
        row = torch.stack([cos.sum(), angle.sum(),
                           torch.tensor(float(cos.numel()), dtype=torch.float64, device=cos.device)])
        slot = (mode, key)
        self.sums[slot] = self.sums[slot] + row if slot in self.sums else row

    def _mean(self, key: tuple, mode: str, column: int) -> float:
        if (mode, key) not in self.sums:
            raise KeyError(f"no statistics for {key} over {mode!r} tokens")
        row = self.sums[(mode, key)]
        return float(row[column] / row[2].clamp_min(1))

    def cos(self, key: tuple, mode: str = "all") -> float:
        """Mean cosine between the pair's streams."""
        return self._mean(key, mode, 0)

    def angle(self, key: tuple, mode: str = "all") -> float:
        """Mean angular distance arccos(cos) / pi, in [0, 1]."""
        return self._mean(key, mode, 1)


def _last_rows(mask: torch.Tensor | None, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of the last counted token of each sequence (rows with none are left out)."""
    if mask is None or mask.shape != (batch, seq):
        return torch.arange(batch), torch.full((batch,), seq - 1)
    positions = torch.arange(seq, device=mask.device).expand(batch, seq)
    last = torch.where(mask, positions, -1).max(dim=1).values
    rows = torch.nonzero(last >= 0).flatten()
    return rows, last[rows]


@torch.no_grad()
def stream_statistics(session: Session, batches: Iterable[Batch], span_lengths: Iterable[int] = (1,),
                      desc: str | None = "stream statistics") -> StreamStats:
    """One pass over `batches` (any replacements set on the session apply): cosine / angular
    distance between every branch's input and output stream, and between the streams entering
    layer i and leaving layer i + n - 1 for every n in `span_lengths`.

    Padding is excluded (the session's token mask); "last" uses the last counted token per row.

    Example:
        >>> from subfit_fx import capture, prepare
        >>> from subfit_fx.zoo import tiny_model
        >>> s = prepare(capture(tiny_model("llama", layers=2)), progress=False)
        >>> ids = torch.randint(3, 128, (2, 8))
        >>> st = stream_statistics(s, [(ids, torch.ones_like(ids))], span_lengths=(1, 2))
        >>> 0 <= st.angle(("span", 0, 2), "last") <= 1
        True
    """
    layers = group_layers(session.branches)
    lengths = sorted({int(n) for n in span_lengths if 0 < int(n) <= len(layers)})
    if lengths:  # per-branch statistics alone also suit parallel-residual layers
        require_sequential(session, layers)
    keep = max(lengths, default=0)
    first_label = layers[0].labels[0]
    ends = {layer.labels[-1]: k for k, layer in enumerate(layers)}  # last branch -> layer position
    stats = StreamStats()
    # per batch: the last-token index, and the streams at the most recent layer boundaries
    state: dict[str, Any] = {"boundaries": {}}

    def rows(t: torch.Tensor) -> dict[str, torch.Tensor]:
        r, p = state["last"]
        return {"all": session.real_tokens(t), "last": t[r, p]}

    to_stream = {b.label: session.stream_map(b.label) for b in session.branches}

    def each(label: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if label == first_label:
            state["last"] = _last_rows(session.token_mask, x.shape[0], x.shape[1])
            state["boundaries"] = {0: rows(x)}
        before, after = rows(x), rows(to_stream[label](x + out))
        for mode in TOKEN_MODES:
            stats.add(("branch", label), mode, before[mode], after[mode])
        if label in ends:
            end = ends[label] + 1
            bounds = state["boundaries"]
            bounds[end] = after
            for n in lengths:
                if end - n in bounds:
                    for mode in TOKEN_MODES:
                        stats.add(("span", end - n, n), mode, bounds[end - n][mode], after[mode])
            for old in [k for k in bounds if k < end - keep]:
                del bounds[old]

    session.watch(batches, each, desc=desc)
    stats.sums = session.reduce_sums(stats.sums)  # data-parallel: each rank saw its shard
    return stats


@torch.no_grad()
def span_map_statistics(session: Session, batches: Iterable[Batch], lengths: Iterable[int],
                        desc: str | None = "span statistics",
                        ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sufficient statistics of a least-squares map over every span of `n` whole layers (n in
    `lengths`), from one pass: for the span of layers i .. i + n - 1, with x the stream entering
    layer i (a column of ones appended) and t = (stream after the span) - x, the Gram x^T x, the
    cross x^T t and the target energy ||t||^2, in float64 over the session's counted tokens
    (ReplaceMe's map, for every start at once). Returns {(i, n): (gram, cross, y_sq)}; grams of
    one start are one tensor.

    Memory: one (width+1)^2 Gram per start and one (width+1) x width cross per span.

    Example:
        >>> from subfit_fx import capture, prepare
        >>> from subfit_fx.zoo import tiny_model
        >>> s = prepare(capture(tiny_model("llama", layers=3)), progress=False)
        >>> ids = torch.randint(3, 128, (2, 8))
        >>> st = span_map_statistics(s, [(ids, torch.ones_like(ids))], (2,), desc=None)
        >>> sorted(st), tuple(st[0, 2][1].shape)
        ([(0, 2), (1, 2)], (65, 64))
    """
    layers = group_layers(session.branches)
    lengths = sorted({int(n) for n in lengths if 0 < int(n) <= len(layers)})
    if not lengths:
        return {}
    require_sequential(session, layers)
    starts = len(layers) - lengths[0] + 1  # layers a span may start at
    first_label = layers[0].labels[0]
    ends = {layer.labels[-1]: k for k, layer in enumerate(layers)}
    to_stream = {label: session.stream_map(label) for label in ends}
    sums: dict[tuple, torch.Tensor] = {}
    bounds: dict[int, torch.Tensor] = {}  # layer index -> [x, 1] of the stream entering it (this batch)

    def add(key: tuple, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def enter(i: int, rows: torch.Tensor) -> None:
        if i < starts:
            bounds[i] = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
            add(("gram", i), bounds[i].T @ bounds[i])

    def each(label: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if label == first_label:
            bounds.clear()
            enter(0, session.real_tokens(x).double())
        if label not in ends:
            return
        end = ends[label] + 1
        after = session.real_tokens(to_stream[label](x + out)).double()
        for n in lengths:
            if end - n in bounds:
                xa = bounds[end - n]
                target = after - xa[:, :-1]
                add(("cross", end - n, n), xa.T @ target)
                add(("y_sq", end - n, n), (target * target).sum())
        for old in [k for k in bounds if k <= end - lengths[-1]]:
            del bounds[old]
        if end < len(layers):
            enter(end, after)

    session.watch(batches, each, desc=desc)
    sums = session.reduce_sums(sums)  # data-parallel: each rank saw its shard
    return {(i, n): (sums["gram", i], sums["cross", i, n], sums["y_sq", i, n])
            for (kind, *key) in sums if kind == "cross" for i, n in [key]}


@torch.no_grad()
def record_stream_after(session: Session, batches: list[Batch], label: str,
                        desc: str | None = "record stream") -> list[torch.Tensor]:
    """The stream after branch `label` for every batch, (batch, seq, width) each (the dense
    targets of a fit: one tensor per batch, as SubFit's sequential fit keeps).

    Example:
        >>> outs = record_stream_after(session, batches, "model.layers.1.mlp")  # doctest: +SKIP
    """
    return session.record_streams(batches, [label], desc)[label]


def smallest_span(layers: list[Layer], block_params: int, target: float, cost: int = 0,
                  tolerance: float = BUDGET_TOLERANCE) -> tuple[int, list[int]]:
    """The fewest contiguous layers n whose parameters, net of `cost` (a bypass), reach
    `target` of `block_params`, and the start indexes of all such spans of n layers. When that
    overshoots by more than `tolerance` but n - 1 layers land within `tolerance` below the target,
    n - 1 it is (honest budgets: the nearest achievable sparsity).

    Raises `InputError` when even all layers do not reach the target.

    Example:
        >>> layers = [Layer(i, (f"a{i}", f"f{i}"), 10) for i in range(4)]
        >>> smallest_span(layers, 40, 0.3)
        (2, [0, 1, 2])
    """
    def net(i: int, n: int) -> float:
        return (sum(layer.params for layer in layers[i:i + n]) - cost) / block_params

    for n in range(1, len(layers) + 1):
        starts = [i for i in range(len(layers) - n + 1) if net(i, n) >= target]
        if starts:
            if all(net(i, n) - target > tolerance for i in starts) and n > 1:
                below = [i for i in range(len(layers) - n + 2) if target - tolerance <= net(i, n - 1) < target]
                if below:
                    return n - 1, below
            return n, starts
    raise InputError(f"no run of layers reaches sparsity {target:.2%} (the model has {len(layers)} layers"
                     + (f" and the bypass costs {cost:,} parameters" if cost else "") + "); use a lower sparsity")


def span_replacement(layers: list[Layer], action: str = "remove", *, form: str = "remove",
                     weights: list[tuple[str, str | None]] | None = None,
                     info: dict[str, Any] | None = None) -> Replacement:
    """A Replacement covering whole consecutive `layers` (a span: stream in -> stream out).

    Example:
        >>> span_replacement([Layer(0, ("a0", "f0"), 10)]).labels
        ('a0', 'f0')
    """
    labels = tuple(label for layer in layers for label in layer.labels)
    return Replacement(labels, action, form, "stream", list(weights or []),
                       {"layers": [layer.index for layer in layers], **(info or {})})


def layer_recipe(method: str, branches: list[Branch], replacements: list[Replacement],
                 tensors: dict[str, torch.Tensor] | None = None, options: dict[str, Any] | None = None) -> Recipe:
    """A Recipe of the given replacements, in graph order.

    Example:
        >>> layer_recipe("shortgpt", [], []).method
        'shortgpt'
    """
    order = {b.label: i for i, b in enumerate(branches)}
    ordered = sorted(replacements, key=lambda r: order.get(r.labels[0], 0))
    return Recipe(method, branch_records(branches), ordered, dict(tensors or {}), options=dict(options or {}))
