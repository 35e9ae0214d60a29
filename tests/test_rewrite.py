from __future__ import annotations

import pytest
import torch

from subfit_fx import find_branches
from subfit_fx.branches import count_params
from subfit_fx.errors import RecipeMismatchError
from subfit_fx.recipe import Recipe, Replacement, branch_records
from subfit_fx.rewrite import apply_recipe
from tests.conftest import captured


def _recipes(branches, labels, width):
    zeros = {"w": torch.zeros(width, width), "b": torch.zeros(width)}
    records = branch_records(branches)
    removed = Recipe("t", records, [Replacement((label,), "remove") for label in labels])
    zero = Recipe("t", records, [Replacement((label,), "bypass", "linear", "normalized", [("w", "b")])
                                 for label in labels], tensors=zeros)
    return removed, zero


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gpt_neox", "gemma2", "phi3"])
def test_zero_bypass_equals_removal_bitwise(arch, tokens):
    _, ep = captured(arch)
    branches = find_branches(ep)
    labels = [branches[0].label, branches[1].label, branches[3].label]  # layer 0 entirely + an FFN
    removed, zero = _recipes(branches, labels, branches[0].width)
    a, b = apply_recipe(ep, removed), apply_recipe(ep, zero)
    with torch.no_grad():
        assert torch.equal(a.module()(*tokens), b.module()(*tokens))
    replaced = sum(x.params for x in branches if x.label in labels)
    assert count_params(a) == count_params(ep) - replaced
    kept_norms = zero.kept_params(branches)  # the bypass reads the normalized input: norms stay
    assert kept_norms == sum(x.norm_params for x in branches if x.label in labels)
    assert count_params(b) == count_params(ep) - replaced + zero.bypass_params() + kept_norms


def test_rewrite_removes_dead_nodes_and_unused_weights():
    _, ep = captured("llama")
    branches = find_branches(ep)
    removed, _ = _recipes(branches, [branches[0].label], branches[0].width)
    out = apply_recipe(ep, removed)
    names = {n.name for n in out.graph.nodes}
    assert not names & set(branches[0].body)
    assert not any("layers.0.self_attn" in k for k in out.state_dict)
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default and n.name in branches[0].body
                   for n in out.graph.nodes)
    assert len(find_branches(ep)) == 4  # the input program is untouched


def test_recipe_from_another_model_is_rejected():
    _, llama = captured("llama")
    _, gpt2 = captured("gpt2")
    removed, _ = _recipes(find_branches(llama), ["model.layers.0.mlp"], 64)
    with pytest.raises(RecipeMismatchError, match="another model"):
        apply_recipe(gpt2, removed)


def test_bypass_of_wrong_width_is_rejected():
    _, ep = captured("llama")
    branches = find_branches(ep)
    bad = Recipe("t", branch_records(branches), [Replacement((branches[1].label,), "bypass", "linear",
                                                             "normalized", [("w", None)])],
                 tensors={"w": torch.zeros(32, 32)})
    with pytest.raises(RecipeMismatchError, match="features"):
        apply_recipe(ep, bad)


def test_removing_the_last_layer_of_a_post_ln_encoder(tokens):
    """The span ends at the program's output (BERT's final LayerNorm): the returned node changes,
    and the program must still validate and return the stream after the layer before."""
    model, ep = captured("bert", layers=3)
    branches = find_branches(ep)
    last = [b for b in branches if b.layer == 2]
    recipe = Recipe("test", branch_records(branches),
                    [Replacement(tuple(b.label for b in last), "remove")], {})
    out = apply_recipe(ep, recipe).module()(*tokens)
    layers = model.encoder.layer
    with torch.no_grad():
        model.encoder.layer = layers[:2]
        try:
            expected = model(input_ids=tokens[0], attention_mask=tokens[1]).last_hidden_state
        finally:
            model.encoder.layer = layers
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
