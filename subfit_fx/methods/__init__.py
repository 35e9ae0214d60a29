"""Policies that turn calibration into a Recipe: SubFit and the baselines it is compared with.

The registry maps a method name to its policy and its options class (a frozen dataclass that
validates itself); `method_options` builds the options strictly, so a misspelt key is an error
naming the nearest valid one rather than silently ignored.

Example:
    >>> "subfit" in METHODS
    True
    >>> method_options("subfit", {"rounds": 2}).rounds
    2
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from subfit_fx.errors import InputError
from subfit_fx.methods.auto import auto
from subfit_fx.methods.base import NoOptions, PolicyContext, build_options
from subfit_fx.methods.blockpruner import blockpruner
from subfit_fx.methods.hybrid import HybridOptions, hybrid
from subfit_fx.methods.layers import BaselineOptions
from subfit_fx.methods.llm_drop import llm_drop
from subfit_fx.methods.replaceme import replaceme
from subfit_fx.methods.saap import FlapOptions, SaapOptions, flap, saap
from subfit_fx.methods.shortgpt import shortgpt
from subfit_fx.methods.subfit import GuardedOptions, SubfitOptions, subfit, subfit_guarded
from subfit_fx.methods.uidl import uidl
from subfit_fx.recipe import Recipe

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "NoOptions", "PolicyContext", "SubfitOptions", "check_method",
           "check_offloadable", "method_options", "option_names", "register_method"]


@dataclass(frozen=True)
class Method:
    """A registered policy and the class of its options. `offloadable(options)`: whether the
    policy with these options needs only per-branch statistics (so runs with weight offload,
    `subfit_fx.offload`) rather than whole forwards of the model."""

    policy: Callable[[PolicyContext], Recipe]
    options: type = NoOptions
    offloadable: Callable[[Any], bool] = lambda _options: False


def _statistics_judge(options: SubfitOptions) -> bool:
    return options.judge == "statistics"


# What `compress` and `subfit-fx compress` run without --method (docs/width.md, "The default method")
DEFAULT_METHOD = "auto"

METHODS: dict[str, Method] = {
    "auto": Method(auto, NoOptions),  # the default: saap where width pruning applies, else subfit / hybrid
    "subfit": Method(subfit, SubfitOptions, _statistics_judge),
    "subfit-guarded": Method(subfit_guarded, GuardedOptions),
    "saap": Method(saap, SaapOptions),  # width pruning of FFN channels (issue 18)
    "hybrid": Method(hybrid, HybridOptions),  # SubFit + width pruning under one budget
    "flap": Method(flap, FlapOptions),  # the FLAP width-pruning baseline
    # baselines (METHOD.md): same calibration, same parameter budget
    "shortgpt": Method(shortgpt, BaselineOptions),
    "uidl": Method(uidl, BaselineOptions),
    "replaceme": Method(replaceme, BaselineOptions),
    "llm-drop": Method(llm_drop, BaselineOptions, lambda _options: True),
    "blockpruner": Method(blockpruner, BaselineOptions),
}


def register_method(name: str, policy: Callable[[PolicyContext], Recipe], options: type = NoOptions) -> None:
    """Add a policy under `name` (usable as `compress(..., method=name)` and `--method name`);
    `options` is its frozen options dataclass (default: none).

    Example:
        >>> register_method("my-policy", subfit, SubfitOptions); "my-policy" in METHODS
        True
        >>> del METHODS["my-policy"]  # the registry is global: leave it as it was
    """
    METHODS[name] = Method(policy, options)


def check_offloadable(method: str, options: Any) -> None:
    """Raise an `InputError` unless `method` with `options` needs only per-branch statistics
    (weight offload keeps the model on disk; whole forwards would need all of it).

    Example:
        >>> check_offloadable("subfit", method_options("subfit", {}))
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: method 'subfit' with these options runs the whole model, ...
    """
    if not check_method(method).offloadable(options):
        raise InputError(f"method {method!r} with these options runs the whole model, which weight offload keeps on "
                         "disk; use one that needs only statistics (subfit --judge statistics, llm-drop) or leave "
                         "--offload-weights out")


def check_method(name: str) -> Method:
    """The registered method `name`, or an error naming the nearest one.

    Example:
        >>> check_method("shortgtp")
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: unknown method 'shortgtp'; did you mean 'shortgpt'? ...
    """
    if name in METHODS:
        return METHODS[name]
    near = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise InputError(f"unknown method {name!r}; {hint}(choose one of {', '.join(sorted(METHODS))})")


def method_options(method: str, values: Mapping[str, Any], **calibration: Any) -> Any:
    """Build `method`'s options from `values` strictly; `calibration` settings (e.g. holdout) are
    passed on only to options classes that declare them.

    Example:
        >>> method_options("shortgpt", {"distance_tokens": "all"}).distance_tokens
        'all'
        >>> method_options("shortgpt", {"rounds": 2})
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: option 'rounds' is not one of shortgpt's; it belongs to hybrid, subfit, ...
    """
    spec = check_method(method)
    own = {f.name for f in fields(spec.options)}
    for key in values:
        if key not in own and key in option_names():
            owners = sorted(name for name, m in METHODS.items() if key in {f.name for f in fields(m.options)})
            fix = (f"{method} takes: {', '.join(sorted(own))}" if own
                   else f"{method} takes none: name the method, e.g. method={owners[0]!r} / --method {owners[0]}")
            raise InputError(f"option '{key}' is not one of {method}'s; it belongs to {', '.join(owners)} ({fix})")
    extra = {k: v for k, v in calibration.items() if k in own and k not in values}
    return build_options(spec.options, {**values, **extra}, method)


def option_names() -> set[str]:
    """Every option name of every registered method (the CLI's method flags).

    Example:
        >>> {"attention_rank", "distance_tokens"} <= option_names()
        True
    """
    return {f.name for m in METHODS.values() for f in fields(m.options)}
