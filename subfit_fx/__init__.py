"""subfit_fx: submodule-level transformer compression by graph surgery (SubFit)."""

from __future__ import annotations

from subfit_fx.branches import Branch, find_branches
from subfit_fx.calibrate import prepare
from subfit_fx.capture import capture, load_model
from subfit_fx.compress import CalibrationConfig, Compressed, compress, load
from subfit_fx.errors import SubfitError
from subfit_fx.recipe import Recipe, Replacement
from subfit_fx.report import Report
from subfit_fx.rewrite import apply_recipe

__all__ = [
    "Branch", "CalibrationConfig", "Compressed", "Recipe", "Replacement", "Report", "SubfitError", "apply_recipe",
    "capture", "compress", "find_branches", "load", "load_model", "prepare",
]
__version__ = "0.1.0"
