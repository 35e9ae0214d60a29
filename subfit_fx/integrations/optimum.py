"""Adapter to optimum's torch.fx `Transformation` interface (needs `pip install subfit-fx[optimum]`).

`SubfitTransformation` applies a subfit_fx `Recipe` - or the recipe of a saved compressed
directory, or of a `Compressed` - to a GraphModule through `ReplaceBranchesPass`, so a
compression step can sit in an optimum pipeline (`optimum.fx.optimization.compose`) next to
optimum's own transformations.

The GraphModule must be a `torch.export` capture such as `subfit_fx.capture(model).module()`:
the recipe names branches found in aten-level graphs. A graph from `transformers.utils.fx.symbolic_trace`
has other nodes, and the recipe check rejects it (`RecipeMismatchError`) before any change.

Importing this module without optimum raises `ImportError` naming the extra to install;
`subfit_fx` itself never imports optimum.

Example:
    >>> from subfit_fx import capture, find_branches
    >>> from subfit_fx.recipe import Recipe, Replacement, branch_records
    >>> from subfit_fx.zoo import tiny_model
    >>> ep = capture(tiny_model("llama"))
    >>> recipe = Recipe("manual", branch_records(find_branches(ep)), [Replacement(("model.layers.1.mlp",), "remove")])
    >>> gm = SubfitTransformation(recipe)(ep.module())
    >>> SubfitTransformation(recipe).preserves_computation
    False
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from torch import fx

try:
    from optimum.fx.optimization import Transformation
except ImportError as _exc:
    # Two different fixes, so two messages: optimum absent, or present but not importable
    # (typically an optimum release that does not match the installed transformers).
    if importlib.util.find_spec("optimum") is None:
        _why = "optimum is not installed"
    else:
        _why = f"optimum is installed but optimum.fx.optimization cannot be imported ({_exc})"
    raise ImportError(f"subfit_fx.integrations.optimum needs optimum's torch.fx transformations: {_why}; "
                      "install them with: pip install subfit-fx[optimum]", name="optimum") from _exc

from subfit_fx.errors import InputError
from subfit_fx.passes.replace_branches import ReplaceBranchesPass
from subfit_fx.recipe import Recipe

__all__ = ["SubfitTransformation"]


def _as_recipe(source: Any) -> Recipe:
    if isinstance(source, Recipe):
        return source
    if isinstance(source, str | Path):
        return Recipe.load(Path(source))  # a directory written by `subfit-fx compress` / Compressed.save
    recipe = getattr(source, "recipe", None)  # a Compressed, without importing compress (and torch.export) here
    if isinstance(recipe, Recipe):
        return recipe
    raise InputError(f"SubfitTransformation takes a Recipe, a compressed directory or a Compressed, "
                     f"not {type(source).__name__}")


class SubfitTransformation(Transformation):
    """An optimum `Transformation` that replaces residual branches as a subfit_fx recipe says.

    `source`: a `Recipe`, a compressed directory (as `Compressed.save` writes it) or a
    `Compressed`. `check` verifies the recipe against the graph's branches before any mutation
    (a mismatch raises `RecipeMismatchError` and leaves the module untouched). Like optimum's own
    transformations it mutates and returns the module it is given. The nodes it adds are marked
    as transformed (`get_transformed_nodes`). It does not preserve the computation: replaced
    branches are approximated, not reproduced.

    Example:
        >>> gm = SubfitTransformation("out/llama-25")(subfit_fx.capture(model).module())  # doctest: +SKIP
        >>> from optimum.fx.optimization import compose  # doctest: +SKIP
        >>> gm = compose(SubfitTransformation(recipe), MyTransformation())(gm)  # doctest: +SKIP
    """

    preserves_computation = False

    def __init__(self, source: Recipe | str | Path | Any, check: bool = True) -> None:
        self.recipe = _as_recipe(source)
        self.check = check

    @property
    def signature(self) -> int:
        """A hash identifying this transformation: its recipe's content (JSON part) and `check`.

        optimum's default hashes every attribute, which fails on a (mutable, unhashable) Recipe.

        Example:
            >>> from subfit_fx.recipe import Recipe
            >>> a, b = SubfitTransformation(Recipe("m", [], [])), SubfitTransformation(Recipe("m", [], []))
            >>> a.signature == b.signature
            True
        """
        text = json.dumps(self.recipe.to_json(), sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return hash((type(self).__name__, digest, self.check))

    def transform(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        """Apply the recipe to `graph_module` (in place) and return it.

        Example:
            >>> gm = SubfitTransformation(recipe).transform(ep.module())  # doctest: +SKIP
        """
        before = set(graph_module.graph.nodes)
        graph_module = ReplaceBranchesPass(self.recipe, check=self.check)(graph_module).graph_module
        for node in graph_module.graph.nodes:
            if node not in before:
                self.mark_as_transformed(node)
        return graph_module
