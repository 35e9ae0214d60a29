"""`subfit-fx export DIR --out FOLDER`: an ONNX folder that runs on its own (text in, text out)."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as tf

from subfit_fx import compress
from subfit_fx.cli import main
from subfit_fx.data import tokenizer_from_dir
from subfit_fx.zoo import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    model = tiny_model("llama", layers=4)
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    compressed = compress(str(root / "base"), torch.randint(3, 120, (8, 16)), 0.25, progress=False)
    compressed.save(root / "compressed")
    shutil.rmtree(root / "base")  # the folder must not need the base model
    return root / "compressed"


def test_folder_generates_text_like_transformers(compressed_dir, tmp_path, capsys):
    folder = tmp_path / "onnx"
    assert main(["export", str(compressed_dir), "--out", str(folder), "--kv-cache"]) == 0
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names
    capsys.readouterr()
    prompt = "the cat is on the"
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out.strip()

    tokenizer = tokenizer_from_dir(folder)
    hf = tf.AutoModelForCausalLM.from_pretrained(compressed_dir, trust_remote_code=True).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert expected.shape[1] > ids.shape[1]
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_folder_config_and_tokenizer_load_with_transformers(compressed_dir, tmp_path):
    folder = tmp_path / "onnx"
    assert main(["export", str(compressed_dir), "--out", str(folder)]) == 0
    config = tf.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "subfit_llama" and config.subfit["replacements"]
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert tokenizer.convert_tokens_to_ids("cat") == tiny_tokenizer().convert_tokens_to_ids("cat")


def test_export_to_an_existing_file_as_folder_is_refused(compressed_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert main(["export", str(compressed_dir), "--out", str(target), "--force"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_onnxruntime_genai_runs_a_folder_without_layer0_cache(tmp_path):
    """genai names caches 0..N-1 and allocates every one: the folder renumbers the kept caches and
    declares only those; genai's greedy tokens equal our runner's."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from subfit_fx.runtime import OnnxCausalLM
    from tests.test_standalone import _hand_made

    compressed = _hand_made(tiny_model("llama", layers=3))
    assert compressed.recipe.removed_attention_layers() == [0, 2]
    compressed.save(tmp_path / "c")
    folder = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "c"), "--out", str(folder), "--kv-cache"]) == 0
    ours = OnnxCausalLM(folder / "model.onnx")
    assert ours.layers_with_cache == [1] and list(ours.cache) == ["past_key_values.0.key", "past_key_values.0.value"]
    prompt = [5, 9, 11, 17]
    expected = ours.generate([prompt], 8)[0].tolist()

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)] == expected


def test_folder_of_a_model_with_pruned_key_value_groups_generates(tmp_path, capsys):
    """saap --heads leaves layers with different numbers of key/value heads: the folder still
    generates through our runtime, and genai_config.json (one head count for all layers) is left
    out with a message rather than written wrong."""
    import json

    from subfit_fx.exporters.genai import cache_heads

    model = tiny_model("llama", layers=4)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    # z-scores: on this random model the output metric prices every key/value group above the FFN blocks
    c = compress(str(tmp_path / "base"), torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(0)),
                 0.3, method="saap", heads=True, block=16, allocation="zscore", progress=False)
    kept = [r.info["kept_groups"] for r in c.recipe.replacements if r.info["kind"] == "attention"]
    assert kept and min(kept) < 2
    c.save(tmp_path / "compressed")
    folder = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "compressed"), "--out", str(folder), "--kv-cache"]) == 0
    heads = cache_heads(folder / "model.onnx")
    said = capsys.readouterr()
    if len(set(heads)) > 1:
        assert not (folder / "genai_config.json").exists()
        assert "different numbers of key/value heads" in said.out + said.err
    else:
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        assert decoder["num_key_value_heads"] == heads[0]
    assert main(["generate", str(folder), "--prompt", "the cat is on the", "--max-new-tokens", "4"]) == 0
