"""Weight offload: a model captured with no weight in memory, each layer's weights read from the
checkpoint only while the layer-wise pipeline runs that layer."""

from __future__ import annotations

import json

import pytest
import torch

from subfit_fx import capture, find_branches
from subfit_fx.calibrate import Session
from subfit_fx.errors import InputError, ModelLoadError
from subfit_fx.offload import OffloadedWeights, empty_model, is_offloaded
from subfit_fx.pipelines import LayerByLayer
from subfit_fx.zoo import tiny_model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding is masked the same way with and without offload
    return [(ids[:2], mask[:2]), (ids[2:], mask[2:])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    model = tiny_model("llama", layers=3)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return model, path


def _offloaded_session(path, batches) -> tuple[Session, OffloadedWeights]:
    model = empty_model(path)
    weights = OffloadedWeights(path, model)
    ep = capture(model, batches[0])
    return Session(ep, find_branches(ep), progress=False, pipeline=LayerByLayer(), weights=weights), weights


def test_layerwise_statistics_with_offloaded_weights_equal_resident_ones(checkpoint) -> None:
    model, path = checkpoint
    batches = _batches()
    ep = capture(model, batches[0])
    resident = Session(ep, find_branches(ep), progress=False, pipeline=LayerByLayer()).calibrate(batches)
    session, weights = _offloaded_session(path, batches)
    offloaded = session.calibrate(batches)
    assert sorted(offloaded) == sorted(resident)
    for label, stats in resident.items():
        for key, tensor in stats.tensors().items():
            assert torch.equal(tensor, offloaded[label].tensors()[key]), (label, key)
    # every weight the layers use was read once; the head after the last branch never runs
    used = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(("lm_head", "model.norm")))
    assert weights.bytes_read == used
    # between sweeps nothing is resident: the session's graph and the program hold meta stand-ins
    assert all(is_offloaded(p) for p in session._module.parameters())
    assert all(is_offloaded(t) for t in session.ep.state_dict.values())


def test_offloaded_weights_refuse_a_whole_forward_with_the_fix(checkpoint) -> None:
    _, path = checkpoint
    batches = _batches()
    session, _ = _offloaded_session(path, batches)
    with pytest.raises(InputError, match=r"offloaded.*--pipeline sequential.*--judge statistics"):
        session.forward(batches[0])
    with pytest.raises(InputError, match="offloaded"):
        session.resumable(batches)
    with pytest.raises(InputError, match=r"needs the layer-wise pipeline.*--pipeline sequential"):
        Session(session.ep, session.branches, progress=False, weights=session.weights)


def test_empty_model_keeps_buffers_and_shapes(checkpoint) -> None:
    model, path = checkpoint
    empty = empty_model(path, "bfloat16")
    real = dict(model.named_buffers())
    for name, buffer in empty.named_buffers():
        assert torch.equal(buffer, real[name]), name  # rotary tables are computed, not loaded
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {n: tuple(p.shape) for n, p in empty.named_parameters()} == shapes
    assert {p.dtype for p in empty.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in empty.parameters())  # capturable: a real device, no values


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path) -> None:
    other = tmp_path / "other"
    tiny_model("llama", layers=3).save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] *= 2  # the config no longer matches the weights
    (other / "config.json").write_text(json.dumps(config))
    batches = _batches()
    model = empty_model(other)
    weights = OffloadedWeights(other, model)
    ep = capture(model, batches[0])
    session = Session(ep, find_branches(ep), progress=False, pipeline=LayerByLayer(), weights=weights)
    with pytest.raises(ModelLoadError, match=r"mlp\..*_proj\.weight.*has shape.*does not belong to this config"):
        session.calibrate(batches)


def test_a_directory_without_weights_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        OffloadedWeights(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        empty_model(tmp_path / "missing")


def test_tied_weights_are_read_under_the_name_the_checkpoint_stores(tmp_path) -> None:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    dense = tf.AutoModelForCausalLM.from_config(config).eval()
    dense.save_pretrained(tmp_path)
    model = empty_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as loading ties them
    batches = _batches()
    ep = capture(dense, batches[0])
    resident = Session(ep, find_branches(ep), progress=False, pipeline=LayerByLayer()).calibrate(batches)
    # the capture names the shared tensor lm_head.weight; the checkpoint stores model.embed_tokens.weight
    offloaded, _ = _offloaded_session(tmp_path, batches)
    got = offloaded.calibrate(batches)
    for label, stats in resident.items():
        assert torch.equal(stats.gram["normalized"], got[label].gram["normalized"]), label
    # without the model the tie is unknown: refused by name, never run on an unwritten embedding
    with pytest.raises(ModelLoadError, match=r"'lm_head\.weight' is not in the checkpoint.*pass the captured model"):
        Session(capture(model, batches[0]), find_branches(ep), progress=False, pipeline=LayerByLayer(),
                weights=OffloadedWeights(tmp_path))


def test_compress_with_weight_offload_equals_compress_without(checkpoint, tmp_path) -> None:
    import subfit_fx
    from subfit_fx.pipelines import SessionFactory
    from subfit_fx.standalone import weights_sha256

    model, path = checkpoint
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    common = {"judge": "statistics", "progress": False}
    resident = subfit_fx.compress(path, ids, 0.25, "subfit", session_factory=SessionFactory("sequential"), **common)
    offloaded = subfit_fx.compress(path, ids, 0.25, "subfit", session_factory=SessionFactory("sequential"),
                                   offload_weights=True, **common)
    assert [r.labels for r in offloaded.recipe.replacements] == [r.labels for r in resident.recipe.replacements]
    x = ids[:2]
    mask = torch.ones_like(x)
    expected = resident.module()(x, mask)
    assert torch.equal(offloaded.module()(x, mask), expected)
    # provenance computed from the checkpoint, tensor by tensor, as from the loaded model
    assert offloaded.recipe.base_sha256 == weights_sha256(model)
    loaded = subfit_fx.load(offloaded.save(tmp_path / "out"))
    assert torch.equal(loaded.module()(x, mask), expected)
    assert loaded.dense_model() is not None  # the recorded base is found and matches


def test_cli_weight_offload(checkpoint, tmp_path, capsys) -> None:
    from subfit_fx.cli import main

    _, path = checkpoint
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    base = ["compress", str(path), "--calib", str(text), "--samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--sparsity", "0.25", "--offload-weights"]
    bad = [(["--method", "subfit", "--judge", "statistics"], "add --pipeline sequential"),
           (["--pipeline", "sequential"], "runs the whole model")]  # the default (auto) and the output judge
    for i, (extra, message) in enumerate(bad):
        assert main([*base, "--out", str(tmp_path / f"bad{i}"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not (tmp_path / f"bad{i}").exists()
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--pipeline", "sequential", "--method", "subfit", "--judge",
                 "statistics"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "recipe.json").is_file()


def test_each_segment_reads_only_its_own_weights_and_the_embedding_comes_alone(checkpoint, monkeypatch) -> None:
    _, path = checkpoint
    batches = _batches()
    session, weights = _offloaded_session(path, batches)
    reads: list[list[str]] = []
    original = OffloadedWeights.onloaded
    stored = set(weights.names())

    def recording(self, module, targets):
        targets = list(targets)  # rotary tables and other computed buffers are not read
        reads.append(sorted(self.key(t) for t in targets if self.key(t) in stored))
        return original(self, module, targets)

    monkeypatch.setattr(OffloadedWeights, "onloaded", recording)
    session.calibrate(batches)
    # the embedding table is never resident with a layer's weights (and its statistics)
    assert reads[0] == ["model.embed_tokens.weight"]
    assert len(reads) == 1 + 3  # then one read per layer
    for layer, names in enumerate(reads[1:]):
        assert names and all(n.startswith(f"model.layers.{layer}.") for n in names), names
    flat = [n for names in reads for n in names]
    assert len(flat) == len(set(flat))  # each weight read once
