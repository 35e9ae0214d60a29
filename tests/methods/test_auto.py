"""The default method `auto`: width pruning where a model exposes its FFN channels and they reach
the budget (allocated across layers by the output's sensitivity), SubFit where they are not exposed,
the hybrid beyond what width pruning can take."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import subfit_fx
from subfit_fx.cli import main
from subfit_fx.errors import InputError
from subfit_fx.methods import DEFAULT_METHOD
from subfit_fx.methods.auto import HEADS_ABOVE
from subfit_fx.selection import BUDGET_TOLERANCE
from subfit_fx.zoo import tiny_model


def _calib() -> torch.Tensor:
    return torch.randint(3, 128, (12, 16), generator=torch.Generator().manual_seed(0))


def _auto_note(c) -> str:
    return next(n for n in c.report.notes if n.startswith("auto:"))


def test_default_method_is_auto():
    assert DEFAULT_METHOD == "auto"
    c = subfit_fx.compress(tiny_model("llama", layers=4), _calib(), 0.25, progress=False)
    assert c.report.method == "auto" and c.recipe.options["auto"] is True


@pytest.mark.parametrize(("arch", "target"), [("llama", 0.175), ("bert", 0.175), ("llama", 0.33)])
def test_auto_prunes_width_where_the_ffn_channels_are_exposed(arch, target):
    c = subfit_fx.compress(tiny_model(arch, layers=4), _calib(), target, progress=False)
    assert c.recipe.method == "saap" and "ran saap" in _auto_note(c)
    assert c.recipe.options["allocation"] == "output"
    assert {r.action for r in c.recipe.replacements} == {"slim"}
    assert abs(c.report.sparsity_actual - target) <= BUDGET_TOLERANCE
    # the same recipe as naming the method (same calibration, defaults; attention whole up to HEADS_ABOVE)
    whole = {"heads": False} if target <= HEADS_ABOVE else {}
    named = subfit_fx.compress(tiny_model(arch, layers=4), _calib(), target, "saap", progress=False, **whole)
    assert _kept(c) == _kept(named)


def test_auto_prices_key_value_groups_only_above_heads_above():
    """Up to HEADS_ABOVE auto keeps attention whole, though the knapsack would take key/value
    groups of this model there (as it does above)."""
    def kinds(c) -> set[str]:
        return {r.info["kind"] for r in c.recipe.replacements}

    low = subfit_fx.compress(tiny_model("bert", layers=4), _calib(), HEADS_ABOVE, progress=False)
    assert kinds(low) == {"ffn"} and low.recipe.options["heads"] is False
    assert "attention stays whole up to 25% sparsity" in _auto_note(low)
    priced = subfit_fx.compress(tiny_model("bert", layers=4), _calib(), HEADS_ABOVE, "saap", progress=False)
    assert "attention" in kinds(priced)
    high = subfit_fx.compress(tiny_model("bert", layers=4), _calib(), 0.33, progress=False)
    assert "attention" in kinds(high) and "key/value groups" in _auto_note(high)


def _kept(c) -> list:
    return [(r.labels, r.info["kept"]) for r in c.recipe.replacements]


def test_auto_runs_subfit_where_the_channels_are_not_exposed():
    c = subfit_fx.compress(tiny_model("gpt2", layers=4), _calib(), 0.25, progress=False)
    assert c.recipe.method == "subfit" and c.recipe.options["judge"] == "output"
    assert "no prunable channels" in _auto_note(c) and "ran subfit" in _auto_note(c)
    assert abs(c.report.sparsity_actual - 0.25) <= BUDGET_TOLERANCE


def test_auto_runs_the_hybrid_beyond_what_width_pruning_reaches():
    c = subfit_fx.compress(tiny_model("llama", layers=4), _calib(), 0.6, progress=False)
    assert c.recipe.method == "hybrid" and "short of the 60.00% target" in _auto_note(c)
    actions = {r.action for r in c.recipe.replacements}
    assert actions - {"slim"}  # whole branches go too
    assert abs(c.report.sparsity_actual - 0.6) <= BUDGET_TOLERANCE


def test_auto_takes_no_options_and_names_the_method_that_does():
    with pytest.raises(InputError, match=r"option 'rounds' is not one of auto's; .*name the method, e.g. "
                                         r"method='hybrid' / --method hybrid"):
        subfit_fx.compress(tiny_model("llama", layers=4), _calib(), 0.25, progress=False, rounds=2)


def test_cli_without_method_runs_auto_and_a_method_flag_alone_is_a_usage_error(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    base = ["compress", "builtin:llama", "--calib", str(text), "--sparsity", "0.25", "--samples", "8",
            "--seq-len", "16"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    recipe = (tmp_path / "a" / "recipe.json").read_text()
    assert json.loads(recipe)["options"]["auto"] is True  # width pruning (saap)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b"), "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method" in err
    assert not (tmp_path / "b").exists()


def test_auto_runs_subfit_when_width_statistics_would_not_fit(monkeypatch):
    module = importlib.import_module("subfit_fx.methods.auto")  # the package's `auto` is the policy
    monkeypatch.setattr(module, "WIDTH_MEMORY", 1000)  # bytes: less than one tiny FFN's Gram
    c = subfit_fx.compress(tiny_model("llama", layers=4), _calib(), 0.25, progress=False)
    assert c.recipe.method == "subfit" and "GiB, over" in _auto_note(c) and "ran subfit" in _auto_note(c)


def test_auto_keeps_width_pruning_when_the_layer_wise_pipeline_offloads_its_statistics(monkeypatch, tmp_path):
    from subfit_fx.pipelines import SessionFactory

    model, calib, target = tiny_model("llama", layers=4), _calib(), 0.33
    in_memory = subfit_fx.compress(model, calib, target, progress=False)
    module = importlib.import_module("subfit_fx.methods.auto")
    monkeypatch.setattr(module, "WIDTH_MEMORY", 1000)
    c = subfit_fx.compress(model, calib, target, progress=False,
                           session_factory=SessionFactory("sequential", offload=str(tmp_path)))
    assert c.recipe.method == in_memory.recipe.method == "saap"
    assert any("go to the offload directory" in n for n in c.report.notes)
    assert _kept(c) == _kept(in_memory)
    for key, t in in_memory.recipe.tensors.items():  # the same recipe as width pruning in memory
        assert torch.allclose(c.recipe.tensors[key], t, rtol=1e-6, atol=1e-8), key
