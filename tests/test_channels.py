"""Channel sites of attention branches (whole key/value groups): where they are found, and the
rewrite that narrows them against module-level slicing of the same model."""

from __future__ import annotations

import functools

import pytest
import torch

import subfit_fx
from subfit_fx.branches import count_params, find_branches, param_nodes_of_program
from subfit_fx.channels import ChannelSite, find_channel_sites
from subfit_fx.eager import slim_modules
from subfit_fx.recipe import Recipe, Replacement, branch_records
from subfit_fx.rewrite import apply_recipe
from subfit_fx.zoo import tiny_model

SLICEABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "bert"]


@functools.cache
def _captured(arch: str) -> tuple[torch.nn.Module, torch.export.ExportedProgram]:
    model = tiny_model(arch, layers=2)
    return model, subfit_fx.capture(model)


def _attention_sites(ep: torch.export.ExportedProgram) -> dict[str, ChannelSite]:
    return find_channel_sites(ep.graph, find_branches(ep), param_nodes_of_program(ep), kinds=("attention",))


def _slim_recipe(ep: torch.export.ExportedProgram, site: ChannelSite, groups: list[int]) -> Recipe:
    """Keep the key/value groups `groups` of `site`'s branch, weights sliced, nothing refitted."""
    kept = torch.cat([torch.arange(g * site.unit, (g + 1) * site.unit) for g in groups])
    state, tensors, producers = ep.state_dict, {}, []
    for j, ((w, b), rows) in enumerate(zip(site.producers, site.producer_rows(kept))):
        tensors[f"p{j}.weight"] = state[w][rows].clone()
        if b:
            tensors[f"p{j}.bias"] = state[b][rows].clone()
        producers.append((f"p{j}.weight", f"p{j}.bias" if b else None))
    tensors["out.weight"] = state[site.last_weight][:, kept].clone()
    if site.last_bias:
        tensors["out.bias"] = state[site.last_bias].clone()
    modules = [key.removeprefix("hf.").rsplit(".", 1)[0] for key, _ in (*site.producers, (site.last_weight, None))]
    info = {"kept": kept.tolist(), "channels": site.channels, "modules": modules, "kind": "attention",
            "groups": site.units, "kept_groups": len(groups)}
    r = Replacement((site.label,), "slim", "slim", "inner", [("out.weight", "out.bias" if site.last_bias else None)],
                    info, producers)
    return Recipe("manual", branch_records(find_branches(ep)), [r], tensors)


def _output(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _program_output(ep: torch.export.ExportedProgram, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ep.module()(ids, torch.ones_like(ids))


@pytest.mark.parametrize("arch", SLICEABLE)
def test_attention_sites_are_whole_key_value_groups(arch):
    model, ep = _captured(arch)
    sites = _attention_sites(ep)
    assert len(sites) == 2
    site = next(iter(sites.values()))
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = site.channels // heads
    assert site.units == kv and site.unit == heads // kv * head_dim
    assert site.producer_unit == (heads // kv * head_dim, head_dim, head_dim)
    assert site.producers[0][0].rsplit(".", 2)[-2] in ("q_proj", "query")


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox", "gemma2"])
def test_fused_or_normed_attention_has_no_site(arch):
    """Fused qkv (Phi-3, GPT-NeoX), Conv1D addmm (GPT-2), a norm after the output (Gemma2): refused."""
    _, ep = _captured(arch)
    assert _attention_sites(ep) == {}


@pytest.mark.parametrize("arch", SLICEABLE)
def test_keeping_every_group_is_bitwise_the_identity(arch):
    _, ep = _captured(arch)
    site = next(iter(_attention_sites(ep).values()))
    slim = apply_recipe(ep, _slim_recipe(ep, site, list(range(site.units))))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_program_output(slim, ids), _program_output(ep, ids))


@pytest.mark.parametrize("arch", SLICEABLE)
def test_graph_slicing_equals_module_slicing(arch):
    """The rewrite narrows heads inside the captured graph (view/reshape/expand literals); the same
    recipe applied to the eager modules (what transformers does on load) gives the same output."""
    model, ep = _captured(arch)
    for site in _attention_sites(ep).values():
        recipe = _slim_recipe(ep, site, [site.units - 1])  # the last group only
        slim = apply_recipe(ep, recipe)
        assert count_params(slim) < count_params(ep)
        eager, rest = slim_modules(model, recipe)
        assert rest.replacements == [] and eager is not model
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
        got, want = _program_output(slim, ids), _output(eager, ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
        assert not torch.allclose(got, _output(model, ids), atol=1e-4)  # something was really dropped


def test_grouped_query_slicing_keeps_each_groups_query_heads_with_its_key_value_head():
    _, ep = _captured("llama")  # 4 query heads, 2 key/value heads
    site = _attention_sites(ep)["model.layers.0.self_attn"]
    head_dim = site.producer_unit[1]
    rows = site.producer_rows(torch.arange(site.unit, 2 * site.unit))  # group 1
    assert rows[0].tolist() == list(range(2 * head_dim, 4 * head_dim))  # query heads 2 and 3
    assert rows[1].tolist() == rows[2].tolist() == list(range(head_dim, 2 * head_dim))  # key/value head 1
    with pytest.raises(ValueError, match="whole key/value groups"):
        site.producer_rows(torch.arange(1, site.unit + 1))


def test_program_with_a_kv_cache_reader_has_no_attention_site():
    """In the KV-cache capture the keys also feed `present`: slicing there would change an output,
    so such captures are narrowed at the module level first (`slim_modules`)."""
    from subfit_fx.exporters.kv_cache import capture_with_cache

    model, _ = _captured("llama")
    cap = capture_with_cache(model)
    assert _attention_sites(cap.program) == {}
