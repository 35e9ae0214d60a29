"""Policies that turn calibration into a Recipe: SubFit and the baselines it is compared with.

Example:
    >>> "subfit" in METHODS
    True
"""

from __future__ import annotations

from collections.abc import Callable

from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.blockpruner import blockpruner
from subfit_fx.methods.llm_drop import llm_drop
from subfit_fx.methods.replaceme import replaceme
from subfit_fx.methods.shortgpt import shortgpt
from subfit_fx.methods.subfit import SubfitOptions, subfit, subfit_guarded
from subfit_fx.methods.uidl import uidl
from subfit_fx.recipe import Recipe

__all__ = ["METHODS", "PolicyContext", "SubfitOptions", "register_method"]

METHODS: dict[str, Callable[[PolicyContext], Recipe]] = {
    "subfit": subfit,
    "subfit-guarded": subfit_guarded,
    # baselines (METHOD.md): same calibration, same parameter budget
    "shortgpt": shortgpt,
    "uidl": uidl,
    "replaceme": replaceme,
    "llm-drop": llm_drop,
    "blockpruner": blockpruner,
}


def register_method(name: str, policy: Callable[[PolicyContext], Recipe]) -> None:
    """Add a policy under `name` (usable as `compress(..., method=name)` and `--method name`).

    Example:
        >>> register_method("my-policy", subfit); "my-policy" in METHODS
        True
    """
    METHODS[name] = policy
