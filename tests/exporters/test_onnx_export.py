"""Plain (no-cache) ONNX export: parity with torch, names, and all-or-nothing output."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from subfit_fx import apply_recipe, capture
from subfit_fx.errors import OutputExistsError, ValidationError
from subfit_fx.exporters.onnx_export import export_onnx
from subfit_fx.runtime import KIND_KEY, OnnxRunner
from subfit_fx.zoo import tiny_model
from tests.conftest import captured
from tests.exporters.conftest import manual_recipe


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(("arch", "output"), [("llama", "logits"), ("bert", "last_hidden_state")])
def test_dense_export_matches_torch(tmp_path, arch, output):
    _, ep = captured(arch)
    path = tmp_path / f"{arch}.onnx"
    result = export_onnx(ep, path)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == [output]
    assert session.get_inputs()[0].shape == ["batch_size", "sequence_length"]
    assert session.get_modelmeta().custom_metadata_map[KIND_KEY] == "plain"
    # a batch and length unlike both the capture's and the validation's
    ids = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ep.module()(ids, torch.ones_like(ids)).numpy()
    got = OnnxRunner(path)(ids.numpy())
    assert abs(got - want).max() <= 1e-4
    assert _leftovers(tmp_path) == []


def test_failed_validation_raises_and_writes_nothing(tmp_path):
    model, ep = captured("llama")
    path = tmp_path / "bad.onnx"
    def wrong(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits + 1e-3
    with pytest.raises(ValidationError, match="max \\|diff\\|"):
        export_onnx(ep, path, reference=wrong)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_failed_validation_keeps_the_existing_output(tmp_path):
    _, ep = captured("llama")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ValidationError):
        export_onnx(ep, path, force=True, reference=lambda ids, mask: torch.zeros((*ids.shape, 128)))
    assert path.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    _, ep = captured("llama")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        export_onnx(ep, path, validate=False)
    assert path.read_bytes() == b"x"


def test_compressed_without_attention_drops_the_mask(tmp_path):
    model = tiny_model("llama", layers=2)
    recipe = manual_recipe(model, remove=["model.layers.0.self_attn", "model.layers.1.self_attn"])
    program = apply_recipe(capture(model), recipe)
    path = tmp_path / "noattn.onnx"
    result = export_onnx(program, path)
    assert result.parity.passed
    assert result.inputs == ["input_ids"]
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        want = program.module()(ids, torch.ones_like(ids)).numpy()
    assert abs(OnnxRunner(path)(ids) - want).max() <= 1e-4
