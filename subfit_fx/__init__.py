"""subfit_fx: submodule-level transformer compression by graph surgery (SubFit)."""

from __future__ import annotations

from subfit_fx.branches import Branch, find_branches
from subfit_fx.capture import capture, load_model
from subfit_fx.errors import SubfitError

__all__ = ["Branch", "SubfitError", "capture", "find_branches", "load_model"]
__version__ = "0.1.0"
