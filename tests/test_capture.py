from __future__ import annotations

import pytest
import torch

from subfit_fx import capture
from subfit_fx.capture import HFWrapper, load_model
from subfit_fx.errors import CaptureError, InputError, ModelLoadError
from subfit_fx.zoo import ARCHITECTURES
from tests.conftest import captured
from tests.nanogpt import NanoGPT


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_program_equals_eager_model(arch, tokens):
    model, ep = captured(arch)
    ids, mask = tokens
    with torch.no_grad():
        assert torch.equal(ep.module()(ids, mask), HFWrapper(model)(ids, mask))


def test_batch_and_sequence_are_dynamic():
    _, ep = captured("llama")
    ids = torch.randint(0, 128, (5, 31))
    out = ep.module()(ids, torch.ones_like(ids))
    assert out.shape == (5, 31, 128)


def test_plain_module_needs_example_inputs_then_captures():
    model = NanoGPT().eval()
    with pytest.raises(InputError, match="example_inputs"):
        capture(model)
    idx = torch.randint(0, 96, (2, 8))
    ep = capture(model, (idx,))
    idx2 = torch.randint(0, 96, (3, 17))
    assert torch.equal(ep.module()(idx2), model(idx2))


def test_uncapturable_model_gives_capture_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace this
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"torch\.export could not capture DataDependent"):
        capture(DataDependent(), (torch.randn(2, 3),))


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path)


def test_load_model_roundtrip_and_corrupt_weights(tmp_path):
    model, _ = captured("gpt2")
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    weights = next((tmp_path / "m").glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path / "m")
