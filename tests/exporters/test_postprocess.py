"""ONNX post-passes: fusions exact within 1e-4, quantization reported, outputs all-or-nothing."""

from __future__ import annotations

import collections

import onnx_ir as ir
import pytest

from subfit_fx.errors import InputError
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.exporters.onnx_export import export_onnx
from subfit_fx.exporters.postprocess import optimize_onnx, quantize_int4, quantize_int8
from subfit_fx.runtime import OnnxCausalLM, create_session, model_metadata
from subfit_fx.zoo import tiny_model
from tests.conftest import captured


@pytest.fixture(scope="module")
def kv_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("post") / "kv.onnx"
    export_onnx_kv(tiny_model("llama", layers=2), path)
    return path


@pytest.fixture(scope="module")
def kv_file_opset20(tmp_path_factory):
    # before opset 23 attention is decomposed in the export, which the fusions put back together
    path = tmp_path_factory.mktemp("post20") / "kv.onnx"
    export_onnx_kv(tiny_model("llama", layers=2), path, opset=20)
    return path


def test_default_export_uses_standard_attention_on_cache_heads(kv_file):
    model = ir.load(str(kv_file))
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["Attention"] == 2 and ops["RotaryEmbedding"] == 4 and ops["RMSNormalization"] == 5
    # grouped-query attention reads the cache's 2 key/value heads: no Expand repeats them
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    concat = past.uses()[0].node
    assert concat.op_type == "Concat"
    assert {use.node.op_type for use in concat.outputs[0].uses()} == {"Attention"}
    attention = next(node for node in model.graph if node.op_type == "Attention")
    query, key = attention.inputs[:2]
    assert query.shape[1] == 4 and key.shape[1] == 2  # 4-D inputs: heads are axis 1


def test_fusions_on_kv_graph_are_exact_and_generate(kv_file_opset20, tmp_path):
    kv_file = kv_file_opset20
    result = optimize_onnx(kv_file, tmp_path / "opt.onnx")
    assert result.parity.passed and result.parity.tolerance.rtol == 1e-4
    assert result.details["fused_ops"].get("MultiHeadAttention", 0) == 2
    assert result.details["passes"] == "optimize"
    prompt = [[5, 6, 7, 8]]
    fused, plain = OnnxCausalLM(result.path), OnnxCausalLM(kv_file)
    assert (fused.generate(prompt, 12) == plain.generate(prompt, 12)).all()


def test_fusions_on_plain_graph(tmp_path):
    _, ep = captured("llama")
    export_onnx(ep, tmp_path / "m.onnx", opset=20)
    result = optimize_onnx(tmp_path / "m.onnx", tmp_path / "opt.onnx", backend="transformers")
    assert result.parity.passed
    assert result.details["fused_ops"].get("SkipSimplifiedLayerNormalization", 0) > 0


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_quantization_is_reported(kv_file, tmp_path, quantize):
    result = quantize(kv_file, tmp_path / "q.onnx")
    parity = result.parity
    assert parity.tolerance.rtol is None and parity.tolerance.min_top1 == 0.5 and parity.passed
    assert 0 < parity.max_abs_diff < 1.0
    assert "top-1 agreement" in parity.summary()
    meta = model_metadata(create_session(result.path))
    assert meta["subfit_fx.kind"] == "kv-cache" and meta["subfit_fx.passes"] in ("int8", "int4")
    assert result.bytes < kv_file.stat().st_size


def test_int8_keeps_gated_ffn_down_projections_float(kv_file, tmp_path):
    # the down projection reads gate * up: its activation outliers break one int8 scale per tensor
    kept = quantize_int8(kv_file, tmp_path / "kept.onnx")
    every = quantize_int8(kv_file, tmp_path / "all.onnx", keep_gated_down=False)
    assert kept.details["kept_float"] == 2 and every.details["kept_float"] == 0
    integer = "MatMulInteger"
    assert kept.details["fused_ops"][integer] + 2 == every.details["fused_ops"][integer]
    assert every.bytes < kept.bytes


def test_lossy_check_runs_on_greedy_text_and_still_rejects_another_model(kv_file, tmp_path):
    from subfit_fx.exporters.validate import Tolerance, compare_onnx

    other = tmp_path / "other.onnx"
    export_onnx_kv(tiny_model("llama", layers=2, seed=1), other)
    lossy = Tolerance(min_top1=0.5)
    same = compare_onnx(kv_file, kv_file, vocab_size=128, kv_cache=True, tolerance=lossy)
    assert same.passed and same.top1_agreement == 1.0 and "greedy" in same.summary()
    wrong = compare_onnx(other, kv_file, vocab_size=128, kv_cache=True, tolerance=lossy)
    assert not wrong.passed and wrong.top1_agreement < 0.5


def test_pass_refuses_to_overwrite_its_input(kv_file):
    with pytest.raises(InputError, match="overwrite its input"):
        optimize_onnx(kv_file, kv_file, force=True)
