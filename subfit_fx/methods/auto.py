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

saap allocates the channel blocks across layers by their damage in the model output's metric
(`SaapOptions.allocation="output"`: one backward pass over 16 calibration sequences measures how
much the output moves with each FFN's output; an exact knapsack picks every FFN's width). On the
dev half it beat the output judge's rounds that auto ran from 30 % until session 23 (`hybrid`
with `replace=False`: 37.5 % perplexity 1.67x against 1.73x, choice 0.540 against 0.510; 25 %
1.35x against 1.36x) in a twentieth of their forwards (docs/results/quality_findings.md,
"Session 23"), so it runs at every sparsity. Since session 25 the same knapsack also prices
whole key/value groups of attention (`SaapOptions.heads` None: on where the output allocation
runs): dev half 1.34x / 1.60x at 25 / 37.5 % against 1.35x / 1.67x for FFN channels alone, next-
token retention 0.921 / 0.867 against 0.909 / 0.840, choice 0.550 / 0.515 against 0.560 / 0.540
(within the 200 items' standard error), and the KV cache of the dropped groups goes too.

Since session 35 auto prices key/value groups only above `HEADS_ABOVE` (25 %): on 1000 paired
items per run the groups cost continuation choice every time they were measured (dev 25 %: -0.013,
McNemar p = 0.053; test 25 %: -0.007, p = 0.34; dev 37.5 %: -0.007, p = 0.37; pooled 48 against 75
discordant items, p = 0.02), while the perplexity they buy grows with the budget: under 1 % at 25 %
(test 1.314x against 1.319x), 3-5 % from 31.25 % on (test 1.44x / 1.59x against 1.48x / 1.67x).

The recipe's method is the policy that ran ("saap", "subfit" or "hybrid"); its options record
`auto: true`. Auto takes no options: to tune one, name the method (`--method saap --block 128`).

Example:
    >>> from subfit_fx.methods import check_method
    >>> check_method("auto").options.__name__
    'NoOptions'
"""

from __future__ import annotations

import dataclasses

from subfit_fx.methods.base import NoOptions, PolicyContext
from subfit_fx.methods.hybrid import HybridOptions, hybrid
from subfit_fx.methods.saap import SaapOptions, reaches_budget, width_recipe, width_sites
from subfit_fx.methods.subfit import SubfitOptions, subfit
from subfit_fx.recipe import Recipe

__all__ = ["HEADS_ABOVE", "WIDTH_MEMORY", "auto"]

# Width pruning keeps one (channels + 1)^2 float64 Gram per FFN until it plans: 8.0 GiB for a
# Llama-3.2-1B shape, 14 GiB for 3B, 29 GiB for Llama-2-7B. Beyond this, auto runs SubFit, whose
# statistics are per branch output (hidden width) and stream through the layer-wise pipeline.
WIDTH_MEMORY = 16 << 30

# Key/value groups trade continuation-choice accuracy for perplexity; up to this target sparsity
# their perplexity gain is under 1 % on SmolLM2 and auto keeps attention whole (module docstring).
HEADS_ABOVE = 0.25


def auto(ctx: PolicyContext) -> Recipe:
    """Width pruning where every FFN branch exposes its channels and they reach the budget; SubFit
    or the hybrid otherwise (see the module docstring).

    Example:
        >>> recipe = auto(ctx)  # doctest: +SKIP
    """
    ctx.options_as(NoOptions)
    ffn = [b.label for b in ctx.branches if b.kind == "ffn"]
    opts = SaapOptions(heads=None if ctx.target > HEADS_ABOVE else False)
    sites = width_sites(ctx, opts)
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
    recipe, saved = width_recipe(ctx, opts)
    if not reaches_budget(ctx, saved):
        ctx.notes.append(f"auto: width pruning reaches {saved / ctx.block_params:.2%} of block parameters, "
                         f"short of the {ctx.target:.2%} target; ran hybrid (width pruning and branch "
                         "replacement)")
        return _ran(hybrid(dataclasses.replace(ctx, options=HybridOptions())))
    units = "FFN channel blocks" + (" and key/value groups" if len(sites) > len(ffn) else "")
    if opts.heads is False:
        units += f"; attention stays whole up to {HEADS_ABOVE:.0%} sparsity"
    ctx.notes.append(f"auto: ran saap (width pruning of {units}, allocated across layers by the output's "
                     "sensitivity)")
    return _ran(recipe)


def _why(ffn: list[str], missing: list[str]) -> str:
    if not ffn:
        return "the model has no FFN branches"
    return f"{len(missing)} of {len(ffn)} FFN branches expose no prunable channels, e.g. {missing[0]}"


def _ran(recipe: Recipe) -> Recipe:
    recipe.options = {**recipe.options, "auto": True}
    return recipe
