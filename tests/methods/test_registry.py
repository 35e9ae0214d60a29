"""The method registry: strict, self-validating options; unknown keys name the nearest valid one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from subfit_fx import compress
from subfit_fx.errors import InputError
from subfit_fx.methods import METHODS, Method, NoOptions, method_options, register_method
from subfit_fx.methods.subfit import GuardedOptions, SubfitOptions
from subfit_fx.zoo import tiny_model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_options_class_is_frozen_and_builds_with_defaults(name):
    opts = method_options(name, {})
    assert dataclasses.is_dataclass(opts)
    if dataclasses.fields(opts):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(opts, dataclasses.fields(opts)[0].name, None)


def test_misspelt_key_names_the_nearest():
    with pytest.raises(InputError, match="unknown option 'atention_rank' for subfit; did you mean 'attention_rank'"):
        method_options("subfit", {"atention_rank": 8})
    with pytest.raises(InputError, match="belongs to blockpruner"):
        method_options("subfit", {"eval_batches": 2})
    with pytest.raises(InputError, match="must be a positive integer"):
        method_options("subfit", {"rounds": 0})


def test_compress_rejects_a_typo_before_any_work():
    calib = torch.randint(3, 128, (4, 8))
    with pytest.raises(InputError, match="did you mean 'distance_tokens'"):
        compress(tiny_model("llama"), calib, 0.25, "uidl", progress=False, distance_token="all")


@pytest.mark.parametrize("value", ["False", "true", 0, None])
def test_a_flag_option_takes_only_a_bool(value):
    """'False' from a config file or a benchmark spec is truthy; it must not silently mean True."""
    with pytest.raises(InputError, match="option 'replace' for hybrid must be True or False"):
        method_options("hybrid", {"replace": value})
    assert method_options("hybrid", {"replace": False}).replace is False


def test_cli_no_replace_reaches_the_hybrid_options():
    from subfit_fx.cli import build_parser, method_options_from_args

    args = build_parser().parse_args(["compress", "builtin:llama", "--calib", "unused", "--method", "hybrid",
                                      "--no-replace", "--out", "unused"])
    assert method_options("hybrid", method_options_from_args(args)).replace is False


def test_guarded_preset_defaults_and_calibration_holdout():
    assert method_options("subfit-guarded", {}) == GuardedOptions()
    assert GuardedOptions().judge == "statistics" and GuardedOptions().holdout == 0.25
    # the calibration's holdout reaches classes that declare it, and only them
    assert method_options("subfit", {"judge": "statistics", "score": "holdout"}, holdout=0.5).holdout == 0.5
    assert method_options("shortgpt", {}, holdout=0.5) == method_options("shortgpt", {})


def test_registered_policy_without_options(monkeypatch):
    monkeypatch.setitem(METHODS, "mine", METHODS["llm-drop"])
    register_method("mine", METHODS["llm-drop"].policy)
    assert METHODS["mine"] == Method(METHODS["llm-drop"].policy, NoOptions)
    with pytest.raises(InputError, match="option 'ridge' is not one of mine's"):
        method_options("mine", {"ridge": 0.1})
    assert isinstance(method_options("subfit", {}), SubfitOptions)
