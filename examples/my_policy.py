"""A new policy in one file (docs/architecture.md): remove the branches whose removal hurts the
output least, judged one at a time on the calibration data.

Run:  python examples/my_policy.py   (a tiny random Llama; seconds)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subfit_fx import compress
from subfit_fx.calibrate import REMOVE
from subfit_fx.errors import InputError
from subfit_fx.methods import PolicyContext, register_method
from subfit_fx.methods.base import OutputJudge
from subfit_fx.methods.layers import layer_recipe
from subfit_fx.recipe import Replacement
from subfit_fx.selection import Candidate, select
from subfit_fx.zoo import tiny_model


@dataclass(frozen=True)
class GreedyOptions:
    """Options are a frozen dataclass that validates itself; unknown keys fail in compress()."""

    sequences: int = 4  # calibration sequences the judge runs

    def __post_init__(self) -> None:
        if self.sequences < 1:
            raise InputError(f"sequences={self.sequences} must be >= 1")


def greedy_removal(ctx: PolicyContext) -> object:
    """Judge every branch's removal alone at the output, then remove the least harmful to budget."""
    opts = ctx.options_as(GreedyOptions)
    held = [(ids[: opts.sequences], mask[: opts.sequences]) for ids, mask in ctx.batches[:1]]
    judge = OutputJudge(ctx.session, held, ctx.causal)  # asks the session; never touches probes
    pool = [Candidate(b.label, judge.of({b.label: REMOVE}), b.params, 0) for b in ctx.branches]
    picks = select(pool, ctx.block_params, ctx.target)
    replacements = [Replacement((label,), "remove") for label in picks]
    return layer_recipe("greedy-removal", ctx.branches, replacements, options={"sparsity": ctx.target})


register_method("greedy-removal", greedy_removal, GreedyOptions)

if __name__ == "__main__":
    calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    c = compress(tiny_model("llama", layers=4), calib, 0.25, "greedy-removal", progress=False, sequences=2)
    print(c.report.method, f"{c.report.sparsity_actual:.1%}", c.recipe.replaced_labels())
