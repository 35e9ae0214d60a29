"""The ONNX Runtime runners: feeds from the session, position ids, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from subfit_fx.errors import InputError, ModelLoadError
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.runtime import OnnxCausalLM, create_session, default_providers, position_ids_from_mask
from subfit_fx.zoo import tiny_model
from tests.exporters.conftest import manual_recipe


def test_position_ids_skip_left_padding():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]


def test_cpu_is_always_a_provider():
    assert default_providers()[-1] == "CPUExecutionProvider"


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_session(tmp_path / "none.onnx")


@pytest.mark.skipif("CUDAExecutionProvider" in default_providers(), reason="this ONNX Runtime runs CUDA")
def test_a_gpu_provider_that_cannot_start_is_an_error_not_a_quiet_cpu_run(tmp_path):
    model = tiny_model("llama", layers=2)
    path = export_onnx_kv(model, tmp_path / "m.onnx").path
    with pytest.raises(ModelLoadError, match=r"could not start CUDAExecutionProvider.*--provider cpu"):
        create_session(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert create_session(path).get_providers() == ["CPUExecutionProvider"]


def test_graph_without_any_attention_decodes_token_by_token(tmp_path):
    model = tiny_model("llama", layers=2)
    recipe = manual_recipe(model, remove=["model.layers.0.self_attn", "model.layers.1.self_attn"])
    result = export_onnx_kv(model, tmp_path / "ffn_only.onnx", recipe=recipe)
    lm = OnnxCausalLM(result.path)
    assert lm.input_names == ["input_ids"] and lm.cache == {} and lm.has_cache_graph
    out = lm.generate([[5, 6, 7]], 6)
    # with no attention each position depends on its own token only
    logits, _ = lm.forward(out[:, :-1], np.ones_like(out[:, :-1]))
    assert (logits.argmax(-1)[0, 2:] == out[0, 3:]).all()
    with pytest.raises(InputError, match="max_new_tokens"):
        lm.generate([[5]], -1)


def test_plain_graph_generates_by_recomputing(tmp_path):
    import torch

    from subfit_fx.exporters.onnx_export import export_onnx
    from tests.conftest import captured

    model, ep = captured("llama")
    path = export_onnx(ep, tmp_path / "plain.onnx").path
    lm = OnnxCausalLM(path)
    assert not lm.has_cache_graph
    ids = torch.tensor([[5, 6, 7]])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=2)
    np.testing.assert_array_equal(lm.generate(ids, 6), want.numpy())
