"""The default method ("auto"): width pruning (`saap`) where it applies, else SubFit's branch
replacement.

Chosen on the dev half of the reference model (SmolLM2-135M-Instruct, docs/results/
quality_findings.md "Session 19"): importance-sorted width pruning kept continuation-choice
accuracy far better than SubFit and the hybrid at 25 % and 37.5 % (dev 37.5 %: 0.550 vs 0.430 and
0.500), within a few per cent of their perplexity, in ~40 s instead of ~10 minutes. Where it
does not apply, auto says so in the report's notes and runs:

- SubFit (default options) when some FFN branch exposes no prunable channels (fused or Conv1D
  projections: GPT-2, Gemma 2), or when width pruning's statistics would take more than
  `WIDTH_MEMORY` (models from ~4B parameters on) and the pipeline does not offload them (the
  layer-wise pipeline with an offload directory, `--pipeline sequential --offload DIR`, writes
  each layer's Grams there and maps them back: width pruning then runs at any size);
- the hybrid (default options) when width pruning cannot reach the budget (every channel block
  that `max_layer_ratio` allows is gone): it replaces whole branches for the rest.

From `JUDGED_FROM` (30 %) on, the width pruning is allocated by the output judge instead of saap's
statistics (`hybrid` with `replace=False`: the same channel blocks, each FFN's slimming level
chosen by its damage at the output, compounding in rounds). On SmolLM2's test half it is the
better model at 31.25 % (perplexity 1.53x against 1.60x) and 37.5 % (1.75x against 1.86x, choice
0.500 against 0.480), as on the dev half (docs/results/quality_findings.md, "Session 21"), for
~8 minutes of judging instead of ~40 s; at 25 % it gains only 1-2 % of perplexity (choice level),
not worth 12x the time (the demo's 10-minute budget), so saap's own allocation runs below 30 %
(4 judge rounds instead of 8 lose that gain: dev 1.384x against 1.357x, saap 1.389x). Where the
judge's rounds land farther from the budget than saap's plan (coarse channel blocks of tiny FFNs),
auto keeps saap's recipe and says so; that plan comes from the judge's calibration split, so the
two plans share one pass of inner statistics.

The recipe's method is the policy that ran ("saap", "subfit" or "hybrid"; the judged allocation
is "hybrid" with `replace: false`); its options record `auto: true`. Auto takes no options: to
tune one, name the method (`--method saap --block 128`).

Example:
    >>> from subfit_fx.methods import check_method
    >>> check_method("auto").options.__name__
    'NoOptions'
"""

from __future__ import annotations

import dataclasses

from subfit_fx.methods.base import NoOptions, PolicyContext
from subfit_fx.methods.hybrid import HybridOptions, hybrid, saved_params
from subfit_fx.methods.saap import SaapOptions, reaches_budget, width_recipe, width_sites
from subfit_fx.methods.subfit import SubfitOptions, judge_split, subfit
from subfit_fx.recipe import Recipe
from subfit_fx.selection import BUDGET_TOLERANCE

__all__ = ["JUDGED_FROM", "WIDTH_MEMORY", "auto"]

# Width pruning keeps one (channels + 1)^2 float64 Gram per FFN until it plans: 8.0 GiB for a
# Llama-3.2-1B shape, 14 GiB for 3B, 29 GiB for Llama-2-7B. Beyond this, auto runs SubFit, whose
# statistics are per branch output (hidden width) and stream through the layer-wise pipeline.
WIDTH_MEMORY = 16 << 30

# From this target on, the output judge allocates the width pruning (hybrid, replace=False).
JUDGED_FROM = 0.3


def auto(ctx: PolicyContext) -> Recipe:
    """Width pruning where every FFN branch exposes its channels and they reach the budget; SubFit
    or the hybrid otherwise (see the module docstring).

    Example:
        >>> recipe = auto(ctx)  # doctest: +SKIP
    """
    ctx.options_as(NoOptions)
    ffn = [b.label for b in ctx.branches if b.kind == "ffn"]
    sites = width_sites(ctx, SaapOptions())
    missing = [label for label in ffn if label not in sites]
    if not ffn or missing:
        ctx.notes.append(f"auto: width pruning does not apply ({_why(ffn, missing)}); ran subfit")
        return _ran(subfit(dataclasses.replace(ctx, options=SubfitOptions())))
    need = sum(8 * (site.channels + 1) ** 2 for site in sites.values())
    # the layer-wise pipeline with an offload directory writes each layer's Grams there and maps
    # them back: they take disk, and memory one layer's at a time
    on_disk = getattr(ctx.session.pipeline, "offload", None) is not None
    if need > WIDTH_MEMORY and not on_disk:
        ctx.notes.append(f"auto: width pruning's inner statistics (one float64 Gram per FFN) would take "
                         f"{need / 2**30:.1f} GiB, over {WIDTH_MEMORY / 2**30:.0f} GiB; ran subfit "
                         "(--pipeline sequential --offload DIR keeps them on disk; --method saap runs width "
                         "pruning anyway)")
        return _ran(subfit(dataclasses.replace(ctx, options=SubfitOptions())))
    if need > WIDTH_MEMORY:
        ctx.notes.append(f"auto: width pruning's inner statistics ({need / 2**30:.1f} GiB) go to the offload "
                         "directory, memory-mapped back")
    judged = ctx.target >= JUDGED_FROM - 1e-9
    opts = HybridOptions(replace=False)
    # from JUDGED_FROM saap's plan is the guard's yardstick and fallback; made on the judge's
    # calibration split, it shares one pass of inner statistics with the judged allocation
    plan_ctx = dataclasses.replace(ctx, batches=judge_split(ctx, opts.judge_sequences)[0]) if judged else ctx
    with ctx.session.reusing_inner_stats():
        recipe, saved = width_recipe(plan_ctx, SaapOptions())
        if not reaches_budget(ctx, saved):
            ctx.notes.append(f"auto: width pruning reaches {saved / ctx.block_params:.2%} of block parameters, "
                             f"short of the {ctx.target:.2%} target; ran hybrid (width pruning and branch "
                             "replacement)")
            return _ran(hybrid(dataclasses.replace(ctx, options=HybridOptions())))
        if judged:
            return _ran(_judged_or_saap(ctx, opts, recipe, saved))
    ctx.notes.append("auto: ran saap (width pruning of FFN channel blocks)")
    return _ran(recipe)


def _judged_or_saap(ctx: PolicyContext, opts: HybridOptions, saap: Recipe, saap_saved: int) -> Recipe:
    """The judged width allocation, unless it lands farther from the budget than saap's plan."""
    judged = hybrid(dataclasses.replace(ctx, options=opts))
    miss, saap_miss = (abs(x / ctx.block_params - ctx.target) for x in (saved_params(ctx, judged), saap_saved))
    if miss <= max(BUDGET_TOLERANCE, saap_miss):
        ctx.notes.append(f"auto: ran hybrid with replace=False (width pruning of FFN channel blocks, each "
                         f"FFN's share chosen by the output judge: the default from {JUDGED_FROM:.0%})")
        return judged
    # coarse channel blocks (tiny FFNs): the judge's rounds can overshoot where saap's plan lands
    ctx.notes.append(f"auto: the output judge's allocation landed {miss:.2%} from the target, saap's "
                     f"{saap_miss:.2%}; ran saap (width pruning of FFN channel blocks, planned on the "
                     "judge's calibration split)")
    return saap


def _why(ffn: list[str], missing: list[str]) -> str:
    if not ffn:
        return "the model has no FFN branches"
    return f"{len(missing)} of {len(ffn)} FFN branches expose no prunable channels, e.g. {missing[0]}"


def _ran(recipe: Recipe) -> Recipe:
    recipe.options = {**recipe.options, "auto": True}
    return recipe
