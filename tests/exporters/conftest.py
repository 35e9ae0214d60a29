"""Shared fixtures of the exporter tests: tiny models exported once per module."""

from __future__ import annotations

import torch

from subfit_fx import capture, find_branches
from subfit_fx.recipe import Recipe, Replacement, branch_records


def manual_recipe(model: torch.nn.Module, remove: list[str], bypass: list[str] = ()) -> Recipe:
    """A hand-made recipe: `remove` branches, and `bypass` branches with a small random linear map."""
    branches = find_branches(capture(model))
    width = branches[0].width
    gen = torch.Generator().manual_seed(0)
    tensors, replacements = {}, [Replacement((label,), "remove") for label in remove]
    for i, label in enumerate(bypass):
        tensors[f"w{i}"] = torch.randn(width, width, generator=gen) * 0.05
        replacements.append(Replacement((label,), "bypass", "linear", "normalized", [(f"w{i}", None)]))
    return Recipe("manual", branch_records(branches), replacements, tensors)
