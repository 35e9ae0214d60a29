"""ReplaceMe, LSTSQ variant (Shopkhoev et al., 2025): pick the contiguous block of n layers with
the smallest angular distance between its input and output (as UIDL), and replace it by ONE
linear map fitted in closed form. Residual form: stream_out ≈ x + (W x + b), x the stream
entering the block; the original folds the map into the previous MLP's down projection, we keep
it as a bypass node (same function, d*d + d parameters, counted in the budget).

Example:
    >>> import torch
    >>> from subfit_fx import compress
    >>> from subfit_fx.zoo import tiny_model
    >>> c = compress(tiny_model("llama", layers=4), torch.randint(3, 128, (4, 16)), 0.25, method="replaceme",
    ...              progress=False)
    >>> r = c.recipe.replacements[0]; (r.action, r.form, r.input, len(r.labels))
    ('bypass', 'linear', 'stream', 4)
"""

from __future__ import annotations

from dataclasses import asdict

from subfit_fx.calibrate import Session
from subfit_fx.data import Batch
from subfit_fx.fit import Fit, ridge
from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.layers import (
    BaselineOptions,
    Layer,
    group_layers,
    layer_recipe,
    record_stream_after,
    require_sequential,
    smallest_span,
    span_replacement,
)
from subfit_fx.methods.uidl import choose_block
from subfit_fx.recipe import Recipe

__all__ = ["fit_block", "replaceme"]


def fit_block(session: Session, batches: list[Batch], block: list[Layer], lam: float = 1e-3,
              ) -> tuple[Fit, float]:
    """Least-squares (ridge) map from the stream entering `block` to (stream leaving it - stream
    entering it), from the session's usual statistics; returns the fit and the energy of the
    target (the error of plain removal), both over the calibration tokens.

    Two passes: one records the block's output per batch, one accumulates the Gram matrix of the
    block input (the first branch's stream x) against that target.

    Example:
        >>> fit, removal_error = fit_block(session, batches, layers[1:3])  # doctest: +SKIP
    """
    first, last = block[0].labels[0], block[-1].labels[-1]
    outputs = iter(record_stream_after(session, batches, last, desc="replaceme: block outputs"))
    stats = session.calibrate(batches, [first], ("stream",), desc="replaceme: fit statistics",
                              targets={first: lambda x, _y: next(outputs) - x})[first]
    return ridge(stats.gram["stream"], stats.cross["stream"], stats.scalars["y_sq"], lam), float(stats.scalars["y_sq"])


def replaceme(ctx: PolicyContext) -> Recipe:
    """The ReplaceMe policy: one span Replacement ("bypass", form "linear", input "stream").

    n is the fewest contiguous layers whose parameters, net of the map's d*d + d, reach the
    budget (so often one more layer than UIDL). Distances over `distance_tokens` ("last" by
    default, as ReplaceMe's code); the fit always uses every non-padding token.

    Example:
        >>> recipe = replaceme(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(BaselineOptions)
    layers = group_layers(ctx.branches)
    require_sequential(ctx.session, layers)
    width = ctx.branches[0].width
    n, starts = smallest_span(layers, ctx.block_params, ctx.target, cost=width * width + width)
    start, stats = choose_block(ctx, layers, n, starts, opts.distance_tokens, "replaceme")
    block = layers[start:start + n]
    fit, removal_error = fit_block(ctx.session, ctx.batches, block, opts.ridge)
    (weight, bias), = fit.layers
    relative = fit.error / max(removal_error, 1e-30)
    for layer in block:
        for label in layer.labels:
            ctx.record_score(label, "fit_error_relative", relative)
    distance = stats.angle(("span", start, n), opts.distance_tokens)
    ctx.notes.append(f"replaceme: layers {block[0].index}-{block[-1].index} (n={n}) replaced by one linear map "
                     f"({fit.params:,} parameters); fit error {relative:.4f} of removal's")
    info = {"angular_distance": distance, "fit_error": fit.error, "removal_error": removal_error,
            "ridge": fit.ridge, "params": fit.params}
    replacement = span_replacement(block, "bypass", form="linear", weights=[("r0.0.weight", "r0.0.bias")],
                                   info=info)
    return layer_recipe("replaceme", ctx.branches, [replacement], {"r0.0.weight": weight, "r0.0.bias": bias},
                        options={"sparsity": ctx.target, **asdict(opts)})

