"""GGUF checkpoints as model input: a tiny Llama GGUF written here with the `gguf` package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from subfit_fx.cli import main
from subfit_fx.gguf import gguf_directory

HIDDEN, LAYERS, FFN, HEADS, KV, VOCAB = 64, 2, 128, 4, 2, 300


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, skip: str | None = None) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-ish vocabulary, float32 tensors, in GGUF
    (`skip`: leave out the tensor of that name)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(VOCAB - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name: str, *shape: int) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name != skip:
            w.add_tensor(name, values)

    t("token_embd.weight", VOCAB, HIDDEN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    t("output.weight", VOCAB, HIDDEN)
    head = HIDDEN // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        t(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        t(f"blk.{i}.attn_k.weight", KV * head, HIDDEN)
        t(f"blk.{i}.attn_v.weight", KV * head, HIDDEN)
        t(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        t(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBFIT_FX_CACHE", str(tmp_path / "cache"))


def test_gguf_converts_to_a_float32_directory_once(tiny_gguf):
    import transformers as tf

    out = gguf_directory(tiny_gguf)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == LAYERS
    assert "quantization_config" not in config
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == HIDDEN
    assert model.model.embed_tokens.weight.dtype == torch.float32
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_directory(tiny_gguf) == out  # cached: not converted again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_is_a_model_input_for_the_cli(tiny_gguf, tmp_path, capsys):
    assert main(["inspect", str(tiny_gguf), "--json"]) == 0
    labels = [b["label"] for b in json.loads(capsys.readouterr().out)["branches"]]
    assert labels == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                      "model.layers.1.mlp"]
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    assert main(["compress", str(tiny_gguf), "--calib", str(calib), "--sparsity", "0.25", "--samples", "8",
                 "--seq-len", "16", "--out", str(out)]) == 0
    assert (out / "recipe.json").is_file()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a GGUF file"),
    (b"NOTGGUF" * 10, "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00garbage", "cannot read GGUF file"),
])
def test_bad_gguf_is_one_line_exit_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="rwkv6")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "architecture 'rwkv6'" in err and "not supported" in err and err.count("\n") == 1


def test_missing_gguf_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gguf_missing_a_weight_is_refused_not_filled_with_random_values(tmp_path):
    bad = write_tiny_gguf(tmp_path / "partial.gguf", skip="blk.1.ffn_down.weight")
    from subfit_fx.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="lacks 1 weight"):
        gguf_directory(bad)
    assert not list((tmp_path / "cache").glob("gguf/partial-*"))  # nothing half-converted left behind
