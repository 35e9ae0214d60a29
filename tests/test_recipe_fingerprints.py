"""Behaviour pinned across refactors: every method's recipe on tiny Llama, GPT-2 and BERT (one
seed) equals the one recorded in tests/fixtures/recipes before the calibration redesign.

Selections (labels, actions, forms) must match exactly, tensors bit for bit on the recording
machine and within float32 round-off elsewhere (another CPU may sum in another order).
Re-record, only for an intended change of behaviour, with `python -m tests.test_recipe_fingerprints`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subfit_fx import compress
from subfit_fx.zoo import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "recipes"
ARCHS = ("llama", "gpt2", "bert")
METHODS = ("subfit", "subfit-guarded", "shortgpt", "uidl", "replaceme", "llm-drop", "blockpruner")
CASES = [(arch, method) for arch in ARCHS for method in METHODS]


def _recipe(arch: str, method: str):
    model = tiny_model(arch, hidden=32, layers=4)
    calib = torch.randint(3, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    return compress(model, calib, 0.25, method, progress=False, seed=0).recipe


def _selection(recipe) -> list[dict]:
    return [{"labels": list(r.labels), "action": r.action, "form": r.form, "input": r.input,
             "layers": [list(x) for x in r.layers]} for r in recipe.replacements]


def record() -> None:
    """Write the fixtures from the current code."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for arch, method in CASES:
        recipe = _recipe(arch, method)
        stem = FIXTURES / f"{arch}-{method}"
        stem.with_suffix(".json").write_text(json.dumps(_selection(recipe), indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in recipe.tensors.items()}, str(stem.with_suffix(".safetensors")))


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_recipe_unchanged(arch, method):
    stem = FIXTURES / f"{arch}-{method}"
    recipe = _recipe(arch, method)
    assert _selection(recipe) == json.loads(stem.with_suffix(".json").read_text())
    recorded = load_file(str(stem.with_suffix(".safetensors")))
    assert sorted(recipe.tensors) == sorted(recorded)
    for key, value in recorded.items():
        torch.testing.assert_close(recipe.tensors[key], value, rtol=1e-4, atol=1e-6, msg=key)


if __name__ == "__main__":
    record()
