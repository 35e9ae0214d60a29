"""UIDL, "The Unreasonable Ineffectiveness of the Deeper Layers" (Gromov et al., 2024): remove
the n contiguous layers whose input and output streams have the smallest mean angular distance
arccos(cos) / pi; no healing.

Example:
    >>> import torch
    >>> from subfit_fx import compress
    >>> from subfit_fx.zoo import tiny_model
    >>> c = compress(tiny_model("llama", layers=4), torch.randint(3, 128, (4, 16)), 0.4, method="uidl",
    ...              progress=False)
    >>> len(c.recipe.replacements), len(c.recipe.replacements[0].labels)
    (1, 4)
"""

from __future__ import annotations

from dataclasses import asdict

from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.layers import (
    BaselineOptions,
    Layer,
    StreamStats,
    group_layers,
    layer_recipe,
    require_sequential,
    smallest_span,
    span_replacement,
    stream_statistics,
)
from subfit_fx.recipe import Recipe

__all__ = ["choose_block", "uidl"]


def choose_block(ctx: PolicyContext, layers: list[Layer], n: int, starts: list[int], mode: str,
                 method: str) -> tuple[int, StreamStats]:
    """Among spans of `n` layers starting at `starts`, the start with the smallest mean angular
    distance between the span's input and output streams over `mode` tokens; records the
    per-layer and per-span distances as scores.

    Example:
        >>> start, stats = choose_block(ctx, layers, 2, [0, 1, 2], "last", "uidl")  # doctest: +SKIP
    """
    stats = stream_statistics(ctx.session, ctx.batches, (1, n), desc=f"{method}: angular distances")
    for k, layer in enumerate(layers):
        for label in layer.labels:
            ctx.record_score(label, "layer_angular_distance", stats.angle(("span", k, 1), mode))
        if k in starts:
            ctx.record_score(layer.labels[0], f"span{n}_angular_distance", stats.angle(("span", k, n), mode))
    # ties go to the deeper block (the paper's observation: deeper layers are the redundant ones)
    start = min(starts, key=lambda k: (stats.angle(("span", k, n), mode), -k))
    return start, stats


def uidl(ctx: PolicyContext) -> Recipe:
    """The UIDL policy: one span Replacement ("remove") of the n contiguous layers, n the fewest
    layers reaching the budget (overshoot below one layer).

    The distance uses the last real token of each calibration sequence by default (the paper);
    `distance_tokens="all"` averages over every non-padding token instead.

    Example:
        >>> recipe = uidl(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(BaselineOptions)
    layers = group_layers(ctx.branches)
    require_sequential(ctx.session, layers)
    n, starts = smallest_span(layers, ctx.block_params, ctx.target)
    start, stats = choose_block(ctx, layers, n, starts, opts.distance_tokens, "uidl")
    block = layers[start:start + n]
    distance = stats.angle(("span", start, n), opts.distance_tokens)
    ctx.notes.append(f"uidl: removed layers {block[0].index}-{block[-1].index} (n={n}), angular distance "
                     f"{distance:.4f} over {opts.distance_tokens!r} tokens")
    replacement = span_replacement(block, info={"angular_distance": distance})
    return layer_recipe("uidl", ctx.branches, [replacement], options={"sparsity": ctx.target, **asdict(opts)})

