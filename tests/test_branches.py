from __future__ import annotations

import pytest
import torch

from subfit_fx import capture, find_branches
from subfit_fx.branches import count_block_params, count_params
from subfit_fx.errors import NoBranchesError
from subfit_fx.zoo import ARCHITECTURES
from tests.conftest import captured
from tests.nanogpt import NanoGPT

# Modules whose parameters sit inside each branch besides the labelled module itself
# (norms before and, for Gemma2, after the branch); BERT's LayerNorms come after the residual
# add (post-LN), so they belong to no branch.
NORMS = {
    "llama": ("input_layernorm", "post_attention_layernorm"),
    "mistral": ("input_layernorm", "post_attention_layernorm"),
    "qwen2": ("input_layernorm", "post_attention_layernorm"),
    "qwen3": ("input_layernorm", "post_attention_layernorm"),
    "gemma": ("input_layernorm", "post_attention_layernorm"),
    "gemma2": (("input_layernorm", "post_attention_layernorm"),
               ("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    "phi3": ("input_layernorm", "post_attention_layernorm"),
    "gpt2": ("ln_1", "ln_2"),
    "opt": ("self_attn_layer_norm", "final_layer_norm"),
    "gpt_neox": ("input_layernorm", "post_attention_layernorm"),
    "bert": ((), ()),
}
LAYERS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
          "bert": "encoder.layer"}


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expected_params(model, arch, label, kind, layer):
    layer_path = f"{LAYERS.get(arch, 'model.layers')}.{layer}"
    layer_mod = model.get_submodule(layer_path)
    if "+" in label:  # OPT fc1+fc2, BERT intermediate+output
        parent, children = label.rsplit(".", 1)[0], label.rsplit(".", 1)[1].split("+")
        total = sum(_numel(model.get_submodule(f"{parent}.{c}")) for c in children)
    else:
        total = _numel(model.get_submodule(label))
    if arch == "bert":
        post_ln = "attention.output.LayerNorm" if kind == "attention" else "output.LayerNorm"
        total -= _numel(layer_mod.get_submodule(post_ln))
    norms = NORMS[arch][0 if kind == "attention" else 1]
    for norm in (norms,) if isinstance(norms, str) else norms:
        total += _numel(layer_mod.get_submodule(norm))
    return total


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_branches_per_layer_with_labels_kinds_and_params(arch):
    model, ep = captured(arch)
    branches = find_branches(ep)
    layers = model.config.num_hidden_layers
    assert len(branches) == 2 * layers
    assert [b.kind for b in branches] == ["attention", "ffn"] * layers
    assert [b.layer for b in branches] == [i // 2 for i in range(2 * layers)]
    for b in branches:
        model.get_submodule(b.label.split("+")[0])  # label is a real module path
        assert b.params == _expected_params(model, arch, b.label, b.kind, b.layer), b.label
    # every block parameter belongs to a branch except BERT's post-LN norms
    extra = 0 if arch != "bert" else sum(
        _numel(model.get_submodule(f"encoder.layer.{i}.{n}"))
        for i in range(layers) for n in ("attention.output.LayerNorm", "output.LayerNorm"))
    assert count_block_params(ep, branches) == sum(b.params for b in branches) + extra
    pooler = _numel(model.pooler) if arch == "bert" else 0  # dead: the capture returns hidden states
    assert count_params(ep) == model.num_parameters() - pooler


def test_llama_labels_and_normalized_inputs():
    _, ep = captured("llama")
    branches = find_branches(ep)
    assert [b.label for b in branches] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    nodes = {n.name: n for n in ep.graph.nodes}
    for b in branches:
        assert b.normalized is not None
        # the normalized input feeds the first projections of the branch
        assert any(u.target is torch.ops.aten.linear.default for u in nodes[b.normalized].users)
        assert b.consumer in {u.name for u in nodes[b.output].users}


def test_bert_is_post_ln_without_normalized_input():
    _, ep = captured("bert")
    nodes = {n.name: n for n in ep.graph.nodes}
    for b in find_branches(ep):
        assert b.normalized is None
        assert [u.target for u in nodes[b.consumer].users] == [torch.ops.aten.layer_norm.default]


def test_parallel_residual_terms_are_separate_branches():
    _, ep = captured("gpt_neox")
    att, ffn = find_branches(ep)[:2]
    assert att.skip == ffn.skip and att.consumer == ffn.consumer
    assert set(att.body).isdisjoint(ffn.body)


def test_plain_pytorch_model():
    model = NanoGPT(layers=3).eval()
    branches = find_branches(capture(model, (torch.randint(0, 96, (2, 8)),)))
    assert [b.label for b in branches] == [f"h.{i}.{m}" for i in range(3) for m in ("attn", "mlp")]
    for b in branches:
        norm = "ln_1" if b.kind == "attention" else "ln_2"
        expected = _numel(model.get_submodule(b.label)) + _numel(model.get_submodule(f"h.{b.layer}.{norm}"))
        assert b.params == expected


def test_graph_without_residuals_raises():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(NoBranchesError, match="no residual branches"):
        find_branches(capture(mlp, (torch.randn(2, 3, 8),)))


def test_labels_are_stable_across_captures():
    model, ep = captured("qwen2")
    ids = torch.randint(0, 128, (3, 5))
    other = capture(model, (ids, torch.ones_like(ids)))
    assert [b.label for b in find_branches(ep)] == [b.label for b in find_branches(other)]
