"""The optional optimum adapter: equal to `Compressed.module()` when optimum is installed, a clear
ImportError when it is not (both asserted: whichever this environment has, plus a forced absence)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import subfit_fx
from subfit_fx.errors import RecipeMismatchError
from subfit_fx.zoo import tiny_model
from tests.conftest import captured


def _optimum_importable() -> bool:
    try:
        importlib.import_module("optimum.fx.optimization")
    except ImportError:
        return False
    return True


OPTIMUM = _optimum_importable()
needs_optimum = pytest.mark.skipif(not OPTIMUM, reason="optimum not installed; "
                                                       "test_adapter_in_this_environment covers its absence")


@pytest.fixture(scope="module")
def compressed():
    model = tiny_model("llama", layers=4)
    calib = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    return model, subfit_fx.compress(model, calib, 0.3, "subfit", progress=False, judge="statistics")  # bypass nodes


def test_adapter_in_this_environment(compressed, tokens):
    """Whatever this environment has: with optimum the adapter equals Compressed.module(); without
    it the import fails with the install command."""
    model, c = compressed
    if not OPTIMUM:
        with pytest.raises(ImportError, match=r"pip install subfit-fx\[optimum\]"):
            importlib.import_module("subfit_fx.integrations.optimum")
        return
    from optimum.fx.optimization import Transformation

    from subfit_fx.integrations.optimum import SubfitTransformation

    transformation = SubfitTransformation(c.recipe)
    assert isinstance(transformation, Transformation)
    gm = transformation(subfit_fx.capture(model).module())
    with torch.no_grad():
        assert torch.equal(gm(*tokens), c.module()(*tokens))
    assert sum(p.numel() for p in gm.parameters()) == c.report.params_after
    assert transformation.preserves_computation is False
    assert transformation.get_transformed_nodes(gm)  # the bypass nodes it added are marked


def test_missing_optimum_raises_clear_import_error(monkeypatch):
    """Forced absence (even where optimum is installed): the message names the extra to install."""
    for name in ("optimum", "optimum.fx", "optimum.fx.optimization"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` fail
    monkeypatch.delitem(sys.modules, "subfit_fx.integrations.optimum", raising=False)
    with pytest.raises(ImportError, match=r"optimum is not installed.*pip install subfit-fx\[optimum\]") as info:
        importlib.import_module("subfit_fx.integrations.optimum")
    assert info.value.name == "optimum"


def test_subfit_fx_never_imports_optimum():
    code = ("import sys, subfit_fx, subfit_fx.integrations, subfit_fx.cli, subfit_fx.exporters.postprocess; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optimum'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


@needs_optimum
def test_adapter_from_saved_directory_and_in_compose(compressed, tokens, tmp_path):
    from optimum.fx.optimization import ChangeTrueDivToMulByInverse, compose

    from subfit_fx.integrations.optimum import SubfitTransformation

    model, c = compressed
    c.save(tmp_path / "c")
    pipeline = compose(SubfitTransformation(tmp_path / "c"), ChangeTrueDivToMulByInverse())
    assert pipeline.preserves_computation is False  # ours does not preserve it, so neither does the composition
    gm = pipeline(subfit_fx.capture(model).module())
    with torch.no_grad():
        assert torch.allclose(gm(*tokens), c.module()(*tokens), atol=1e-5)
    assert SubfitTransformation(tmp_path / "c").signature == SubfitTransformation(c).signature


@needs_optimum
def test_adapter_rejects_other_models_without_touching_them(compressed):
    from subfit_fx.integrations.optimum import SubfitTransformation

    _, c = compressed
    gm = captured("gpt2")[1].module()
    before = [n.name for n in gm.graph.nodes]
    with pytest.raises(RecipeMismatchError):
        SubfitTransformation(c.recipe)(gm)
    assert [n.name for n in gm.graph.nodes] == before
    with pytest.raises(subfit_fx.SubfitError):
        SubfitTransformation(42)
