"""LLM-Drop (He et al., 2024, "What Matters in Transformers?"): remove attention and FFN
branches (no bypass) ranked jointly by importance 1 - cos(x, stream after the branch).

Example:
    >>> import torch
    >>> from subfit_fx import compress
    >>> from subfit_fx.zoo import tiny_model
    >>> c = compress(tiny_model("llama", layers=4), torch.randint(3, 128, (4, 16)), 0.25, method="llm-drop",
    ...              progress=False)
    >>> {r.action for r in c.recipe.replacements}
    {'remove'}
"""

from __future__ import annotations

from dataclasses import asdict

from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.layers import BaselineOptions, layer_recipe, stream_statistics
from subfit_fx.recipe import Recipe, Replacement
from subfit_fx.selection import Candidate, select

__all__ = ["llm_drop"]


def llm_drop(ctx: PolicyContext) -> Recipe:
    """The LLM-Drop policy: single-branch "remove" Replacements, greedy by importance per
    parameter until the net block sparsity reaches the target (overshoot below one branch).

    The output stream is the one the rewrite replaces (x + y, or its LayerNorm for post-LN
    models), averaged over all non-padding calibration tokens.

    Example:
        >>> recipe = llm_drop(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(BaselineOptions)
    stats = stream_statistics(ctx.session, ctx.batches, (), desc="llm-drop: importance")
    importance = {}
    for b in ctx.branches:
        importance[b.label] = 1.0 - stats.cos(("branch", b.label))
        ctx.record_score(b.label, "llm_drop_importance", importance[b.label])
    picks = select([Candidate(b.label, importance[b.label], b.params, 0) for b in ctx.branches],
                   ctx.block_params, ctx.target)
    replacements = [Replacement((label,), "remove", "remove", info={"importance": importance[label]})
                    for label in picks]
    return layer_recipe("llm-drop", ctx.branches, replacements, options={"sparsity": ctx.target, **asdict(opts)})

