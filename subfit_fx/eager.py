"""Width pruning applied to an eager transformers model, module by module.

The rewrite (`subfit_fx.rewrite`) narrows branches inside a captured graph; some captures need the
narrowing done before they are taken: the KV-cache capture keeps each layer's cache as an input
and output, so a layer whose key/value groups are pruned must have its narrower cache from the
start. `slim_modules` swaps the projections a slim replacement names (`info["modules"]`) for
narrower `nn.Linear`s holding the recipe's tensors and, for attention, scales the head counts the
module reads in forward (`hf_modeling.narrow_heads`): the same narrowing transformers performs when
it loads a compressed directory.

Example:
    >>> from subfit_fx.recipe import Recipe
    >>> from subfit_fx.zoo import tiny_model
    >>> model, rest = slim_modules(tiny_model("llama"), Recipe("m", [], []))
    >>> rest.replacements
    []
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from subfit_fx.errors import RecipeMismatchError
from subfit_fx.hf_modeling import narrow_heads
from subfit_fx.recipe import Recipe

__all__ = ["slim_modules"]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    dtype, device = like.weight.dtype, like.weight.device
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(like.weight.requires_grad)


@torch.no_grad()
def slim_modules(model: nn.Module, recipe: Recipe,
                 kinds: tuple[str, ...] = ("attention", "ffn")) -> tuple[nn.Module, Recipe]:
    """A copy of `model` with the recipe's slim replacements of branch kinds `kinds` applied at the
    module level, and the recipe of what is left to apply (to a capture of the copy).

    Module paths are relative to the transformers model (as `info["modules"]` records them); `model`
    itself is not changed. Raises `RecipeMismatchError` when a named module is not an `nn.Linear`
    of the model.

    Example:
        >>> slimmed, rest = slim_modules(model, recipe, kinds=("attention",))  # doctest: +SKIP
    """
    todo = [r for r in recipe.replacements
            if r.action == "slim" and r.info.get("kind", "ffn") in kinds]
    if not todo:
        return model, recipe
    model = copy.deepcopy(model)
    for r in todo:
        modules = r.info.get("modules") or []
        pairs = [*r.producers, *r.layers]
        if len(modules) != len(pairs):
            raise RecipeMismatchError(f"slim replacement of '{r.labels[0]}' names {len(modules)} modules for "
                                      f"{len(pairs)} weights; re-create the recipe with this version")
        for path, (w_key, b_key) in zip(modules, pairs):
            try:
                old = model.get_submodule(path)
            except AttributeError:
                old = None
            if not isinstance(old, nn.Linear):
                raise RecipeMismatchError(f"'{path}' of '{r.labels[0]}' is not a linear layer of this model; "
                                          "apply the recipe to the model it was made for")
            new = _linear(recipe.tensors[w_key], recipe.tensors[b_key] if b_key else None, old)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, new)
        if r.info.get("kind") == "attention":
            narrow_heads(model.get_submodule(modules[0].rpartition(".")[0]),
                         r.info["groups"], r.info["kept_groups"])
    rest = [r for r in recipe.replacements if r not in todo]
    return model, dataclasses.replace(recipe, replacements=rest)
