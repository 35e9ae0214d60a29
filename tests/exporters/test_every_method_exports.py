"""Every method's output exports with and without KV cache and validates under the scale-aware criterion."""

from __future__ import annotations

import pytest
import torch

from subfit_fx import compress
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.exporters.onnx_export import export_onnx
from subfit_fx.zoo import tiny_model

# The default on both architectures, every other method on one of them (an export costs seconds):
# each architecture still meets removed branches and fitted bypasses.
CASES = [("auto", "llama"), ("auto", "gpt2"), ("subfit", "gpt2"), ("subfit-guarded", "llama"), ("shortgpt", "gpt2"),
         ("uidl", "llama"), ("replaceme", "gpt2"), ("llm-drop", "llama"), ("blockpruner", "gpt2")]


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_compressed_model_exports_with_and_without_kv_cache(arch, method, tmp_path):
    model = tiny_model(arch, hidden=32, layers=4)
    calib = torch.randint(3, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    c = compress(model, calib, 0.25, method, progress=False)
    result = export_onnx_kv(c, tmp_path / "kv.onnx")
    assert result.parity.passed and result.parity.kl is not None and result.parity.kl < 1e-5
    removed = c.recipe.removed_attention_layers()
    assert result.details["removed_attention_layers"] == removed
    assert not set(result.details["cache_layers"]) & set(removed)
    plain = export_onnx(c, tmp_path / "plain.onnx")
    assert plain.parity.passed and plain.parity.kl is not None and plain.parity.kl < 1e-5
