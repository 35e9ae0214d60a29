"""The hybrid policy: SubFit replaces whole branches, SAAP-style width pruning slims the FFN
branches that stay, under one parameter budget (issue 18).

SubFit (default options, judged at the output) takes `share` of the budget first; its
replacements are then set in the session, so the inner statistics of the remaining FFN branches
are gathered on the compressed upstream, and width pruning takes the rest of the budget (net of
what SubFit actually saved) from the branches SubFit kept. Redundancy spread thinly inside a
branch, which SubFit cannot take, is what width pruning takes.

Cost: SubFit's (see `subfit_fx.methods.subfit`) plus one calibration pass for the inner
statistics.

Example:
    >>> HybridOptions(share=0.25).share
    0.25
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from subfit_fx.errors import InputError
from subfit_fx.fit import Fit
from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.saap import SaapOptions, plan_slimming, slim_replacements
from subfit_fx.methods.subfit import SubfitOptions, subfit
from subfit_fx.recipe import Recipe, branch_records

__all__ = ["HybridOptions", "hybrid", "set_recipe_replacements"]


@dataclass(frozen=True)
class HybridOptions:
    """Options of the hybrid policy: the budget share of SubFit, and width pruning's options."""

    share: float = 0.5  # fraction of the budget that SubFit's branch replacements take
    block: int = 64
    importance: str = "fused"
    compensation: str = "refit"
    fluctuation: bool = True
    max_layer_ratio: float = 0.75

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise InputError(f"share must be in [0, 1] (the fraction of the budget SubFit takes), got {self.share}")
        self.saap()  # validates the width-pruning options

    def saap(self) -> SaapOptions:
        """The width-pruning options.

        Example:
            >>> HybridOptions(block=32).saap().block
            32
        """
        return SaapOptions(block=self.block, importance=self.importance, compensation=self.compensation,
                           fluctuation=self.fluctuation, max_layer_ratio=self.max_layer_ratio)


def set_recipe_replacements(ctx: PolicyContext, recipe: Recipe) -> None:
    """Make the session run with `recipe`'s single-branch replacements (removals and bypasses).

    Example:
        >>> set_recipe_replacements(ctx, recipe)  # doctest: +SKIP
    """
    for r in recipe.replacements:
        if r.is_span() or r.action == "slim":
            raise ValueError("only single-branch removals and bypasses can be set in a session")
        if r.action == "remove":
            ctx.session.set_replacement(r.labels[0], "remove")
            continue
        layers = [(recipe.tensors[w], recipe.tensors[b] if b else None) for w, b in r.layers]
        ctx.session.set_replacement(r.labels[0], Fit(r.form, layers, 0.0, 0), r.input)


def saved_params(ctx: PolicyContext, recipe: Recipe) -> int:
    """Block parameters `recipe` saves, net of what its bypasses add and keep in use."""
    replaced = sum(ctx.session.by_label[label].params for label in recipe.replaced_labels())
    return replaced - recipe.bypass_params() - recipe.kept_params(ctx.branches)


def hybrid(ctx: PolicyContext) -> Recipe:
    """SubFit for `share` of the budget, width pruning of the kept FFN branches for the rest.

    Example:
        >>> recipe = hybrid(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(HybridOptions)
    budget = round(ctx.target * ctx.block_params)
    first = Recipe("subfit", [], [])
    if opts.share > 0:
        first = subfit(dataclasses.replace(ctx, target=ctx.target * opts.share, options=SubfitOptions()))
    ctx.session.clear_replacements()
    set_recipe_replacements(ctx, first)
    replaced = set(first.replaced_labels())
    labels = [label for label in ctx.session.channel_sites if label not in replaced]
    rest = budget - saved_params(ctx, first) if first.replacements else budget
    slimmings, saved = plan_slimming(ctx, opts.saap(), max(rest, 0), labels)
    ctx.session.clear_replacements()
    if saved < rest:
        ctx.notes.append(f"width pruning could take only {saved:,} of the {rest:,} parameters left after SubFit "
                         f"(max_layer_ratio={opts.max_layer_ratio}); the budget is missed by the difference")
    replacements, tensors = slim_replacements(ctx, slimmings, prefix="s")
    order = {b.label: i for i, b in enumerate(ctx.branches)}
    merged = sorted([*first.replacements, *replacements], key=lambda r: order[r.labels[0]])
    return Recipe("hybrid", branch_records(ctx.branches), merged, {**first.tensors, **tensors},
                  options={**first.options, **asdict(opts)})
