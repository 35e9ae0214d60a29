"""ShortGPT (Men et al., 2024): remove whole layers with the lowest Block Influence,
BI = 1 - mean cos(layer input, layer output), in one shot, at any depth.

Example:
    >>> import torch
    >>> from subfit_fx import compress
    >>> from subfit_fx.zoo import tiny_model
    >>> c = compress(tiny_model("llama", layers=4), torch.randint(3, 128, (4, 16)), 0.25, method="shortgpt",
    ...              progress=False)
    >>> [r.action for r in c.recipe.replacements]
    ['remove']
"""

from __future__ import annotations

from dataclasses import asdict

from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.layers import (
    BaselineOptions,
    group_layers,
    layer_recipe,
    require_sequential,
    span_replacement,
    stream_statistics,
)
from subfit_fx.recipe import Recipe
from subfit_fx.selection import Candidate, select

__all__ = ["shortgpt"]


def shortgpt(ctx: PolicyContext) -> Recipe:
    """The ShortGPT policy: span Replacements ("remove") of the removed layers, one per run of
    adjacent removed layers.

    BI is averaged over all non-padding calibration tokens (as in the paper). Layers are taken in
    order of BI per parameter until the net block sparsity reaches the target (for equal-sized
    layers that is plain BI order), so the overshoot is less than one layer.

    Example:
        >>> recipe = shortgpt(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(BaselineOptions)
    layers = group_layers(ctx.branches)
    require_sequential(ctx.session, layers)
    stats = stream_statistics(ctx.session, ctx.batches, (1,), desc="shortgpt: block influence")
    influence = {}
    for k, layer in enumerate(layers):
        influence[k] = 1.0 - stats.cos(("span", k, 1))
        for label in layer.labels:
            ctx.record_score(label, "layer_block_influence", influence[k])
    candidates = [Candidate(f"{k:06d}", influence[k], layer.params, 0) for k, layer in enumerate(layers)]
    picks = sorted(int(label) for label in select(candidates, ctx.block_params, ctx.target))
    ctx.notes.append(f"shortgpt: removed layers {[layers[k].index for k in picks]} by lowest block influence")
    # Removed neighbours form one span: the same function, and each span's input is then a stream
    # of the dense graph (a span starting at a node an earlier span replaced would revive it).
    runs: list[list[int]] = []
    for k in picks:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    replacements = [span_replacement([layers[k] for k in run],
                                     info={"block_influence": [influence[k] for k in run]}) for run in runs]
    return layer_recipe("shortgpt", ctx.branches, replacements,
                        options={"sparsity": ctx.target, **asdict(opts)})

