"""torch.fx passes (the `PassBase` contract) that make up the subfit_fx flow."""

from __future__ import annotations

from subfit_fx.passes.tag_branches import META_KEY, BranchTag, TagBranchesPass

__all__ = ["META_KEY", "BranchTag", "TagBranchesPass"]
