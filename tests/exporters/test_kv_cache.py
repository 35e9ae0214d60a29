"""KV-cache ONNX export: generation parity with torch, and removed attention losing its cache."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from subfit_fx import apply_recipe, capture
from subfit_fx.errors import ValidationError
from subfit_fx.exporters.kv_cache import cache_program, cache_shapes, export_onnx_kv
from subfit_fx.runtime import OnnxCausalLM
from subfit_fx.zoo import tiny_model
from tests.exporters.conftest import manual_recipe

NEW_TOKENS = 32


def _prompts(batch=2, seq=5, seed=0):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _greedy_no_cache(forward, ids, steps):
    """Greedy decoding that re-runs the whole sequence each step (no cache to get wrong)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = forward(ids, torch.ones_like(ids))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _greedy_torch_cache(model, cap, ids, steps):
    """Greedy decoding through the rewritten KV-cache program in torch."""
    module, mask, shapes = cap.program.module(), torch.ones_like(ids), cache_shapes(model)
    past = [(torch.zeros(ids.shape[0], shapes[j][0], 0, shapes[j][1]),) * 2 for j in cap.cache_layers]
    out, step = ids, ids
    for _ in range(steps):
        pos = torch.arange(mask.shape[1] - step.shape[1], mask.shape[1]).expand(ids.shape[0], -1)
        with torch.no_grad():
            logits, present = module(step, mask, pos, past)
        step = logits[:, -1].argmax(-1, keepdim=True)
        past = [tuple(kv) for kv in present]
        out = torch.cat([out, step], dim=1)
        mask = torch.ones_like(out)
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    model = tiny_model("llama", layers=2)
    path = tmp_path_factory.mktemp("kv") / "dense.onnx"
    return model, export_onnx_kv(model, path)


def test_dense_names_and_parity(dense):
    _, result = dense
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(result.path))
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in session.get_outputs()] == ["logits", "present.0.key", "present.0.value",
                                                       "present.1.key", "present.1.value"]
    assert session.get_inputs()[3].shape == ["batch_size", 2, "past_sequence_length", 16]


def test_dense_greedy_generation_matches_hf_generate(dense):
    model, result = dense
    ids = _prompts()
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=2)
    got = OnnxCausalLM(result.path).generate(ids, NEW_TOKENS)
    np.testing.assert_array_equal(got, want.numpy())


def test_left_padded_batch_matches_unpadded_rows(dense):
    _, result = dense
    lm = OnnxCausalLM(result.path)
    short, long = _prompts(1, 4, seed=3), _prompts(1, 7, seed=4)
    batch = torch.cat([torch.cat([torch.full((1, 3), 2), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    got = lm.generate(batch, 8, attention_mask=mask)
    np.testing.assert_array_equal(got[0, 3:], lm.generate(short, 8)[0])
    np.testing.assert_array_equal(got[1], lm.generate(long, 8)[0])


def test_sampling_is_seeded(dense):
    _, result = dense
    lm = OnnxCausalLM(result.path)
    a = lm.generate(_prompts(), 8, do_sample=True, temperature=0.8, top_k=10, seed=7)
    b = lm.generate(_prompts(), 8, do_sample=True, temperature=0.8, top_k=10, seed=7)
    np.testing.assert_array_equal(a, b)


def test_failed_kv_validation_leaves_nothing(tmp_path):
    model = tiny_model("llama", layers=2)
    def wrong(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits * 1.01
    with pytest.raises(ValidationError):
        export_onnx_kv(model, tmp_path / "bad.onnx", reference=wrong)
    assert list(tmp_path.iterdir()) == []


def test_removed_layer0_attention_generates_like_torch(tmp_path):
    model = tiny_model("llama", layers=3)
    recipe = manual_recipe(model, remove=["model.layers.0.self_attn"], bypass=["model.layers.2.self_attn"])
    result = export_onnx_kv(model, tmp_path / "c.onnx", recipe=recipe)
    assert result.parity.passed
    session = ort.InferenceSession(str(result.path))
    names = [v.name for v in session.get_inputs()] + [v.name for v in session.get_outputs()]
    assert not [n for n in names if n.startswith(("past_key_values.0.", "present.0.",
                                                   "past_key_values.2.", "present.2."))]
    assert "past_key_values.1.key" in names and "present.1.value" in names
    ids = _prompts()
    program = apply_recipe(capture(model), recipe)
    want = _greedy_no_cache(program.module(), ids, NEW_TOKENS)
    got = OnnxCausalLM(result.path).generate(ids, NEW_TOKENS)
    np.testing.assert_array_equal(got, want.numpy())
    torch_cache = _greedy_torch_cache(model, cache_program(model, recipe), ids, NEW_TOKENS)
    np.testing.assert_array_equal(torch_cache.numpy(), want.numpy())
