"""SAAP-style width pruning (arXiv 2412.15127, reconstructed; issue 18): FFN channel blocks of the
branches that stay are scored and the least important ones dropped, to the parameter budget, with
a closed-form compensation of the output projection.

Per FFN branch `y = W h + b` (h: the inner input of its last matmul, `subfit_fx.channels`),
from the inner statistics (float64: per-channel sums, the Gram of [h, 1]):

- channel blocks (`grouping="sorted"`, the default): each FFN's channels sorted by their own
  importance ||W[:, j]||^2 Var(h_j), block k the k-th run of `block` of them, so dropping k blocks
  drops the k x `block` least important channels; `"contiguous"` takes index ranges, which mix
  important and unimportant channels in every block (SmolLM2 dev split, 500 paired items: choice
  0.572 sorted against 0.494 contiguous). The count kept stays a multiple of `block` either way;
- element-wise importance of a channel block G: sum_j in G ||W[:, j]||^2 Var(h_j) (FLAP);
- vector-wise importance: tr(W_G Cov(h)_GG W_G^T), which keeps the correlations within G. Both
  are the exact per-token output damage of dropping G with mean (bias) compensation, so they are
  in the squared branch-output units SubFit's fit errors use;
- fusion: the uncertainty-weighted combination I = I_vec / (2 s1^2) + I_el / (2 s2^2) + log(s1 s2),
  minimised over s (s_m^2 = mean I_m), is 1/2 (I_vec / mean I_vec + I_el / mean I_el); we scale it
  back by mean I_vec to keep the units;
- per-layer ratios: one global ranking of the blocks' scores standardized within each layer
  ((score - layer mean) / layer std, FLAP's adaptive structure; the default, since it measured
  far better). Without standardization (`standardize=False`) a layer whose importance fluctuates
  across calibration batches (coefficient of variation phi_l of the batch means of h^2, averaged
  over its channels) is protected: score = I_fused (1 + phi_l / mean phi), our reading of SAAP's
  fluctuation indicator (the paper gives no code); under standardization that factor cancels;
- compensation (training-free): the kept columns of W and a bias are refitted by least squares
  from the inner Gram (ridge), of which FLAP's bias compensation is the diagonal special case
  (`compensation="bias"`).

Cost: one calibration pass (the inner statistics) and a (kept+1)^2 solve per slimmed branch; no
held-out forwards.

Example:
    >>> SaapOptions(block=32).block
    32
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from subfit_fx.channels import ChannelSite
from subfit_fx.errors import InputError
from subfit_fx.fit import solve_ridge
from subfit_fx.methods.base import PolicyContext
from subfit_fx.recipe import Recipe, Replacement, branch_records
from subfit_fx.selection import BUDGET_TOLERANCE, Candidate, select_jointly
from subfit_fx.stats import InnerStats

__all__ = ["GROUPINGS", "IMPORTANCES", "BlockScores", "FlapOptions", "SaapOptions", "Slimming", "block_scores",
           "channel_importance", "flap", "inner_map", "inner_replacement", "kept_channels", "output_slim_candidates",
           "plan_slimming",
           "prunes_heads", "reaches_budget", "saap", "slim_replacements", "slimming_of", "width_recipe", "width_sites"]

IMPORTANCES = ("fused", "vector", "element")
GROUPINGS = ("sorted", "contiguous")
COMPENSATIONS = ("refit", "bias", "none")
ALLOCATIONS = ("zscore", "output")
COMPOUNDINGS = ("none", "midpoint", "mean")


@dataclass(frozen=True)
class SaapOptions:
    """Options of SAAP-style width pruning; validated on construction."""

    block: int = 64  # FFN channels per pruning unit (keeps int4 blocks and GEMMs aligned)
    # which channels make a block: "sorted" groups them by their own importance (block k holds the
    # k-th `block` least important channels, so a block can be all unimportant); "contiguous" takes
    # index ranges, which mixes important and unimportant channels in every block. Alignment
    # needs only the count of kept channels, which both keep a multiple of `block`.
    grouping: str = "sorted"
    importance: str = "fused"
    compensation: str = "refit"
    fluctuation: bool = True  # protect layers whose importance fluctuates across batches
    max_layer_ratio: float = 0.75  # at most this fraction of a layer's channels goes
    ridge: float = 1e-3  # relative ridge of the refit
    # scores standardized within each layer (FLAP's adaptive structure): on SmolLM2 at 25 % this
    # alone took saap from 2.32x to 1.88x perplexity (docs/width.md); a per-layer factor such as
    # the fluctuation protection cancels in the z-score, so it only acts without standardization
    standardize: bool = True
    # attention too, in whole key/value groups (their KV cache goes with them); FFN channels only
    # when False. None (default): where the output allocation runs, which prices a group's loss
    # against the FFNs' in the output's metric (SmolLM2 dev half, 37.5 %: 1.60x perplexity against
    # 1.67x for FFN channels alone, session 25); not under z-scores, where groups measured far
    # worse (dev 37.5 %: 2.38x against 1.88x, session 20)
    heads: bool | None = None
    # how the blocks are shared out across layers: "output" (default) weights each slimming's
    # compensated output error by the model output's sensitivity to that branch
    # (`Session.output_sensitivity`, one backward pass over `sensitivity_sequences` calibration
    # sequences) and picks the slimming level of every FFN by an exact knapsack on those damages
    # (SmolLM2 dev half: 1.35x / 1.67x perplexity at 25 / 37.5 % against 1.39x / 1.88x for
    # "zscore", and against 1.36x / 1.73x for the output judge's rounds, docs/results/dev_output.md);
    # "zscore" ranks the within-layer z-scores globally (FLAP's adaptive structure), and is what
    # runs where the weights are offloaded (no backward pass through the whole model then)
    allocation: str = "output"
    sensitivity_sequences: int = 16
    # compounding in the output allocation: the slimmings of a plan change how much the output
    # moves with each branch, which a sensitivity measured on the dense model misses. "midpoint"
    # plans half the budget, measures the sensitivity with that plan in place and plans the whole
    # budget in it; "mean" measures it with the whole first plan in place and plans again in the
    # mean of the dense and that metric; "none" plans once in the dense model's (one backward pass
    # over `sensitivity_sequences` sequences each measurement)
    compounding: str = "none"

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.compounding not in COMPOUNDINGS:
            raise InputError(f"unknown compounding {self.compounding!r}; choose one of {', '.join(COMPOUNDINGS)}")
        if not isinstance(self.sensitivity_sequences, int) or self.sensitivity_sequences < 1:
            raise InputError(f"sensitivity_sequences must be a positive integer, got {self.sensitivity_sequences!r}")
        if self.block < 1:
            raise InputError(f"block must be a positive number of channels, got {self.block}")
        if self.importance not in IMPORTANCES:
            raise InputError(f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCES)}")
        if self.grouping not in GROUPINGS:
            raise InputError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if self.compensation not in COMPENSATIONS:
            raise InputError(f"unknown compensation {self.compensation!r}; choose one of {', '.join(COMPENSATIONS)}")
        if not 0 < self.max_layer_ratio < 1:
            raise InputError(f"max_layer_ratio must be in (0, 1), got {self.max_layer_ratio}")
        if self.ridge < 0:
            raise InputError(f"ridge must be >= 0, got {self.ridge}")


@dataclass
class Slimming:
    """What width pruning does to one branch: the kept channel indices and the new output map."""

    label: str
    kept: torch.Tensor  # int64 indices into the channels, sorted
    weight: torch.Tensor  # (width_out, kept)
    bias: torch.Tensor | None
    damage: float  # per-token squared output error of the compensated branch (from statistics)


def _blocks(channels: int, size: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Blocks of `size` channels: index ranges, or consecutive runs of `order` (each block's
    indices sorted)."""
    size = min(size, channels)
    if order is None:
        return [torch.arange(start, min(start + size, channels)) for start in range(0, channels, size)]
    return [order[start:start + size].sort().values for start in range(0, channels, size)]


def channel_importance(weight: torch.Tensor, stats: InnerStats) -> torch.Tensor:
    """Per-channel importance ||W[:, j]||^2 Var(h_j) (FLAP's fluctuation metric; for a single
    channel the vector-wise importance is the same number).

    Example:
        >>> s = InnerStats.empty(3); s.update(torch.tensor([[0.0, 1, 2], [0, 3, 2]]))
        >>> channel_importance(torch.ones(2, 3), s).tolist()
        [0.0, 2.0, 0.0]
    """
    w = weight.double()
    return (w * w).sum(0) * stats.variance()


def block_importance(weight: torch.Tensor, stats: InnerStats, blocks: list[torch.Tensor],
                     kind: str) -> torch.Tensor:
    """Importance of each channel block of one branch with output weight `weight` (out, channels):
    "element" (FLAP), "vector" (with within-block correlations); per token, squared output units.

    Example:
        >>> s = InnerStats.empty(4, gram=True); s.update(torch.randn(50, 4))
        >>> block_importance(torch.eye(4), s, _blocks(4, 2), "element").shape
        torch.Size([2])
    """
    if kind == "element":
        per = channel_importance(weight, stats)
        return torch.stack([per[g].sum() for g in blocks])
    w = weight.double()
    cov = stats.covariance()
    return torch.stack([((w[:, g].T @ w[:, g]) * cov[g][:, g]).sum() for g in blocks]).clamp_min(0)


def compensate(weight: torch.Tensor, bias: torch.Tensor | None, stats: InnerStats, kept: torch.Tensor,
               how: str, ridge: float, metric: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The output map on the kept channels: (weight, bias, per-token squared error; with `metric`
    F (out x out), the error in that metric, tr(F E[e e^T])).

    "refit": least squares of the original output on [h_kept, 1] (ridge relative to the mean
    diagonal); "bias": W[:, kept] and b + W[:, dropped] mean(h_dropped) (FLAP); "none": W[:, kept].

    Example:
        >>> s = InnerStats.empty(3, gram=True); h = torch.randn(200, 3); h[:, 2] = h[:, 0]; s.update(h)
        >>> w, b, err = compensate(torch.ones(2, 3), None, s, torch.tensor([0, 1]), "refit", 0.0)
        >>> err < 1e-9, [round(v, 6) for v in w[0].tolist()]
        (True, [2.0, 1.0])
    """
    gram = stats.gram / stats.tokens.clamp_min(1)  # E [h, 1]^T [h, 1]
    n = weight.shape[1]
    base = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    w_ext = torch.cat([weight.double(), base[:, None]], 1)
    sol = w_ext @ inner_map(stats, kept, how, ridge)  # (out, kept + 1): [W', b']
    new_w, new_b = sol[:, :-1], sol[:, -1]
    new_ext = torch.zeros_like(w_ext)
    new_ext[:, kept], new_ext[:, n] = new_w, new_b
    diff = w_ext - new_ext
    weighted = diff if metric is None else metric.double() @ diff
    error = float((weighted * (diff @ gram)).sum())  # E e^T F e, e = (W_ext - W'_ext) [h, 1]
    bias_out = new_b if (bias is not None or how != "none") else None
    return new_w.to(weight.dtype), None if bias_out is None else bias_out.to(weight.dtype), max(error, 0.0)


def inner_map(stats: InnerStats, kept: torch.Tensor, how: str, ridge: float) -> torch.Tensor:
    """The linear map A ((channels + 1) x (kept + 1), float64) from [h_kept, 1] to the [h, 1] that
    a compensated slimming stands for: the output map on the kept channels is [W, b] A.

    "refit": every channel's least-squares prediction from [h_kept, 1] (ridge relative to the mean
    diagonal; the kept channels predict themselves when ridge is 0); "bias": dropped channels
    become their means; "none": zeros. Setting h <- (A [h_kept, 1])[:channels] in the running model
    (`Session.set_inner_replacement`) judges a slimming at the output before any rewrite.

    Example:
        >>> s = InnerStats.empty(3, gram=True); s.update(torch.randn(100, 3) + 2)
        >>> a = inner_map(s, torch.tensor([0, 2]), "bias", 0.0)
        >>> a.shape, bool(torch.allclose(a[1, 2], s.sum[1] / s.tokens))
        (torch.Size([4, 3]), True)
    """
    gram = stats.gram / stats.tokens.clamp_min(1)  # E [h, 1]^T [h, 1]
    n = gram.shape[0] - 1
    keep1 = torch.cat([kept, torch.tensor([n])])
    if how == "refit":
        # G[:, K1] (G[K1, K1] + lam)^-1, the bias row unregularized; least squares when singular
        return solve_ridge(gram[keep1][:, keep1], gram[keep1], ridge).T
    out = torch.zeros(n + 1, len(keep1), dtype=torch.float64)
    out[keep1, torch.arange(len(keep1))] = 1.0
    if how == "bias":
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[kept] = False
        out[:n][dropped, -1] = (stats.sum / stats.tokens.clamp_min(1))[dropped]
    return out


def inner_replacement(stats: InnerStats, kept: torch.Tensor, how: str, ridge: float,
                      like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> (A [h_kept, 1])[:channels] for `inner_map` A, in `like`'s dtype and device: what
    `Session.set_inner_replacement` takes to run a compensated slimming before any rewrite.

    Example:
        >>> s = InnerStats.empty(3, gram=True); s.update(torch.randn(100, 3) + 2)
        >>> fn = inner_replacement(s, torch.tensor([0, 1, 2]), "refit", 0.0, torch.zeros(1))
        >>> h = torch.randn(4, 3); bool(torch.allclose(fn(h), h, atol=1e-4))
        True
    """
    a = inner_map(stats, kept, how, ridge)
    n, k = a.shape[0] - 1, len(kept)
    mix = a[:n, :k].T.to(like.dtype).to(like.device).contiguous()  # (kept, channels)
    shift = a[:n, k].to(like.dtype).to(like.device)
    index = kept.to(like.device)

    def stands_for(h: torch.Tensor) -> torch.Tensor:
        return h.index_select(-1, index) @ mix + shift

    return stands_for


class _Weights:
    """The base weights by state_dict key, on the CPU (where the statistics and solves are)."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.state = ctx.session.ep.state_dict

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key].detach().cpu()


def _weights(ctx: PolicyContext) -> _Weights:
    return _Weights(ctx)


def _channel_cost(site: ChannelSite, state: _Weights) -> float:
    """Parameters one channel of `site` costs (producer rows + a column of the last matmul)."""
    return site.params_per_channel(state[site.producers[0][0]].shape[1], state[site.last_weight].shape[0])


@dataclass
class BlockScores:
    """Channel blocks of one FFN branch and what the policies rank them by."""

    label: str
    blocks: list[torch.Tensor]  # channel indices per block
    score: torch.Tensor  # per block: importance (squared output units), or its within-layer z-score
    cost: float  # parameters one channel costs (producer rows + a column of the last matmul; a mean for heads)
    standardized: bool = False

    def ranked(self) -> list[int]:
        """Block indices, least important first.

        Example:
            >>> BlockScores("f", [torch.arange(2), torch.arange(2, 4)], torch.tensor([2.0, 1.0]), 3).ranked()
            [1, 0]
        """
        per = self.score / torch.tensor([len(g) for g in self.blocks], dtype=self.score.dtype)
        return sorted(range(len(self.blocks)), key=lambda i: (float(per[i]), i))


@torch.no_grad()
def block_scores(ctx: PolicyContext, opts: SaapOptions, labels: list[str],
                 stats: dict[str, InnerStats]) -> dict[str, BlockScores]:
    """Importance of every channel block of the FFN branches in `labels` under `opts` (fusion,
    fluctuation protection, FLAP's standardization), comparable across branches.

    Example:
        >>> scores = block_scores(ctx, SaapOptions(), ["model.layers.0.mlp"], stats)  # doctest: +SKIP
    """
    sites = ctx.session.channel_sites
    state = _weights(ctx)
    imp_el, imp_vec, blocks, cost, fluct = {}, {}, {}, {}, {}
    for label in labels:
        site, s = sites[label], stats[label]
        weight = state[site.last_weight]
        if site.kind == "attention":  # whole heads / key-value groups: the unit is fixed by the layout
            blocks[label] = _blocks(site.channels, site.unit)
        else:
            order = channel_importance(weight, s).argsort(stable=True) if opts.grouping == "sorted" else None
            blocks[label] = _blocks(site.channels, opts.block, order)
        imp_el[label] = block_importance(weight, s, blocks[label], "element")
        imp_vec[label] = block_importance(weight, s, blocks[label], "vector")
        cost[label] = _channel_cost(site, state)
        fluct[label] = float(s.fluctuation().mean())
    mean_el = torch.cat(list(imp_el.values())).mean().clamp_min(1e-30)
    mean_vec = torch.cat(list(imp_vec.values())).mean().clamp_min(1e-30)
    mean_fl = max(sum(fluct.values()) / len(fluct), 1e-30)
    out = {}
    for label in labels:
        if opts.importance == "element":
            score = imp_el[label]
        elif opts.importance == "vector":
            score = imp_vec[label]
        else:
            score = 0.5 * (imp_vec[label] / mean_vec + imp_el[label] / mean_el) * mean_vec
        if opts.fluctuation:
            score = score * (1 + fluct[label] / mean_fl)
        if opts.standardize:  # (score - layer mean) / layer std: a layer's ratio follows its score's shape
            per = score / torch.tensor([len(g) for g in blocks[label]], dtype=score.dtype)
            score = (per - per.mean()) / per.std().clamp_min(1e-30) if len(per) > 1 else per * 0
        out[label] = BlockScores(label, blocks[label], score, cost[label], opts.standardize)
    return out


def prunes_heads(ctx: PolicyContext, opts: SaapOptions) -> bool:
    """Whether width pruning under `opts` slims attention (whole key/value groups) too: `opts.heads`,
    or where that is None, whether the output allocation runs (it needs every weight in memory).

    Example:
        >>> prunes_heads(ctx, SaapOptions(heads=False))  # doctest: +SKIP
        False
    """
    return opts.heads if opts.heads is not None else _by_output(ctx, opts)


def _by_output(ctx: PolicyContext, opts: SaapOptions) -> bool:
    """Whether the output allocation runs: asked for, and every weight in memory (a backward pass)."""
    return opts.allocation == "output" and ctx.session.weights is None


def width_sites(ctx: PolicyContext, opts: SaapOptions) -> dict[str, ChannelSite]:
    """The channel sites width pruning under `opts` may slim: FFN branches, and attention branches
    (whole key/value groups) where `prunes_heads`.

    Example:
        >>> sorted(width_sites(ctx, SaapOptions(heads=True)))[:1]  # doctest: +SKIP
        ['model.layers.0.mlp']
    """
    kinds = ("ffn", "attention") if prunes_heads(ctx, opts) else ("ffn",)
    return {label: site for label, site in ctx.session.channel_sites.items() if site.kind in kinds}


@torch.no_grad()
def plan_slimming(ctx: PolicyContext, opts: SaapOptions, budget: int, labels: list[str] | None = None,
                  stats: dict[str, InnerStats] | None = None) -> tuple[list[Slimming], int]:
    """Choose channel blocks to drop across the FFN branches in `labels` (default: every branch
    with a channel site) until `budget` parameters are saved (net of added biases); returns the
    slimmings and the parameters saved.

    Example:
        >>> slimmings, saved = plan_slimming(ctx, SaapOptions(), 10_000)  # doctest: +SKIP
    """
    sites = width_sites(ctx, opts)
    labels = [label for label in (labels if labels is not None else list(sites)) if label in sites]
    if not labels:
        return [], 0
    stats = stats or ctx.session.inner_stats(ctx.batches, labels, gram=True)
    if _by_output(ctx, opts):
        return _plan_by_output(ctx, opts, budget, labels, stats)
    if opts.allocation == "output":
        ctx.notes.append("saap: the weights are offloaded, so the output sensitivity (a backward pass through "
                         "the whole model) is not measured; blocks allocated by z-scores (allocation='zscore')")
    state = _weights(ctx)
    scores = block_scores(ctx, opts, labels, stats)
    blocks = {label: sc.blocks for label, sc in scores.items()}
    units = []  # (score per parameter, label, block index): z-scores compare as they are
    for label, sc in scores.items():
        for i, g in enumerate(sc.blocks):
            units.append((float(sc.score[i]) if sc.standardized else float(sc.score[i]) / (len(g) * sc.cost), label, i))
    units.sort()
    dropped: dict[str, list[int]] = {}
    saved = 0
    for _, label, i in units:
        if saved >= budget:
            break
        site = sites[label]
        have = dropped.setdefault(label, [])
        gone = sum(len(blocks[label][j]) for j in have) + len(blocks[label][i])
        if gone > opts.max_layer_ratio * site.channels:
            continue
        weight = state[site.last_weight]
        new_bias = site.last_bias is None and opts.compensation != "none" and not have
        gain = round(len(blocks[label][i]) * scores[label].cost) - (weight.shape[0] if new_bias else 0)
        if saved + gain - budget > budget - saved:
            break  # stopping short lands nearer the budget than this unit would
        saved += gain
        have.append(i)
    slimmings = [slimming_of(ctx, label, stats[label], kept_channels(scores[label], dropped[label],
                                                                      sites[label].channels), opts)
                 for label in labels if dropped.get(label)]
    return slimmings, saved


def _plan_by_output(ctx: PolicyContext, opts: SaapOptions, budget: int, labels: list[str],
                    stats: dict[str, InnerStats]) -> tuple[list[Slimming], int]:
    """`plan_slimming` with allocation "output": within each FFN the channels (or, with grouping
    "contiguous" and for attention, the fixed blocks) go in order of their output-weighted
    importance (w_j^T F w_j) Var(h_j); every count of dropped blocks is priced by its compensated
    error in the output metric F, tr(F E[e e^T]) (e = the branch output's error, from the inner
    Gram), and one exact knapsack picks a count per branch at the least total damage. With
    `compounding`, F is measured again with a first plan in place (see `SaapOptions`).
    `importance`, `fluctuation` and `standardize` do not enter: the output metric replaces them."""
    session = ctx.session
    batches = ctx.batches[:opts.sensitivity_sequences]
    fisher = session.output_sensitivity(batches, labels, causal=ctx.causal)
    if opts.compounding != "none":
        first = budget // 2 if opts.compounding == "midpoint" else budget
        plan = _output_knapsack(ctx, opts, first, labels, stats, fisher)
        state = _weights(ctx)
        with session.replaced():
            for label, (kept, _) in plan.items():
                like = state[session.channel_sites[label].last_weight]
                session.set_inner_replacement(label, inner_replacement(stats[label], kept, opts.compensation,
                                                                       opts.ridge, like))
            moved = session.output_sensitivity(batches, labels, causal=ctx.causal,
                                               desc="output sensitivity (compounded)")
        fisher = moved if opts.compounding == "midpoint" else {k: (fisher[k] + moved[k]) / 2 for k in labels}
    plan = _output_knapsack(ctx, opts, budget, labels, stats, fisher)
    slimmings = [slimming_of(ctx, label, stats[label], kept, opts) for label, (kept, _) in plan.items()]
    saved = 0
    for label, (_, candidate) in plan.items():
        saved += candidate.saved
        ctx.record_score(label, "slim_output_damage", candidate.score)
    return slimmings, saved


def _output_knapsack(ctx: PolicyContext, opts: SaapOptions, budget: int, labels: list[str],
                     stats: dict[str, InnerStats],
                     fisher: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, Candidate]]:
    """The output allocation's plan in the metric `fisher`: branch -> (kept channels, its candidate)."""
    cands, scores = output_slim_candidates(ctx, opts, labels, stats, fisher)
    picks = select_jointly(cands, ctx.block_params, budget / ctx.block_params, tolerance=BUDGET_TOLERANCE)
    by_key = {c.label: c for c in cands}
    sites = ctx.session.channel_sites
    return {label: (kept_channels(scores[label], list(range(count)), sites[label].channels), by_key[label, count])
            for label, count in picks}


@torch.no_grad()
def output_slim_candidates(ctx: PolicyContext, opts: SaapOptions, labels: list[str], stats: dict[str, InnerStats],
                           fisher: dict[str, torch.Tensor]) -> tuple[list[Candidate], dict[str, BlockScores]]:
    """Every slimming of the branches in `labels` priced in the output metric `fisher`: a candidate
    per count of dropped blocks (key (label, count), score tr(F E[e e^T]) of its compensated error),
    and each branch's blocks in the order they go (`kept_channels(scores[label], range(count), ...)`).

    Example:
        >>> cands, scores = output_slim_candidates(ctx, SaapOptions(), labels, stats, fisher)  # doctest: +SKIP
    """
    session = ctx.session
    sites = width_sites(ctx, opts)
    state = _weights(ctx)
    cands: list[Candidate] = []
    scores: dict[str, BlockScores] = {}
    for label in labels:
        site, s, f = sites[label], stats[label], fisher[label]
        weight = state[site.last_weight]
        bias = state[site.last_bias] if site.last_bias else None
        w = weight.double()
        per = (w * (f @ w)).sum(0) * s.variance()  # (w_j^T F w_j) Var(h_j)
        if site.kind == "attention" or opts.grouping == "contiguous":  # fixed units, least important first
            units = _blocks(site.channels, site.unit if site.kind == "attention" else opts.block)
            blocks = [units[i] for i in torch.stack([per[g].sum() for g in units]).argsort(stable=True)]
        else:
            blocks = _blocks(site.channels, opts.block, per.argsort(stable=True))
        cost = _channel_cost(site, state)
        scores[label] = BlockScores(label, blocks, torch.stack([per[g].sum() for g in blocks]), cost)
        new_bias = weight.shape[0] if site.last_bias is None and opts.compensation != "none" else 0
        params = session.by_label[label].params
        most = int(opts.max_layer_ratio * site.channels) // max(len(blocks[0]), 1)
        for count in range(1, min(most, len(blocks)) + 1):
            kept = kept_channels(scores[label], list(range(count)), site.channels)
            damage = compensate(weight, bias, s, kept, opts.compensation, opts.ridge, metric=f)[2]
            saved = round((site.channels - len(kept)) * cost) - new_bias
            cands.append(Candidate((label, count), damage, params, params - saved, branch=label))
    return cands, scores


def kept_channels(scores: BlockScores, dropped: list[int], channels: int) -> torch.Tensor:
    """Sorted indices of the channels left when the blocks `dropped` go.

    Example:
        >>> kept_channels(BlockScores("f", [torch.arange(2), torch.arange(2, 4)], torch.zeros(2), 1), [0], 4)
        tensor([2, 3])
    """
    keep = torch.ones(channels, dtype=torch.bool)
    if dropped:
        keep[torch.cat([scores.blocks[i] for i in dropped])] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def slimming_of(ctx: PolicyContext, label: str, stats: InnerStats, kept: torch.Tensor,
                opts: SaapOptions) -> Slimming:
    """The compensated slimming of branch `label` to the channels `kept` (scores recorded).

    Example:
        >>> slimming_of(ctx, "model.layers.0.mlp", stats, torch.arange(64), SaapOptions())  # doctest: +SKIP
    """
    site = ctx.session.channel_sites[label]
    state = _weights(ctx)
    bias = state[site.last_bias] if site.last_bias else None
    w, b, err = compensate(state[site.last_weight], bias, stats, kept, opts.compensation, opts.ridge)
    ctx.record_score(label, "slim_damage", err)
    ctx.record_score(label, "slim_kept", float(len(kept)) / site.channels)
    return Slimming(label, kept, w, b, err)


@torch.no_grad()
def slim_replacements(ctx: PolicyContext, slimmings: list[Slimming],
                      prefix: str = "s") -> tuple[list[Replacement], dict[str, torch.Tensor]]:
    """Recipe entries (action "slim") and tensors for `slimmings`: the kept rows of each producer
    and the compensated output map.

    Example:
        >>> replacements, tensors = slim_replacements(ctx, slimmings)  # doctest: +SKIP
    """
    state = _weights(ctx)
    sites: dict[str, ChannelSite] = ctx.session.channel_sites
    replacements, tensors = [], {}
    for i, s in enumerate(slimmings):
        site = sites[s.label]
        producers = []
        for j, ((w_key, b_key), rows) in enumerate(zip(site.producers, site.producer_rows(s.kept))):
            tensors[f"{prefix}{i}.p{j}.weight"] = state[w_key][rows].clone()
            new_b = None
            if b_key:
                new_b = f"{prefix}{i}.p{j}.bias"
                tensors[new_b] = state[b_key][rows].clone()
            producers.append((f"{prefix}{i}.p{j}.weight", new_b))
        tensors[f"{prefix}{i}.out.weight"] = s.weight.contiguous()
        out_b = None
        if s.bias is not None:
            out_b = f"{prefix}{i}.out.bias"
            tensors[out_b] = s.bias.contiguous()
        # module paths of the producers and the last matmul: transformers-side loading swaps these
        modules = [key.removeprefix("hf.").rsplit(".", 1)[0] for key, _ in (*site.producers, (site.last_weight, None))]
        info = {"kept": [int(k) for k in s.kept], "channels": site.channels, "damage": s.damage, "modules": modules,
                "kind": site.kind}
        if any(k > 1 for k in site.producer_chunks):  # fused producers: kept rows of each chunk
            info["chunks"] = list(site.producer_chunks)
        if site.kind == "attention":  # whole key/value groups: the cache of this layer shrinks too
            info["groups"], info["kept_groups"] = site.units, len(s.kept) // site.unit
        replacements.append(Replacement((s.label,), "slim", "slim", "inner", [(f"{prefix}{i}.out.weight", out_b)],
                                        info, producers))
    return replacements, tensors


@dataclass(frozen=True)
class FlapOptions(SaapOptions):
    """FLAP (An et al., AAAI 2024) in the same framework: single channels scored by the
    fluctuation metric ||W[:, j]||^2 Var(h_j), standardized within each layer and ranked globally
    (adaptive per-layer ratios), with bias compensation.

    Example:
        >>> FlapOptions().block, FlapOptions().compensation
        (1, 'bias')
    """

    block: int = 1
    importance: str = "element"
    compensation: str = "bias"
    fluctuation: bool = False
    standardize: bool = True
    allocation: str = "zscore"


def flap(ctx: PolicyContext) -> Recipe:
    """The FLAP baseline: width pruning of FFN channels with FLAP's metric, structure and bias
    compensation (attention heads are not pruned unless asked: FLAP allocates by z-scores).

    Example:
        >>> recipe = flap(ctx)  # doctest: +SKIP
    """
    recipe = _width_only(ctx, ctx.options_as(FlapOptions))
    recipe.method = "flap"
    return recipe


def saap(ctx: PolicyContext) -> Recipe:
    """Width pruning alone: FFN channel blocks dropped across all layers to the budget.

    Example:
        >>> recipe = saap(ctx)  # doctest: +SKIP
    """
    return _width_only(ctx, ctx.options_as(SaapOptions))


def _width_only(ctx: PolicyContext, opts: SaapOptions) -> Recipe:
    recipe, saved = width_recipe(ctx, opts)
    if not reaches_budget(ctx, saved):
        heads = "" if prunes_heads(ctx, opts) else " (attention is pruned with --heads)"
        ctx.notes.append(f"width pruning reached {saved / ctx.block_params:.2%} of block parameters: every FFN "
                         f"channel block allowed by max_layer_ratio={opts.max_layer_ratio} is gone{heads}; "
                         "use subfit or hybrid")
    return recipe


def reaches_budget(ctx: PolicyContext, saved: int) -> bool:
    """Whether width pruning that saves `saved` block parameters reached the budget: the plan may
    stop just short of it where that lands nearer, so within the budget tolerance counts.

    Example:
        >>> from types import SimpleNamespace
        >>> reaches_budget(SimpleNamespace(target=0.25, block_params=1000), 240)
        True
    """
    return saved >= (ctx.target - BUDGET_TOLERANCE) * ctx.block_params


def width_recipe(ctx: PolicyContext, opts: SaapOptions) -> tuple[Recipe, int]:
    """Width pruning under `opts` to the budget: the recipe (method "saap") and the block
    parameters it saves (less than the budget when the prunable channels run out).

    Example:
        >>> recipe, saved = width_recipe(ctx, SaapOptions())  # doctest: +SKIP
    """
    if not width_sites(ctx, opts):
        raise InputError("this model's FFN branches expose no prunable channels (fused or Conv1D projections); "
                         "use --method subfit")
    slimmings, saved = plan_slimming(ctx, opts, round(ctx.target * ctx.block_params))
    order = {b.label: i for i, b in enumerate(ctx.branches)}
    slimmings.sort(key=lambda s: order[s.label])
    replacements, tensors = slim_replacements(ctx, slimmings)
    return Recipe("saap", branch_records(ctx.branches), replacements, tensors, options=asdict(opts)), saved
