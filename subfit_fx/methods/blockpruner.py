"""BlockPruner (Zhong et al., 2024): iterative greedy removal of attention / FFN branches; each
step removes the branch whose removal (given those already removed) raises the calibration loss
least, until the parameter budget is met.

The loss is `heldout_loss`: next-token NLL (log-perplexity) for causal LMs, output MSE relative
to the dense output for encoders. It is measured on the held-out calibration part when there is
one, else on the calibration batches (at most `eval_batches` of them).

Example:
    >>> import torch
    >>> from subfit_fx import compress
    >>> from subfit_fx.zoo import tiny_model
    >>> c = compress(tiny_model("llama", layers=4), torch.randint(3, 128, (4, 16)), 0.25, method="blockpruner",
    ...              progress=False)
    >>> {r.action for r in c.recipe.replacements}
    {'remove'}
"""

from __future__ import annotations

from dataclasses import asdict

from tqdm.auto import tqdm

from subfit_fx.calibrate import REMOVE
from subfit_fx.methods.base import PolicyContext, dense_reference, heldout_loss
from subfit_fx.methods.layers import BaselineOptions, layer_recipe
from subfit_fx.recipe import Recipe, Replacement

__all__ = ["blockpruner"]


def blockpruner(ctx: PolicyContext) -> Recipe:
    """The BlockPruner policy: single-branch "remove" Replacements chosen one at a time by their
    effect on the loss (overshoot below one branch). Costs one evaluation per remaining branch
    per step.

    Example:
        >>> recipe = blockpruner(ctx)  # doctest: +SKIP
    """
    opts = ctx.options_as(BaselineOptions)
    session = ctx.session
    batches = (ctx.holdout or ctx.batches)[: opts.eval_batches]
    reference = None if ctx.causal else dense_reference(session, batches)

    def loss() -> float:
        return heldout_loss(session, batches, ctx.causal, reference)

    session.clear_replacements()
    base = loss()
    removed: list[str] = []
    losses: dict[str, float] = {}
    remaining = [b for b in ctx.branches if b.params > 0]
    try:
        while remaining and sum(session.by_label[r].params for r in removed) / ctx.block_params < ctx.target:
            step = len(removed)
            trial: dict[str, float] = {}
            bar = tqdm(remaining, desc=f"blockpruner: step {step + 1}", leave=False, unit="branch",
                       disable=not session.progress)
            for b in bar:
                session.set_replacement(b.label, REMOVE)
                trial[b.label] = loss()
                session.set_replacement(b.label, None)
                if step == 0:
                    ctx.record_score(b.label, "blockpruner_loss_increase_alone", trial[b.label] - base)
            best = min(remaining, key=lambda b: trial[b.label])  # ties: the earlier branch
            session.set_replacement(best.label, REMOVE)
            removed.append(best.label)
            losses[best.label] = trial[best.label]
            remaining.remove(best)
            ctx.record_score(best.label, "blockpruner_step", step + 1)
            ctx.record_score(best.label, "blockpruner_loss_after", trial[best.label])
    finally:
        session.clear_replacements()
    kind = "log-perplexity" if ctx.causal else "relative output MSE"
    ctx.notes.append(f"blockpruner: {len(removed)} branches removed; calibration {kind} {base:.4f} -> "
                     f"{losses[removed[-1]] if removed else base:.4f}")
    replacements = [Replacement((label,), "remove", "remove", info={"step": i + 1, "loss_after": losses[label]})
                    for i, label in enumerate(removed)]
    return layer_recipe("blockpruner", ctx.branches, replacements, options={"sparsity": ctx.target, **asdict(opts)})
