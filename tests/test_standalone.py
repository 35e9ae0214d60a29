"""Self-contained compressed directories: load without the base, and load with transformers."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as tf

from subfit_fx import capture, compress, find_branches, load
from subfit_fx.compress import Compressed
from subfit_fx.errors import ModelLoadError
from subfit_fx.recipe import STORE, WEIGHTS, Recipe, Replacement, branch_records
from subfit_fx.report import Report
from subfit_fx.rewrite import apply_recipe
from subfit_fx.zoo import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


def _hand_made(model: torch.nn.Module) -> Compressed:
    """Layer 0's attention removed, one attention bypassed from the raw stream, one FFN bypassed
    from its normalized input (the cases whose module swaps differ)."""
    ep = capture(model)
    branches = find_branches(ep)
    attention = [b for b in branches if b.kind == "attention"]
    ffn = [b for b in branches if b.kind == "ffn"]
    gen = torch.Generator().manual_seed(0)
    width = branches[0].width
    tensors = {f"r{i}.0.weight": torch.randn(width, width, generator=gen) * 0.05 for i in (1, 2)}
    tensors["r2.0.bias"] = torch.randn(width, generator=gen) * 0.05
    replacements = [Replacement((attention[0].label,), "remove"),
                    Replacement((attention[-1].label,), "bypass", "linear", "stream", [("r1.0.weight", None)]),
                    Replacement((ffn[1].label,), "bypass", "linear", "normalized", [("r2.0.weight", "r2.0.bias")])]
    recipe = Recipe("manual", branch_records(branches), replacements, tensors)
    report = Report("manual", 0.0)
    return Compressed(apply_recipe(ep, recipe, branches=branches), recipe, report, model, dense=model)


def _hf_class(arch: str) -> type:
    return tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM


def _output(model: torch.nn.Module, arch: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.last_hidden_state if arch == "bert" else out.logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_transformers_loads_the_directory_like_subfit_fx(arch, tmp_path):
    compressed = _hand_made(tiny_model(arch, layers=3))
    out = compressed.save(tmp_path / "out")
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = load(out).module()(ids, torch.ones_like(ids))
    hf = _hf_class(arch).from_pretrained(out, trust_remote_code=True).eval()
    assert torch.allclose(_output(hf, arch, ids), ours, atol=1e-5)
    removed = ("model.layers.0.self_attn.", "transformer.h.0.attn.", "encoder.layer.0.attention.self.")
    assert not any(k.startswith(removed) for k in hf.state_dict())
    if arch != "bert":
        prompt = ids[:1, :5]
        cached = hf.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
        uncached = hf.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
        assert torch.equal(cached, uncached)
        # the generated tokens are the compressed model's greedy choices
        logits = load(out).module()(cached[:, :-1], torch.ones_like(cached[:, :-1]))
        assert torch.equal(logits[0, 4:].argmax(-1), cached[0, 5:])


def test_plain_base_class_refuses_the_directory(tmp_path):
    out = _hand_made(tiny_model("llama", layers=2)).save(tmp_path / "out")
    # never silently a base model with random weights where branches were replaced
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


@pytest.mark.parametrize("method", ["shortgpt", "replaceme"])
def test_layer_spans_load_in_transformers(method, tmp_path):
    model = tiny_model("llama", layers=4)
    compressed = compress(model, torch.randint(3, 120, (8, 16)), 0.5, method=method, progress=False)
    assert any(r.is_span() for r in compressed.recipe.replacements)
    out = compressed.save(tmp_path / "out")
    ids = torch.randint(3, 120, (2, 9))
    hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.allclose(_output(hf, "llama", ids), compressed.module()(ids, torch.ones_like(ids)), atol=1e-5)
    cached = hf.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=2)
    assert torch.equal(cached, hf.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False,
                                           pad_token_id=2))


def test_save_delete_base_load_is_bitwise_equal(tmp_path):
    base_dir = tmp_path / "base"
    model = tiny_model("llama", layers=4)
    model.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    compressed = compress(str(base_dir), torch.randint(3, 120, (8, 16)), 0.25, progress=False)
    out = compressed.save(tmp_path / "out")
    ids = torch.randint(3, 120, (2, 12))
    before = compressed.module()(ids, torch.ones_like(ids))
    assert load(out).dense_model() is not None  # the base is there and its hash matches
    shutil.rmtree(base_dir)

    reloaded = load(out)
    assert torch.equal(reloaded.module()(ids, torch.ones_like(ids)), before)
    assert reloaded.dense_model() is None  # nothing pretends to be the dense model
    assert not (out / "weights.safetensors").exists()  # bypass tensors live once, in model.safetensors
    cat = tiny_tokenizer().convert_tokens_to_ids("cat")
    assert tf.AutoTokenizer.from_pretrained(out, trust_remote_code=False).convert_tokens_to_ids("cat") == cat
    assert (out / "generation_config.json").is_file()
    assert len(reloaded.recipe.base_sha256) == 64
    # size on disk: the compressed parameters in float32 (+ 2 % for the file's header)
    params = sum(v.numel() for k, v in reloaded.program.state_dict.items())
    assert (out / WEIGHTS).stat().st_size <= params * 4 * 1.02
    assert reloaded.recipe.tensors.keys() == compressed.recipe.tensors.keys()
    # a loaded directory saves again, self-contained, with its tokenizer, to the same logits
    again = reloaded.save(tmp_path / "again")
    assert (again / "tokenizer.json").is_file() and not (again / "weights.safetensors").exists()
    assert torch.equal(load(again).module()(ids, torch.ones_like(ids)), before)


def test_truncated_weights_file_is_one_clear_error(tmp_path):
    out = _hand_made(tiny_model("llama", layers=2)).save(tmp_path / "out")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / WEIGHTS))
    save_file({k: v for k, v in weights.items() if not k.startswith(STORE)}, str(out / WEIGHTS),
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"in only one of recipe\.json and the weights file"):
        load(out)
