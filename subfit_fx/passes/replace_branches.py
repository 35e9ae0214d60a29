"""Rewrite pass: apply a Recipe to a GraphModule (the `PassBase` face of `subfit_fx.rewrite`).

Example:
    >>> from subfit_fx import capture, find_branches
    >>> from subfit_fx.recipe import Recipe, Replacement, branch_records
    >>> from subfit_fx.zoo import tiny_model
    >>> ep = capture(tiny_model("llama"))
    >>> recipe = Recipe("manual", branch_records(find_branches(ep)), [Replacement(("model.layers.1.mlp",), "remove")])
    >>> ReplaceBranchesPass(recipe)(ep.module()).modified
    True
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from subfit_fx.recipe import Recipe
from subfit_fx.rewrite import apply_recipe_to_module

__all__ = ["ReplaceBranchesPass"]


class ReplaceBranchesPass(PassBase):
    """Rewrite pass (`PassBase`): apply a Recipe to a GraphModule such as `ep.module()`.

    Bypass weights become parameters of the module; dead code and unused parameters go. Runs in
    `torch.fx.passes.infra.pass_manager.PassManager` next to anyone's passes.

    Example:
        >>> gm = ReplaceBranchesPass(recipe)(ep.module()).graph_module  # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe, check: bool = True) -> None:
        super().__init__()
        self.recipe, self.check = recipe, check

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        apply_recipe_to_module(graph_module, self.recipe, check=self.check)
        return PassResult(graph_module, True)
