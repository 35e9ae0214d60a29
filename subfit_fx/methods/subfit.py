"""SubFit: score every attention and FFN branch, replace the least useful ones (any depth) by
fitted bypasses (low-rank for attention, a shared basis for FFN), to the parameter budget.

Example:
    >>> SubfitOptions(score="rotation").score
    'rotation'
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from subfit_fx.calibrate import REMOVE
from subfit_fx.errors import InputError
from subfit_fx.fit import Fit, ridge
from subfit_fx.methods.base import (
    OutputJudge,
    PolicyContext,
    basis_for,
    default_ranks,
    dense_reference,
    fit_branch,
    heldout_loss,
    kept_norm_params,
)
from subfit_fx.recipe import Recipe, recipe_from_fits
from subfit_fx.scores import SCORES
from subfit_fx.selection import (
    BUDGET_TOLERANCE,
    Candidate,
    repair_overshoot,
    select,
    select_jointly,
    sparsity_of,
)
from subfit_fx.stats import BranchStats

__all__ = ["AUTO_SPANS", "SPANNED", "SPAN_MEMORY", "BypassFitter", "SubfitOptions", "candidate_forms", "commit_plan",
           "default_rounds", "judge_split", "merge_spans", "shortlist_branches", "span_fits", "span_lengths",
           "span_map_fit", "subfit"]

SCORE_CHOICES = (*SCORES, "holdout")
# Forms that compete with the default bypass (low-rank attention / shared-basis FFN) per branch.
FORMS: dict[str, tuple[str, ...]] = {"fit": (), "fit-or-remove": ("remove",), "auto": ("remove", "linear")}
JUDGES = ("output", "statistics")
SELECTIONS = ("knapsack", "greedy")


@dataclass(frozen=True)
class SubfitOptions:
    """Options of the SubFit policy; validated on construction with messages that say the fix."""

    judge: str = "output"  # "output": judged at the model's output on held-out data; "statistics": one shot
    score: str = "fit_residual"
    bypass_input: str = "normalized"
    attention_rank: int | None = None  # default: width // 8
    ffn_basis: int | None = None  # default: width // 2
    ridge: float = 1e-3
    rescore_every: int | None = None
    sequential: bool = False
    holdout: float = 0.0
    forms: str = "fit"  # per branch, which forms compete on held-out data; see FORMS (judge="output": at
    # least fit-or-remove)
    judge_sequences: int = 4  # held-out calibration sequences the output judge runs (judge="output")
    rounds: int | None = None  # judge="output": the budget is reached in this many rounds, re-judging in
    # each; None: `default_rounds` (8 from 12 layers on, else 4)
    shortlist: float = 3.0  # judge="output": rounds after the first re-judge this multiple of what they need
    selection: str = "knapsack"  # judge="output": how a round chooses from the judged damages. "knapsack":
    # plan the whole remaining budget exactly (`select_jointly`, spans included) and commit the
    # planned picks judged this round; "greedy": damage per parameter saved, up to the round's step
    judge_context: float = 0.0  # judge="output", causal LMs: weight of the context gain lost (see
    # `OutputJudge`), so replacements that erode the use of earlier text are judged worse
    spans: int | None = None  # judge="output": also judge one linear map over every run of 2..spans whole
    # layers (ReplaceMe's form, fitted in closed form) next to the per-branch candidates; 0: off; None:
    # the longest runs up to 6 whose statistics fit in SPAN_MEMORY (see `span_lengths`)

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise InputError(f"judge={self.judge!r} is invalid; use 'output' (judged at the model's output on "
                             "held-out data, the default) or 'statistics' (one shot, from statistics only)")
        if self.selection not in SELECTIONS:
            raise InputError(f"selection={self.selection!r} is invalid; use 'knapsack' (exact plan of the whole "
                             "budget, the default) or 'greedy' (damage per parameter saved)")
        for name in ("judge_sequences", "rounds"):
            value = getattr(self, name)
            if value is None and name == "rounds":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer")
        if self.spans is not None and (not isinstance(self.spans, int) or isinstance(self.spans, bool)
                                       or self.spans < 0 or self.spans == 1):
            raise InputError(f"spans={self.spans!r} must be 0 (off), the longest run of layers (>= 2) a "
                             "linear span map may replace, or None (automatic)")
        if self.spans is not None and self.spans > 0 and self.judge != "output":
            raise InputError("spans are judged at the output: use judge='output' (the default) or spans=0")
        if not (isinstance(self.judge_context, (int, float)) and not isinstance(self.judge_context, bool)
                and 0 <= self.judge_context < float("inf")):
            raise InputError(f"judge_context={self.judge_context!r} must be a number >= 0 (0: off)")
        if self.judge_context and self.judge != "output":
            raise InputError("judge_context weighs a term of the output judge: use judge='output' (the default)")
        if not self.shortlist >= 1:
            raise InputError(f"shortlist={self.shortlist!r} must be >= 1 (a multiple of what a round needs)")
        if self.judge == "output" and (self.score == "holdout" or self.rescore_every is not None):
            raise InputError("score='holdout' / rescore_every belong to judge='statistics'; the output judge "
                             "re-judges in `rounds` by itself")
        if self.score not in SCORE_CHOICES:
            raise InputError(f"unknown score {self.score!r}; choose one of {', '.join(SCORE_CHOICES)}")
        if self.bypass_input not in ("normalized", "stream"):
            raise InputError(f"bypass_input {self.bypass_input!r} is invalid; use 'normalized' or 'stream'")
        for name in ("attention_rank", "ffn_basis", "rescore_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.ridge < 10:
            raise InputError(f"ridge={self.ridge} must be in [0, 10) (a fraction of the mean input energy)")
        if not 0 <= self.holdout < 1:
            raise InputError(f"holdout={self.holdout} must be a fraction in [0, 1)")
        if self.forms not in FORMS:
            raise InputError(f"forms={self.forms!r} is invalid; use one of {', '.join(FORMS)} "
                             "(fit: the low-rank / shared-basis bypass only; fit-or-remove: also removal; "
                             "auto: also removal and a full linear map)")
        if self.forms != "fit" and self.score != "holdout" and self.judge != "output":
            raise InputError(f"forms={self.forms!r} compares replacement forms on held-out data: also pass "
                             "score='holdout'")
        if self.score == "holdout" and self.holdout == 0:
            raise InputError("score='holdout' needs held-out data: pass holdout=0.25 (a fraction of the "
                             "calibration sequences)")


def default_rounds(branches: list) -> int:
    """Rounds of re-judging when `rounds` is unset: 8 for models of 12+ layers, where the picks
    compound over many small steps (SmolLM2 dev split at 25 %: knapsack selection with 8 rounds
    1.38x / choice 0.515, with 4 rounds 1.41x / 0.490; dev_knapsack.md), else 4 (few coarse
    options: small steps leave remainders that overshoot the budget).

    Example:
        >>> from types import SimpleNamespace
        >>> default_rounds([SimpleNamespace(layer=i) for i in range(30)])
        8
    """
    return 8 if len({b.layer for b in branches}) >= 12 else 4


class BypassFitter:
    """SubFit's bypass fits for every branch from one set of statistics: low-rank attention, FFNs
    on a shared basis fitted on the FFNs given (policies that build on SubFit's forms use it too).

    Example:
        >>> fits = BypassFitter(ctx, SubfitOptions()).fits(stats, ffn_labels)  # doctest: +SKIP
    """

    def __init__(self, ctx: PolicyContext, opts: SubfitOptions) -> None:
        self.ctx, self.opts = ctx, opts
        self.width = ctx.branches[0].width
        self.rank, self.basis_size = default_ranks(self.width, asdict(opts))
        self.basis: torch.Tensor | None = None

    def fits(self, stats: dict[str, BranchStats], ffn_labels: list[str]) -> dict[str, Fit]:
        inp = self.opts.bypass_input
        ffns = [label for label in ffn_labels if label in stats]
        if ffns:
            self.basis = basis_for(stats, ffns, inp, self.basis_size, self.opts.ridge)
        out = {}
        for label, s in stats.items():
            b = self.ctx.session.by_label[label]
            if b.kind == "attention":
                out[label] = fit_branch(b, s, "lowrank", inp, rank=self.rank, lam=self.opts.ridge)
            else:
                out[label] = fit_branch(b, s, "shared", inp, basis=self.basis, lam=self.opts.ridge)
        return out

    @property
    def basis_params(self) -> int:
        return self.width * min(self.basis_size, self.width)


def _sequential_refit(ctx: PolicyContext, opts: SubfitOptions, fitter: BypassFitter,
                      fits: dict[str, Fit], spans: dict[str, tuple[str, ...]] | None = None,
                      batches: list | None = None) -> dict[str, Fit]:
    """Refit chosen bypasses in depth order on inputs from the compressed model, with the dense
    stream as target: t = (x + y)_dense - x~, so each bypass also repairs upstream drift
    (Gauss-Seidel). A span map (`spans`: its first branch -> every branch it covers) is refitted
    the same way, on the stream, to the dense stream after its last branch. Cost: one forward to
    record the dense streams, then one layer-wise sweep in which each segment between chosen
    branches runs twice (observed, then again with its refit in place): about three forwards of
    the calibration batches in all, whatever the number of branches. `batches`: the fits' batches
    (default the context's; the output judge's held-out sequences stay out)."""
    session, spans, batches = ctx.session, spans or {}, ctx.batches if batches is None else batches
    everything = session.execution_order()
    order = [label for label in everything if label in fits]
    end_of = {label: spans.get(label, (label,))[-1] for label in order}
    session.clear_replacements()
    dense = session.record_streams(batches, sorted(set(end_of.values()), key=everything.index),
                                   "sequential: dense targets", after_norm=False)
    fixed = [label for label in order
             if fits[label].form == "remove" or (fits[label].input is not None and label not in spans)]
    for label in fixed:  # nothing to refit (removal; a span map of unknown extent): in place from the
        # start, so later bypasses see them
        session.set_replacement(label, fits[label], opts.bypass_input)
    refit = {label: fits[label] for label in fixed}
    todo = [label for label in order if label not in fixed]
    streams = {label: iter(dense[end_of[label]]) for label in todo}  # one dense tensor per batch, in order
    targets = {label: (lambda x, _y, s=streams[label]: next(s) - x) for label in todo}
    inputs = (opts.bypass_input, "stream") if spans and opts.bypass_input != "stream" else (opts.bypass_input,)
    sweep = session.observe_layerwise(batches, [[label] for label in todo], inputs,
                                      desc="sequential refit", targets=targets, revisable=True)
    with closing(sweep):
        for stats in sweep:
            (label, branch_stats), = stats.items()
            if label in spans:
                fit = span_map_fit(branch_stats.gram["stream"], branch_stats.cross["stream"],
                                   branch_stats.scalars["y_sq"], opts.ridge)
            else:
                fit = fit_branch(session.by_label[label], branch_stats, fits[label].form, opts.bypass_input,
                                 rank=fitter.rank, basis=fitter.basis, lam=opts.ridge)
            refit[label] = fit
            session.set_replacement(label, fit, opts.bypass_input)  # later groups see it
            dense[end_of[label]].clear()  # its targets are used: free them
    session.clear_replacements()
    return {label: refit[label] for label in order}


def candidate_forms(ctx: PolicyContext, opts: SubfitOptions, fits: dict[str, Fit],
                    stats: dict[str, BranchStats]) -> dict[str, dict[str, Fit]]:
    """Candidate forms per branch: the fitted bypass, with forms='fit-or-remove' also plain
    removal, with 'auto' also a full-rank linear map (METHOD.md: per branch, the form that does
    best on held-out data).

    Example:
        >>> forms = candidate_forms(ctx, SubfitOptions(forms="auto"), fits, stats)  # doctest: +SKIP
        >>> forms["model.layers.3.mlp"].keys()  # doctest: +SKIP
        dict_keys(['fit', 'remove', 'linear'])
    """
    out = {label: {"fit": fit} for label, fit in fits.items()}
    for label in fits:
        for form in FORMS[opts.forms]:
            out[label][form] = fit_branch(ctx.session.by_label[label], stats[label], form, opts.bypass_input,
                                          lam=opts.ridge)
    return out


class Choice(NamedTuple):
    """A candidate replacement: a branch and the form that replaces it ("fit": the default bypass)."""

    label: str
    form: str = "fit"


def subfit(ctx: PolicyContext) -> Recipe:
    """The SubFit policy: a Recipe of non-contiguous single-branch replacements at the budget.

    By default (judge="output") every candidate is judged by its effect at the model's output on
    held-out calibration sequences (see `_subfit_judged`); judge="statistics" is the one-shot
    policy that ranks branches by a statistics-only score (no extra forwards).

    Example:
        >>> recipe = subfit(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(SubfitOptions)
    if opts.judge == "output":
        return _subfit_judged(ctx, opts)
    return _subfit_statistics(ctx, opts)


def _subfit_statistics(ctx: PolicyContext, opts: SubfitOptions) -> Recipe:
    """One-shot SubFit (judge="statistics"): score, select greedily, fit; optional re-scoring."""
    session = ctx.session
    fitter = BypassFitter(ctx, opts)
    all_ffn = [b.label for b in ctx.branches if b.kind == "ffn"]
    stats = session.calibrate(ctx.batches, inputs=(opts.bypass_input,), desc="calibrate")
    dense_stats = dict(stats)

    holdout_scores = None
    if opts.score == "holdout":
        reference = None if ctx.causal else dense_reference(session, ctx.holdout)

        def holdout_scores(fits: dict[Choice, Fit]) -> dict[Choice, float]:
            """Held-out loss increase with only this branch replaced (others as currently set)."""
            base = heldout_loss(session, ctx.holdout, ctx.causal, reference)
            out = {}
            for key, fit in fits.items():
                session.set_replacement(key.label, fit, opts.bypass_input)
                out[key] = max(heldout_loss(session, ctx.holdout, ctx.causal, reference) - base, 0.0)
                session.set_replacement(key.label, None)
            return out

    def score_all(labels: list[str], fits: dict[str, Fit]) -> dict[Choice, float]:
        alts = candidate_forms(ctx, opts, {label: fits[label] for label in labels}, stats)
        flat = {Choice(label, form): fit for label, forms in alts.items() for form, fit in forms.items()}
        for label in labels:
            for name, fn in SCORES.items():
                ctx.record_score(label, name, fn(stats[label], fits[label]))
        if opts.score != "holdout":
            return {Choice(label): ctx.scores[label][opts.score] for label in labels}
        assert holdout_scores is not None
        values = holdout_scores(flat)
        for key, value in values.items():
            ctx.record_score(key.label, "holdout" if key.form == "fit" else f"holdout_{key.form}", value)
        candidate_fits.update(flat)
        return values

    def candidate(key: Choice, score: float) -> Candidate:
        label = key.label
        fit = candidate_fits[key]
        cost = fit.params + (kept_norm_params(session.by_label[label], opts.bypass_input) if fit.layers else 0)
        return Candidate(key, score, session.by_label[label].params, cost,
                         "ffn_basis" if fit.form == "shared" else None, branch=label)

    candidate_fits: dict[Choice, Fit] = {}
    fits = fitter.fits(stats, all_ffn)
    candidate_fits.update({Choice(label): fit for label, fit in fits.items()})
    scores = score_all(list(stats), fits)
    chosen: list[Choice] = []
    while True:
        taken = {k.label for k in chosen}
        pool = [candidate(k, v) for k, v in scores.items() if k.label not in taken]
        picks = select(pool, ctx.block_params, ctx.target, {"ffn_basis": fitter.basis_params},
                       already=[candidate(k, 0.0) for k in chosen], limit=opts.rescore_every)
        chosen += picks
        if not picks or opts.rescore_every is None:
            break
        # Re-score the rest with the chosen branches replaced (compounding errors).
        for key in chosen:
            session.set_replacement(key.label, candidate_fits[key], opts.bypass_input)
        taken = {k.label for k in chosen}
        remaining = [b.label for b in ctx.branches if b.label not in taken]
        if not remaining:
            break
        stats.update(session.calibrate(ctx.batches, remaining, (opts.bypass_input,), desc="re-score"))
        new_fits = fitter.fits({label: stats[label] for label in remaining},
                               [label for label in all_ffn if label in remaining])
        candidate_fits.update({Choice(label): fit for label, fit in new_fits.items()})
        scores = {k: v for k, v in scores.items() if k.label not in remaining}
        scores.update(score_all(remaining, new_fits))
        session.clear_replacements()
    session.clear_replacements()

    # Final fits from the dense statistics; the FFN basis is fitted on the chosen FFNs only.
    forms = {k.label: k.form for k in chosen}
    fit_labels = [label for label, form in forms.items() if form == "fit"]
    chosen_ffn = [label for label in fit_labels if session.by_label[label].kind == "ffn"]
    final = fitter.fits({label: dense_stats[label] for label in fit_labels}, chosen_ffn)
    for label, form in forms.items():
        if form != "fit":
            final[label] = fit_branch(session.by_label[label], dense_stats[label], form, opts.bypass_input,
                                      lam=opts.ridge)
    if opts.sequential and final:
        final = _sequential_refit(ctx, opts, fitter, final)
    for label, fit in final.items():
        ctx.record_score(label, "fit_error_relative",
                         fit.error / max(float(dense_stats[label].scalars["y_sq"]), 1e-30))
    return recipe_from_fits("subfit", ctx.branches, final, {label: opts.bypass_input for label in final},
                            options={"sparsity": ctx.target, **asdict(opts)})


SPANNED = "spanned"  # the form of a branch inside a chosen span (removed; the span's first branch maps it)


def _judged_candidates(ctx: PolicyContext, opts: SubfitOptions, alts: dict[str, dict[str, Fit]],
                       damage: dict[tuple[str, str], float],
                       spans: dict[tuple[str, str], tuple[str, ...]] | None = None) -> list[Candidate]:
    """Candidates of judged (branch, form) choices; a span form stands for all its branches."""
    out = []
    by_label = ctx.session.by_label
    for (label, form), value in damage.items():
        if form == SPANNED:
            continue
        fit = alts[label][form]
        covers = (spans or {}).get((label, form), ())
        if covers:
            out.append(Candidate(Choice(label, form), value, sum(by_label[lb].params for lb in covers), fit.params,
                                 branch=label, covers=covers))
            continue
        cost = fit.params + (kept_norm_params(by_label[label], opts.bypass_input) if fit.layers else 0)
        out.append(Candidate(Choice(label, form), value, by_label[label].params, cost,
                             "ffn_basis" if fit.form == "shared" else None, branch=label))
    return out


SPAN_MEMORY = 2 << 30  # bytes the span statistics may take when `spans` is automatic
AUTO_SPANS = 6  # the longest run of layers an automatic span map covers
AUTO_SPAN_MIN_LAYERS = 8  # automatic span maps only from this depth on: in shallower models a 2-layer span
# is a quarter of the model or more, too coarse a unit to land near a budget


def span_lengths(spans: int | None, layers: int, width: int, memory: int = SPAN_MEMORY) -> range:
    """Span lengths (in layers) to judge: 2..`spans`; automatic (None): none below
    AUTO_SPAN_MIN_LAYERS layers, else 2..n for the largest n <= AUTO_SPANS whose float64
    statistics (one (width+1)^2 Gram per start layer, one cross per span) fit in `memory` bytes.

    Example:
        >>> span_lengths(None, 30, 576), span_lengths(None, 32, 4096), span_lengths(3, 30, 4096)
        (range(2, 7), range(2, 2), range(2, 4))
        >>> span_lengths(None, 4, 64)
        range(2, 2)
    """
    if spans is not None:
        return range(2, max(spans, 1) + 1)
    if layers < AUTO_SPAN_MIN_LAYERS:
        return range(2, 2)
    for longest in range(min(AUTO_SPANS, layers), 1, -1):
        count = sum(layers - n + 1 for n in range(2, longest + 1))
        if (layers + count) * 8 * (width + 1) ** 2 <= memory:
            return range(2, longest + 1)
    return range(2, 2)


def span_map_fit(gram: torch.Tensor, cross: torch.Tensor, y_sq: torch.Tensor, lam: float) -> Fit:
    """A span map from its statistics (stream [x, 1] -> stream after the span - x): ridge in
    float64, stored in float32 (applied in the model's dtype anyway), reading the stream.

    Example:
        >>> g = torch.eye(3, dtype=torch.float64); c = torch.zeros(3, 2, dtype=torch.float64)
        >>> span_map_fit(g, c, torch.tensor(0.0), 1e-3).input
        'stream'
    """
    fit = ridge(gram, cross, y_sq, lam)
    fit.layers = [(w.float(), b.float()) for w, b in fit.layers]
    fit.input = "stream"
    return fit


def span_fits(ctx: PolicyContext, opts: SubfitOptions, batches: list,
              ) -> dict[tuple[str, str], tuple[Fit, tuple[str, ...]]]:
    """One linear map (ridge, in closed form, on the stream) for every run of 2..`opts.spans` whole
    layers: {(first branch, "spanN"): (fit, every branch of the span)}. Empty where the model's
    layers are not sequential pre-LN blocks (a span map replaces the stream between two layers).

    Example:
        >>> fits = span_fits(ctx, SubfitOptions(spans=4), ctx.batches)  # doctest: +SKIP
        >>> sorted(fits)[0]  # doctest: +SKIP
        ('model.layers.0.self_attn', 'span2')
    """
    from subfit_fx.methods.layers import group_layers, require_sequential, span_map_statistics

    session = ctx.session
    layers = group_layers(ctx.branches)
    lengths = span_lengths(opts.spans, len(layers), ctx.branches[0].width)
    if opts.spans is None and not lengths and len(layers) >= AUTO_SPAN_MIN_LAYERS:
        ctx.notes.append(f"span maps skipped: their statistics would exceed {SPAN_MEMORY >> 30} GiB at this width "
                         "(pass spans=N to judge runs of up to N layers anyway)")
        return {}
    try:
        require_sequential(session, layers)
        sequential = True
    except InputError:  # parallel residual layers: no stream between two layers to map
        sequential = False
    if not lengths or not sequential or any(session.post_norm(b.label) for b in ctx.branches):
        if lengths and opts.spans is not None:
            ctx.notes.append("span maps skipped: they need sequential pre-LN layers")
        return {}
    stats = span_map_statistics(session, batches, lengths, desc="span statistics")
    out = {}
    for (i, n) in sorted(stats):
        gram, cross, y_sq = stats.pop((i, n))  # each cross goes once fitted: memory stays at the statistics
        fit = span_map_fit(gram, cross, y_sq, opts.ridge)
        covers = tuple(label for layer in layers[i:i + n] for label in layer.labels)
        out[covers[0], f"span{n}"] = (fit, covers)
    return out


def merge_spans(recipe: Recipe, spans: dict[str, tuple[str, ...]], layer_of: dict[str, int]) -> Recipe:
    """Each chosen span as one Replacement over its branches (stream in, stream out), in place of
    its first branch's map and its other branches' removals. A span whose map was turned into
    removal stays as per-branch removals.

    Example:
        >>> recipe = merge_spans(recipe, {"model.layers.3.self_attn": covers}, layer_of)  # doctest: +SKIP
    """
    from subfit_fx.recipe import Replacement

    reps = list(recipe.replacements)
    for head, covers in spans.items():
        first = next(r for r in reps if r.labels == (head,))
        if first.action != "bypass":
            continue
        merged = Replacement(covers, "bypass", first.form, "stream", first.layers,
                             {**first.info, "layers": sorted({layer_of[label] for label in covers})})
        at = reps.index(first)
        reps[at] = merged
        reps = [r for r in reps if r is merged or not set(r.labels) & set(covers)]
    recipe.replacements = reps
    return recipe


def shortlist_branches(pool: list[Candidate], need: float, multiple: float, minimum: int = 4) -> set[str]:
    """Branches to re-judge: the best by (stale) damage per parameter saved, until they save
    `multiple` x `need` parameters (at least `minimum` branches).

    Example:
        >>> pool = [Candidate("a", 0.1, 10, 0), Candidate("b", 0.5, 10, 0), Candidate("c", 0.2, 10, 0)]
        >>> sorted(shortlist_branches(pool, 10, 1.0, minimum=2))
        ['a', 'c']
    """
    best: dict[str, Candidate] = {}
    for c in sorted(pool, key=lambda c: (c.score / max(c.saved, 1), c.label)):
        best.setdefault(c.key, c)
    picked, saved = set(), 0
    for label, c in best.items():
        if saved >= multiple * need and len(picked) >= minimum:
            break
        picked.add(label)
        saved += max(c.saved, 0)
    return picked


def commit_plan(pool: list[Candidate], plan: list, fresh: dict, already: list[Candidate], step: float,
                block_params: int, group_costs: dict[str, int]) -> list:
    """The part of a round's knapsack `plan` it commits: the picks judged this round (`fresh`),
    least damage per parameter saved first, until the net sparsity reaches `step`.

    Example:
        >>> pool = [Candidate("a", 0.1, 10, 0), Candidate("b", 0.5, 10, 0), Candidate("c", 0.2, 10, 0)]
        >>> commit_plan(pool, ["a", "b", "c"], {"a": 0.1, "b": 0.5}, [], 0.1, 100, {})
        ['a']
    """
    by_label = {c.label: c for c in pool}
    ranked = sorted((by_label[p] for p in plan if p in fresh), key=lambda c: (c.score / max(c.saved, 1), str(c.label)))
    commit: list[Candidate] = []
    for c in ranked:
        if sparsity_of([*already, *commit], block_params, group_costs) >= step:
            break
        commit.append(c)
    return [c.label for c in commit]


def _keep_better(ctx: PolicyContext, opts: SubfitOptions, judge: OutputJudge, old: dict[str, Fit],
                 new: dict[str, Fit], what: str) -> dict[str, Fit]:
    """`new` fits if they judge no worse than `old` at the output (both whole sets), else `old`."""
    scores = [judge.of(fits, opts.bypass_input) for fits in (old, new)]
    kept = new if scores[1] <= scores[0] else old
    ctx.notes.append(f"{what}: divergence {scores[0]:.4g} -> {scores[1]:.4g} "
                     f"({'kept' if kept is new else 'rejected'})")
    return kept


def _never_worse_than_removal(ctx: PolicyContext, opts: SubfitOptions, judge: OutputJudge,
                              fits: dict[str, Fit], removed: dict[str, Fit]) -> dict[str, Fit]:
    """With the whole selection in place, turn each bypass into plain removal where that judges
    better (one forward per bypass), then keep the result only if it judges no worse than removing
    every chosen branch: the selection never does worse at the output than plain removal of the
    same branches."""
    def judged(candidate: dict[str, Fit]) -> float:
        return judge.of(candidate, opts.bypass_input)

    current, swapped = dict(fits), []
    session = ctx.session
    with session.replaced(current, opts.bypass_input):
        best = judge()
        # in depth order, so each trial reruns only from its branch on (judge(start=...))
        for label in [b.label for b in ctx.branches if b.label in fits and fits[b.label].form != "remove"]:
            session.set_replacement(label, removed[label], opts.bypass_input)
            value = judge(start=label)
            if value < best:
                current[label], best = removed[label], value
                swapped.append(label)
                judge()  # a new restart point: this branch's output changed for good
            else:
                session.set_replacement(label, current[label], opts.bypass_input)
    everything = judged(removed)
    if swapped:
        ctx.notes.append(f"bypasses that judged worse than removal in the final selection, removed: {swapped}")
    if everything < best:
        ctx.notes.append("the whole selection judged worse than removing the same branches: removed them")
        return removed
    return current


def judge_split(ctx: PolicyContext, sequences: int) -> tuple[list, list]:
    """(calibration batches, one held-out batch of `sequences` sequences) for an output judge:
    the context's held-out batches when it has them, else sequences split off the calibration.

    Example:
        >>> batches, held = judge_split(ctx, 4)  # doctest: +SKIP
    """
    from subfit_fx.data import split_batches

    batches, held = ctx.batches, ctx.holdout
    if not held:
        n_seq = sum(int(ids.shape[0]) for ids, _ in batches)
        if n_seq < 2:
            raise InputError("the output judge needs at least 2 calibration sequences; pass more --samples "
                             "or judge='statistics'")
        batches, held = split_batches(batches, min(sequences, n_seq // 2) / n_seq)
    ids = torch.cat([ids for ids, _ in held])[:sequences]
    mask = torch.cat([mask for _, mask in held])[:sequences]
    return batches, [(ids, mask)]


def _subfit_judged(ctx: PolicyContext, opts: SubfitOptions) -> Recipe:
    """SubFit judged at the output (the default). Guards against "a good local fit is not a good
    replacement" (METHOD.md) at a cost that scales with the number of branches n:

    1. one calibration pass: statistics of every branch; per branch the candidate forms (the
       default bypass, plain removal, and with forms="auto" a full linear map) fitted in closed form;
       one more pass: for every run of 2..6 whole layers (`spans`; automatic: as long as their
       statistics fit in SPAN_MEMORY), one linear map from the stream entering it to the stream
       leaving it (ReplaceMe's form), a candidate that replaces all the run's branches at once;
    2. round 1 judges every candidate alone by the damage at the output on `judge_sequences`
       held-out sequences (KL to the dense next-token distribution; output energy for encoders),
       plans the whole budget with an exact multiple-choice knapsack over every branch's forms and
       the span maps (`select_jointly`, walked in layer order) and commits the planned picks with
       the least damage per parameter saved up to 1/`rounds` of the budget (selection="greedy":
       picks greedily by damage per parameter saved instead);
    3. each later round sets the picks so far, re-judges the `shortlist`-times-needed best
       remaining branches (compounding), re-plans the rest of the budget with the latest damages
       and commits up to the next fraction of it (the last round commits its whole plan).

    Cost: two calibration passes + about F * (n + (rounds - 1) * m) + S forwards of
    `judge_sequences` sequences, F forms per branch (2, or 3 with forms="auto"), m the shortlist (a
    few times the branches a round needs; at most n) and S the spans (about (spans - 1) x layers in
    round 1, a shortlist's after). For n = 60 (a 30-layer model, 8 rounds) that is ~430 forwards
    (SmolLM2 at 25 %), each rerunning only the layers after the candidate.
    A branch's chosen form never judges worse than its removal (removal saves more parameters,
    so a fit that damages more is dominated and dropped).
    """
    session = ctx.session
    batches, held = judge_split(ctx, opts.judge_sequences)
    held_ids = held[0][0]
    forms = FORMS[opts.forms] if opts.forms != "fit" else FORMS["fit-or-remove"]
    fitter = BypassFitter(ctx, opts)
    all_ffn = [b.label for b in ctx.branches if b.kind == "ffn"]
    stats = session.calibrate(batches, inputs=(opts.bypass_input,), desc="calibrate")
    fits = fitter.fits(stats, all_ffn)
    alts = candidate_forms(ctx, SubfitOptions(**{**asdict(opts), "forms": "auto" if "linear" in forms
                                               else "fit-or-remove"}), fits, stats)
    for label, fit in fits.items():
        for name, fn in SCORES.items():
            ctx.record_score(label, name, fn(stats[label], fit))
    spans = span_fits(ctx, opts, batches)
    span_of = {key: covers for key, (_fit, covers) in spans.items()}
    for (head, form), (fit, _covers) in spans.items():
        alts[head][form] = fit

    def fit_of(label: str, form: str) -> Fit:
        return alts[label]["remove" if form == SPANNED else form]

    def choose(picks: list[Choice]) -> None:
        for label, form in picks:
            chosen[label] = form
            for member in span_of.get((label, form), (label,))[1:]:
                chosen[member] = SPANNED

    def candidates(values: dict[tuple[str, str], float]) -> list[Candidate]:
        return _judged_candidates(ctx, opts, alts, values, span_of)

    def unchosen(pool: list[Candidate]) -> list[Candidate]:
        return [c for c in pool if not c.keys & chosen.keys()]

    judge = OutputJudge(session, held, ctx.causal, context=opts.judge_context)
    group_costs = {"ffn_basis": fitter.basis_params}
    chosen: dict[str, str] = {}  # label -> form
    damage: dict[tuple[str, str], float] = {}
    stale: list[Candidate] = []
    n_rounds = opts.rounds if opts.rounds is not None else default_rounds(ctx.branches)
    bar = tqdm(total=n_rounds, desc="judge", leave=False, disable=not (session.progress))
    for r in range(n_rounds):
        session.clear_replacements()
        for label, form in chosen.items():
            session.set_replacement(label, fit_of(label, form), opts.bypass_input)
        already = candidates({(lb, f): 0.0 for lb, f in chosen.items()})
        reached = sparsity_of(already, ctx.block_params, group_costs)
        step_target = ctx.target * (r + 1) / n_rounds
        labels = [b.label for b in ctx.branches if b.label not in chosen]
        if r > 0:
            need = (step_target - reached) * ctx.block_params
            keep = shortlist_branches(unchosen(stale), need, opts.shortlist)
            labels = [label for label in labels if label in keep]
        base = judge()
        fresh: dict[tuple[str, str], float] = {}
        for label in tqdm(labels, desc=f"judge round {r + 1}/{n_rounds}", leave=False, unit="branch",
                          disable=not session.progress):
            for form, fit in alts[label].items():
                members = span_of.get((label, form), (label,))[1:]
                if any(member in chosen for member in members):
                    continue
                for member in members:
                    session.set_replacement(member, REMOVE)
                session.set_replacement(label, fit, opts.bypass_input)
                fresh[label, form] = max(judge(start=label) - base, 0.0)  # only the graph after it reruns
                for member in members:
                    session.set_replacement(member, None)
            session.set_replacement(label, None)
            # removal saves at least as much as any fit of the branch: a fit that damages more is dominated
            for form in [f for f in alts[label] if f != "remove" and (label, f) not in span_of]:
                if fresh[label, form] >= fresh[label, "remove"]:
                    del fresh[label, form]
        # a re-judged branch's older judgements go: a fit dominated now must not come back
        # through the stale pool (budget repair)
        damage = {key: value for key, value in damage.items() if key[0] not in labels} | fresh
        for (label, form), value in fresh.items():
            ctx.record_score(label, "judged" if form == "fit" else f"judged_{form}", value)
        if opts.selection == "greedy":
            pool = unchosen(candidates(fresh))
            choose(select(pool, ctx.block_params, step_target, group_costs, already=already, tolerance=1.0))
        else:
            # plan the whole remaining budget with the latest damages (this round's for the
            # shortlist, older ones for the rest) so that coarse options (span maps) compete as what
            # they are; commit the planned picks judged this round, least damage per parameter
            # first, up to the round's step; the last round commits the whole plan
            pool = unchosen(candidates(damage))
            paid = {c.group for c in already if c.group}
            costs = {g: 0 if g in paid else cost for g, cost in group_costs.items()}
            plan = select_jointly(pool, ctx.block_params, max(ctx.target - reached, 0.0), costs,
                                  tolerance=BUDGET_TOLERANCE, order=[b.label for b in ctx.branches])
            last = r == n_rounds - 1
            choose(plan if last else commit_plan(pool, plan, fresh, already, step_target, ctx.block_params,
                                                 group_costs))
        stale = unchosen(candidates(damage))
        bar.update(1)
        if sparsity_of(candidates({(lb, f): 0.0 for lb, f in chosen.items()}),
                       ctx.block_params, group_costs) >= ctx.target:
            break
    bar.close()
    # honest budget: an overshoot beyond 1.5 points is repaired by one swap (latest judged damages)
    mine = candidates({(lb, f): damage[lb, f] for lb, f in chosen.items() if f != SPANNED})
    keys = repair_overshoot(mine, [c.label for c in mine], stale, ctx.block_params, ctx.target, group_costs)
    if sorted(keys) != sorted(c.label for c in mine):
        out, into = sorted(set(c.label for c in mine) - set(keys)), sorted(set(keys) - set(c.label for c in mine))
        ctx.notes.append(f"budget repair: {', '.join(f'{k.label} ({k.form})' for k in out)} swapped for "
                         f"{', '.join(f'{k.label} ({k.form})' for k in into)}")
        chosen = {}
        choose(keys)
    session.clear_replacements()
    # Final fits from the dense statistics; the FFN basis is fitted on the chosen FFNs only.
    fit_labels = [label for label, form in chosen.items() if form == "fit"]
    chosen_ffn = [label for label in fit_labels if session.by_label[label].kind == "ffn"]
    final = fitter.fits({label: stats[label] for label in fit_labels}, chosen_ffn)
    for label, form in chosen.items():
        if form != "fit":
            final[label] = fit_of(label, form)
    final = _keep_better(ctx, opts, judge, {label: fit_of(label, form) for label, form in chosen.items()}, final,
                         "chosen FFNs' own basis")
    chosen_spans = {label: span_of[label, form] for label, form in chosen.items() if (label, form) in span_of}
    if opts.sequential and final:
        refit = _sequential_refit(ctx, opts, fitter, final, chosen_spans, batches)
        final = _keep_better(ctx, opts, judge, final, refit, "sequential refit")
    final = _never_worse_than_removal(ctx, opts, judge, final, {label: alts[label]["remove"] for label in final})
    ctx.notes.append(f"output judge: {judge.calls} forwards of {int(held_ids.shape[0])} held-out sequences")
    layer_of = {b.label: b.layer for b in ctx.branches}
    for head, covers in chosen_spans.items():
        ctx.notes.append(f"span map: layers {layer_of[covers[0]]}-{layer_of[covers[-1]]} replaced by one linear map "
                         f"({final[head].params:,} parameters)")
    for label, fit in final.items():
        if chosen.get(label) == SPANNED or label in chosen_spans:
            continue  # a span's fit error is over the span, not the branch
        ctx.record_score(label, "fit_error_relative",
                         fit.error / max(float(stats[label].scalars["y_sq"]), 1e-30))
    recipe = recipe_from_fits("subfit", ctx.branches, final, {label: opts.bypass_input for label in final},
                              options={"sparsity": ctx.target, **asdict(opts)})
    return merge_spans(recipe, chosen_spans, layer_of)


@dataclass(frozen=True)
class GuardedOptions(SubfitOptions):
    """`SubfitOptions` with the guarded preset as defaults (held-out scoring of every form,
    re-scored after every choice, sequential fits).

    Example:
        >>> GuardedOptions().score, GuardedOptions(rescore_every=2).forms
        ('holdout', 'auto')
    """

    judge: str = "statistics"
    score: str = "holdout"
    forms: str = "auto"
    rescore_every: int | None = 1
    sequential: bool = True
    holdout: float = 0.25


def subfit_guarded(ctx: PolicyContext) -> Recipe:
    """SubFit with METHOD.md's guards against "a good local fit is not a good replacement": each
    candidate (bypass, plain removal or a full linear map) is judged by its effect on held-out loss,
    re-scored after every choice (compounding), and the chosen bypasses are fitted sequentially.
    Without held-out batches it holds out a quarter of the calibration sequences itself.

    Example:
        >>> recipe = subfit_guarded(ctx)  # doctest: +SKIP
    """
    from subfit_fx.data import split_batches

    ctx.options = ctx.options_as(GuardedOptions)
    if not ctx.holdout:
        ctx.batches, ctx.holdout = split_batches(ctx.batches, 0.25)
    recipe = subfit(ctx)
    recipe.method = "subfit-guarded"
    return recipe
