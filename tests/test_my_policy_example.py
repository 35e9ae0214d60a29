"""examples/my_policy.py, the worked example of docs/architecture.md, runs and registers a policy
whose options are strict like every built-in one's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subfit_fx import compress
from subfit_fx.errors import InputError
from subfit_fx.methods import METHODS
from subfit_fx.zoo import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "my_policy.py"


def test_the_script_runs():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("greedy-removal 2")


def test_the_policy_removes_what_judges_least_harmful(monkeypatch):
    spec = importlib.util.spec_from_file_location("my_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_policy", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    try:
        calib = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))
        c = compress(tiny_model("llama", layers=4), calib, 0.25, "greedy-removal", progress=False)
        assert c.recipe.replaced_labels() and all(r.action == "remove" for r in c.recipe.replacements)
        assert abs(c.report.sparsity_actual - 0.25) < 0.1
        with pytest.raises(InputError, match="did you mean 'sequences'"):
            compress(tiny_model("llama", layers=4), calib, 0.25, "greedy-removal", progress=False, sequence=2)
    finally:
        METHODS.pop("greedy-removal", None)
