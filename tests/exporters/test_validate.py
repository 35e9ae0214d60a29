"""The parity criterion scales with the model: round-off of a model with large logits
passes, a wrong weight and a mis-wired KV cache do not."""

from __future__ import annotations

import onnx
import pytest
import torch

from subfit_fx.errors import ValidationError
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.exporters.onnx_export import export_onnx
from subfit_fx.exporters.validate import EXACT, ParityReport, Tolerance, check_kv, tolerance_for
from subfit_fx.zoo import tiny_model


@pytest.fixture(scope="module")
def loud():
    """6 layers whose logits are scaled x3000: float32 round-off far above a fixed 1e-4."""
    model = tiny_model("llama", layers=6)
    with torch.no_grad():
        model.lm_head.weight.mul_(3000.0)
    return model


def test_model_with_large_logits_passes(loud, tmp_path):
    result = export_onnx_kv(loud, tmp_path / "kv.onnx")
    parity = result.parity
    assert parity.passed and parity.tolerance == EXACT
    assert parity.scale > 10.0 and parity.kl is not None and parity.kl < 1e-6
    assert parity.max_abs_diff > 1e-4  # a fixed absolute tolerance would have rejected plain round-off
    plain = export_onnx(loud, tmp_path / "plain.onnx").parity
    assert plain.passed and plain.relative_diff < 1e-5


def _rewire_first_layer_cache(src, dst):
    """Layer 0 reads layer 1's past keys: shapes agree, so only the numbers can tell."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.input[:] = ["past_key_values.1.key" if name == "past_key_values.0.key" else name
                         for name in node.input]
    onnx.save(model, str(dst))


def test_miswired_cache_is_rejected(tmp_path):
    model = tiny_model("llama", layers=2)
    good = export_onnx_kv(model, tmp_path / "kv.onnx")
    assert good.parity.passed
    _rewire_first_layer_cache(good.path, tmp_path / "bad.onnx")

    def reference(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    bad = check_kv(tmp_path / "bad.onnx", reference, vocab_size=model.config.vocab_size)
    assert not bad.passed and bad.relative_diff > 100 * EXACT.rtol
    with pytest.raises(ValidationError, match="of scale"):
        bad.enforce()


def test_wrong_weight_is_rejected(tmp_path):
    model = tiny_model("llama", layers=2)

    def wrong(ids, mask):  # one weight off by 1 %: what a bad rewrite would do
        with torch.no_grad():
            w = model.model.layers[1].mlp.down_proj.weight
            w.mul_(1.01)
            try:
                return model(input_ids=ids, attention_mask=mask).logits
            finally:
                w.div_(1.01)

    with pytest.raises(ValidationError, match="KL"):
        export_onnx(model, tmp_path / "m.onnx", reference=wrong)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_by_dtype_and_unchecked_bounds():
    assert tolerance_for(torch.float32) == EXACT
    assert tolerance_for(torch.bfloat16).rtol > EXACT.rtol
    loose = ParityReport("q", 0.4, 0.6, ("c",), scale=2.0, kl=0.3, tolerance=Tolerance(min_top1=0.5))
    assert loose.passed and "KL 3.0e-01" in loose.summary()
    assert not ParityReport("q", 0.4, 0.4, ("c",), tolerance=Tolerance(min_top1=0.5)).passed
    assert not ParityReport("x", float("inf"), 1.0, ("c",), tolerance=Tolerance()).passed
