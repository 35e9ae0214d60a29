"""Width pruning (SAAP-style FFN channel blocks): inner statistics, the slim rewrite, compensation,
and the whole path to a saved directory, transformers and ONNX Runtime."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers as tf

import subfit_fx
from subfit_fx.branches import count_params
from subfit_fx.calibrate import Session, prepare
from subfit_fx.methods.hybrid import HybridOptions
from subfit_fx.methods.saap import SaapOptions, compensate
from subfit_fx.stats import InnerStats
from subfit_fx.zoo import tiny_model


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(arch, layers=4)


def _calib() -> torch.Tensor:
    return torch.randint(3, 120, (16, 24), generator=torch.Generator().manual_seed(0))


def _logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(ids, torch.ones_like(ids))


@pytest.mark.parametrize("arch", ["llama", "bert", "opt", "gpt_neox"])
def test_inner_statistics_equal_the_last_matmuls_input(arch):
    model = _model(arch)
    session = prepare(subfit_fx.capture(model), progress=False)
    ids = _calib()[:2]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # padding is left out
    stats = session.inner_stats([(ids, mask)])
    assert set(stats) == set(session.channel_sites)
    assert {b.label for b in session.branches if b.kind == "ffn"} <= set(stats)
    site = session.channel_sites[next(label for label in sorted(stats) if session.channel_sites[label].kind == "ffn")]
    seen = []
    module = model.get_submodule(site.last_weight.removeprefix("hf.").rsplit(".", 1)[0])
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    h = seen[0].reshape(-1, site.channels)[mask.reshape(-1).bool()].double()
    s = stats[site.label]
    assert int(s.tokens) == int(mask.sum())
    assert torch.allclose(s.sq, (h * h).sum(0))
    assert torch.allclose(s.gram[:-1, :-1], h.T @ h)


@pytest.mark.parametrize("arch", ["llama", "bert", "opt", "phi3"])
def test_slim_program_equals_the_model_with_dropped_channels_zeroed(arch):
    """compensation='none' keeps W[:, kept]: exactly the dense model with the other columns zero."""
    model = _model(arch)
    c = subfit_fx.compress(model, _calib(), 0.2, method="saap", compensation="none", block=16, progress=False)
    assert c.recipe.slimmed_labels() and not c.recipe.removed_attention_layers()
    assert abs(c.report.sparsity_actual - 0.2) < 0.05
    reference = copy.deepcopy(model)
    for r in c.recipe.replacements:
        last = reference.get_submodule(r.info["modules"][-1])
        keep = torch.zeros(r.info["channels"], dtype=torch.bool)
        keep[r.info["kept"]] = True
        with torch.no_grad():
            last.weight[:, ~keep] = 0
    ids = _calib()[:3]
    assert torch.allclose(_logits(c.module(), ids), _logits(subfit_fx.capture(reference).module(), ids), atol=1e-5)
    assert count_params(c.program) < count_params(subfit_fx.capture(model))


def test_refit_compensation_beats_bias_beats_none_on_the_statistics():
    torch.manual_seed(0)
    h = torch.randn(500, 8) @ torch.randn(8, 8) + 0.5  # correlated channels with a mean
    stats = InnerStats.empty(8, gram=True)
    stats.update(h)
    weight = torch.randn(4, 8)
    kept = torch.tensor([0, 2, 3, 5, 7])
    errors = {how: compensate(weight, None, stats, kept, how, 0.0)[2] for how in ("refit", "bias", "none")}
    assert errors["refit"] <= errors["bias"] <= errors["none"]
    w, b, err = compensate(weight, None, stats, kept, "refit", 0.0)
    direct = ((h.double() @ weight.double().T) - (h.double()[:, kept] @ w.double().T + b.double())).pow(2).sum(1).mean()
    assert abs(float(direct) - err) < 1e-6 * max(1.0, err)


def test_options_are_validated():
    with pytest.raises(subfit_fx.SubfitError, match="importance"):
        SaapOptions(importance="magic")
    with pytest.raises(subfit_fx.SubfitError, match="allocation"):
        SaapOptions(allocation="judge")
    with pytest.raises(subfit_fx.SubfitError, match="sensitivity_sequences"):
        SaapOptions(sensitivity_sequences=0)
    with pytest.raises(subfit_fx.SubfitError, match="max_layer_ratio"):
        SaapOptions(max_layer_ratio=1.5)
    from subfit_fx.methods.hybrid import HybridOptions

    for bad in ({"rounds": 0}, {"judge_sequences": 2.5}, {"rounds": True}, {"judge_sequences": None}):
        with pytest.raises(subfit_fx.SubfitError, match="must be a positive integer"):
            HybridOptions(**bad)
    assert HybridOptions().rounds is None  # 8 rounds from 12 layers on, else 4


@pytest.mark.parametrize("arch", ["llama", "bert", "phi3"])
def test_slimmed_directory_loads_in_subfit_fx_and_transformers(arch, tmp_path):
    model = _model(arch)
    c = subfit_fx.compress(model, _calib(), 0.2, method="saap", block=16, progress=False)
    out = c.save(tmp_path / "out")
    ids = _calib()[:2]
    ours = _logits(c.module(), ids)
    loaded = subfit_fx.load(out)
    assert torch.equal(_logits(loaded.module(), ids), ours)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    hf = cls.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    got = got.last_hidden_state if arch == "bert" else got.logits
    assert torch.allclose(got, ours, atol=1e-5)
    if arch == "phi3":  # the fused gate_up projection keeps the same rows of its gate and up halves
        r = c.recipe.replacements[0]
        assert r.info["chunks"] == [2]
        assert c.recipe.tensors[r.producers[0][0]].shape[0] == 2 * len(r.info["kept"])


def test_slimmed_model_exports_to_onnx_with_and_without_cache(tmp_path):
    """Both exports validate against the rewritten torch program (parity is enforced inside).

    On phi3, whose fused gate_up projection is slimmed in slices; a slimmed llama's KV-cache export
    is checked below, with pruned key/value groups (test_heads_prune_whole_key_value_groups...)."""
    from subfit_fx.exporters.kv_cache import export_onnx_kv
    from subfit_fx.exporters.onnx_export import export_onnx

    c = subfit_fx.compress(_model("phi3"), _calib(), 0.2, method="saap", block=16, progress=False)
    plain = export_onnx(c, tmp_path / "plain.onnx")
    cached = export_onnx_kv(c, tmp_path / "kv.onnx")
    assert plain.parity is not None and cached.parity is not None
    dense = export_onnx(_model("phi3"), tmp_path / "dense.onnx", validate=False)
    assert plain.bytes < dense.bytes


def test_hybrid_share_replaces_branches_and_slims_the_kept_ffns_under_one_budget():
    model = _model("llama")
    c = subfit_fx.compress(model, _calib(), 0.3, method="hybrid", strategy="share", share=0.5, block=16,
                           progress=False)
    actions = {r.labels[0]: r.action for r in c.recipe.replacements}
    assert "slim" in actions.values() and {"remove", "bypass"} & set(actions.values())
    assert abs(c.report.sparsity_actual - 0.3) <= 0.015, c.report.notes
    slimmed, replaced = set(c.recipe.slimmed_labels()), set(c.recipe.replaced_labels())
    assert slimmed < replaced  # a branch is either replaced or slimmed, never both
    # SubFit's part alone, at its share of the budget, is what the hybrid's replacements are
    ids = _calib()[:2]
    dense = _logits(subfit_fx.capture(model).module(), ids)
    assert not torch.allclose(_logits(c.module(), ids), dense)


def test_cli_compresses_with_width_pruning_options(tmp_path):
    from subfit_fx.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "out"
    argv = ["compress", "builtin:llama", "--calib", str(calib), "--samples", "8", "--seq-len", "32",
            "--method", "saap", "--block", "16", "--compensation", "bias", "--no-fluctuation", "--compounding", "mean",
            "--out", str(out)]
    assert main(argv) == 0
    recipe = subfit_fx.recipe.Recipe.load(out)
    assert recipe.method == "saap" and recipe.options["compensation"] == "bias"
    assert recipe.options["compounding"] == "mean"
    assert recipe.options["fluctuation"] is False and recipe.slimmed_labels()
    assert main([*argv[:-2], "--importance", "magic", "--out", str(tmp_path / "o2")]) == 2


def test_flap_drops_single_channels_by_standardized_fluctuation_with_bias_compensation():
    model = _model("llama")
    c = subfit_fx.compress(model, _calib(), 0.2, method="flap", progress=False)
    assert c.recipe.method == "flap" and c.recipe.options["block"] == 1 and c.recipe.options["standardize"]
    assert abs(c.report.sparsity_actual - 0.2) < 0.02, c.report.notes
    state = subfit_fx.capture(model).state_dict
    sizes = set()
    for r in c.recipe.replacements:
        assert r.action == "slim"
        kept = torch.tensor(r.info["kept"])
        sizes.add(r.info["channels"] - len(kept))
        # bias compensation keeps the kept columns of the output projection as they are
        last = state[f"hf.{r.info['modules'][-1]}.weight"]
        assert torch.equal(c.recipe.tensors[r.layers[0][0]], last[:, kept])
        assert c.recipe.tensors[r.layers[0][1]].shape == (last.shape[0],)
    # single channels, not blocks of 64: the counts dropped per layer are not multiples of a block
    assert any(n % 16 for n in sizes)


def test_joint_hybrid_gives_each_branch_one_option_at_the_budget():
    model = _model("llama")
    c = subfit_fx.compress(model, _calib(), 0.3, method="hybrid", strategy="joint", block=16, progress=False)
    assert c.recipe.options["strategy"] == "joint"
    labels = [r.labels[0] for r in c.recipe.replacements]
    assert len(labels) == len(set(labels)) and c.recipe.slimmed_labels()
    assert abs(c.report.sparsity_actual - 0.3) <= 0.015, c.report.notes
    # every branch's judged options are in the report: fits, removal and slimming levels of FFNs
    judged = next(b["scores"] for b in c.report.branches if b["label"] == "model.layers.1.mlp")
    assert {"judged_fit", "judged_remove"} <= set(judged) and any(k.startswith("judged_slim:") for k in judged)


def test_joint_hybrid_without_replacements_only_slims_ffns_chosen_by_the_output_judge():
    model = _model("llama")
    c = subfit_fx.compress(model, _calib(), 0.3, method="hybrid", block=16, replace=False, progress=False)
    assert {r.action for r in c.recipe.replacements} == {"slim"}
    assert all(label.endswith(".mlp") for label in c.recipe.slimmed_labels())
    assert abs(c.report.sparsity_actual - 0.3) <= 0.015, c.report.notes
    judged = next(b["scores"] for b in c.report.branches if b["label"] == "model.layers.1.mlp")
    assert judged and all(k.startswith("judged_slim:") for k in judged if k.startswith("judged_"))
    with pytest.raises(subfit_fx.errors.InputError, match="replace=False needs"):
        subfit_fx.compress(model, _calib(), 0.3, method="hybrid", strategy="share", replace=False, progress=False)


@pytest.mark.parametrize("compensation", ["refit", "bias", "none"])
def test_a_slimming_judged_through_the_inner_input_equals_the_rewritten_model(compensation):
    """What the joint hybrid judges (h replaced by what the compensated slimming stands for) is
    what the rewrite builds."""
    from subfit_fx.branches import count_block_params
    from subfit_fx.methods.base import PolicyContext
    from subfit_fx.methods.saap import inner_map, slim_replacements, slimming_of
    from subfit_fx.recipe import Recipe, branch_records
    from subfit_fx.rewrite import apply_recipe

    ep = subfit_fx.capture(_model("llama"))
    session = prepare(ep, progress=False)
    ids = _calib()[:4]
    data = [(ids, torch.ones_like(ids))]
    ctx = PolicyContext(session, data, [], count_block_params(ep, session.branches), 0.2, True, {})
    label = "model.layers.1.mlp"
    stats = session.inner_stats(data, [label])[label]
    kept = torch.arange(0, session.channel_sites[label].channels, 3)
    opts = SaapOptions(compensation=compensation, ridge=0.0)
    replacements, tensors = slim_replacements(ctx, [slimming_of(ctx, label, stats, kept, opts)])
    rewritten = apply_recipe(ep, Recipe("saap", branch_records(ctx.branches), replacements, tensors)).module()
    a = inner_map(stats, kept, compensation, 0.0)
    mix, shift = a[:-1, :len(kept)].T.float(), a[:-1, len(kept)].float()
    session.set_inner_replacement(label, lambda h: h[..., kept] @ mix + shift)
    judged = session.forward(data[0])
    assert torch.allclose(judged, _logits(rewritten, ids), atol=1e-4)
    session.clear_replacements()
    assert not torch.allclose(session.forward(data[0]), judged, atol=1e-4)


def test_heads_prune_whole_key_value_groups_and_the_kv_cache_shrinks(tmp_path):
    """--heads: attention loses whole key/value groups; the directory loads in transformers and the
    KV-cache ONNX has per-layer cache shapes with the kept groups (parity enforced inside)."""
    import onnx

    from subfit_fx.exporters.kv_cache import export_onnx_kv

    model = _model("llama")  # 4 query heads in 2 key/value groups, head_dim 16
    # z-scores: on this random model the output metric prices every key/value group above the FFN blocks
    c = subfit_fx.compress(model, _calib(), 0.3, method="saap", heads=True, block=16, allocation="zscore",
                           progress=False)
    assert c.recipe.options["heads"] is True
    assert abs(c.report.sparsity_actual - 0.3) < 0.03, c.report.notes
    attention = {r.labels[0]: r for r in c.recipe.replacements if r.info["kind"] == "attention"}
    assert attention, "no attention branch was slimmed"
    for r in attention.values():
        assert r.info["kept_groups"] < r.info["groups"] == 2 and len(r.info["kept"]) == 32 * r.info["kept_groups"]
    kept_groups = [attention[f"model.layers.{j}.self_attn"].info["kept_groups"]
                   if f"model.layers.{j}.self_attn" in attention else 2 for j in range(4)]
    assert c.report.kv_fraction_kept == pytest.approx(sum(kept_groups) / 8)
    slimmed = [b for b in c.report.branches if b.get("form") == "slim"]
    assert all(0 < b["kept_ratio"] < 1 for b in slimmed) and "s" in c.report.selection_map()
    out = c.save(tmp_path / "out")
    ids = _calib()[:2]
    hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, _logits(c.module(), ids), atol=1e-5)
    assert torch.equal(_logits(subfit_fx.load(out).module(), ids), _logits(c.module(), ids))
    kv = export_onnx_kv(c, tmp_path / "kv.onnx")
    assert kv.parity is not None
    heads = {i.name: i.type.tensor_type.shape.dim[1].dim_value
             for i in onnx.load(tmp_path / "kv.onnx", load_external_data=False).graph.input}
    for layer in range(4):
        kept = attention[f"model.layers.{layer}.self_attn"].info["kept_groups"] \
            if f"model.layers.{layer}.self_attn" in attention else 2
        assert heads[f"past_key_values.{layer}.key"] == heads[f"past_key_values.{layer}.value"] == kept


def test_joint_hybrid_with_heads_judges_attention_slimming():
    model = _model("llama")
    c = subfit_fx.compress(model, _calib(), 0.3, method="hybrid", strategy="joint", heads=True, block=16,
                           progress=False)
    assert abs(c.report.sparsity_actual - 0.3) <= 0.015, c.report.notes
    judged = next(b["scores"] for b in c.report.branches if b["label"] == "model.layers.1.self_attn")
    assert "judged_slim:1/2" in judged and {"judged_fit", "judged_remove"} <= set(judged)


@pytest.mark.parametrize("method", ["saap", "hybrid"])
def test_width_pruning_on_the_layer_wise_pipeline_gives_the_same_recipe(method, tmp_path):
    from subfit_fx.pipelines import SessionFactory

    model = tiny_model("llama", layers=4)
    # the joint strategy's judge reruns segments (its equality is what this asserts); "output" runs whole passes
    opts = {"strategy": "joint"} if method == "hybrid" else {}
    basic = subfit_fx.compress(model, _calib(), 0.25, method, block=16, progress=False, **opts)
    # inner statistics one layer at a time, each finished layer's written to disk and mapped back
    layerwise = subfit_fx.compress(model, _calib(), 0.25, method, block=16, progress=False,
                                   session_factory=SessionFactory("sequential", offload=tmp_path), **opts)
    assert [r.labels for r in layerwise.recipe.replacements] == [r.labels for r in basic.recipe.replacements]
    assert any(r.action == "slim" for r in basic.recipe.replacements)
    for name, tensor in basic.recipe.tensors.items():
        assert torch.equal(layerwise.recipe.tensors[name], tensor), name



@pytest.mark.parametrize("grouping", ["sorted", "contiguous"])
def test_blocks_are_runs_of_channels_sorted_by_importance_or_index_ranges(grouping):
    from subfit_fx.methods.saap import channel_importance

    model, calib = _model("llama"), _calib()
    c = subfit_fx.compress(model, calib, 0.2, method="saap", block=8, importance="element", grouping=grouping,
                           allocation="zscore", progress=False)
    session = prepare(subfit_fx.capture(model), progress=False)
    stats = session.inner_stats([(calib, torch.ones_like(calib))])
    state = subfit_fx.capture(model).state_dict
    assert c.recipe.replacements
    for r in c.recipe.replacements:
        site = session.channel_sites[r.labels[0]]
        dropped = sorted(set(range(site.channels)) - set(r.info["kept"]))
        assert dropped and len(dropped) % 8 == 0
        if grouping == "sorted":  # exactly the least important channels, wherever they sit
            order = channel_importance(state[site.last_weight], stats[r.labels[0]]).argsort(stable=True)
            assert set(dropped) == set(order[:len(dropped)].tolist())
        else:  # whole index ranges
            assert set(dropped) == {j for k in {d // 8 for d in dropped} for j in range(8 * k, 8 * k + 8)}


@pytest.mark.parametrize("grouping", ["sorted", "contiguous"])
def test_output_allocation_spares_the_ffn_the_output_is_most_sensitive_to(grouping, monkeypatch):
    # the same statistics, one FFN's output metric made a million times larger: the knapsack moves
    # its blocks to the other FFNs and still lands on the budget
    model, calib = _model("llama"), _calib()

    def kept(c) -> dict[str, int]:
        assert abs(c.report.sparsity_actual - 0.25) <= 0.015, c.report.notes
        return {r.labels[0]: len(r.info["kept"]) for r in c.recipe.replacements}

    plain = kept(subfit_fx.compress(model, calib, 0.25, method="saap", block=16, grouping=grouping, progress=False))
    most = min(plain, key=plain.get)  # the FFN that lost most
    measure = Session.output_sensitivity

    def weighted(self, *args, **kwargs):
        return {label: f * (1e6 if label == most else 1.0) for label, f in measure(self, *args, **kwargs).items()}

    monkeypatch.setattr(Session, "output_sensitivity", weighted)
    spared = kept(subfit_fx.compress(model, calib, 0.25, method="saap", block=16, grouping=grouping, progress=False))
    assert most not in spared
    assert sum(spared.values()) <= sum(plain.values()) + 16  # the budget moved, it did not vanish


@pytest.mark.parametrize("compounding", ["midpoint", "mean"])
def test_compounding_measures_the_sensitivity_again_with_a_first_plan_in_place(compounding, monkeypatch):
    model, calib = _model("llama"), _calib()
    plain = subfit_fx.compress(model, calib, 0.25, method="saap", block=16, progress=False)
    measure, seen = Session.output_sensitivity, []

    def recording(self, batches, labels, **kwargs):
        labels = list(labels)
        seen.append({label for label, (_, inner) in zip(labels, self.replacements(labels)) if inner is not None})
        return measure(self, batches, labels, **kwargs)

    monkeypatch.setattr(Session, "output_sensitivity", recording)
    c = subfit_fx.compress(model, calib, 0.25, method="saap", block=16, compounding=compounding, progress=False)
    assert len(seen) == 2 and not seen[0] and seen[1]  # dense first, then with slimmings in place
    if compounding == "mean":  # the first plan is the plain one at the whole budget
        assert seen[1] == {r.labels[0] for r in plain.recipe.replacements}
    assert abs(c.report.sparsity_actual - 0.25) <= 0.015, c.report.notes
    with pytest.raises(subfit_fx.SubfitError, match="compounding"):
        SaapOptions(compounding="twice")


@pytest.mark.parametrize("heads", [None, False, True])
def test_attention_groups_join_the_output_allocation_by_default(heads, monkeypatch):
    # heads=None (default): the output allocation prices whole key/value groups with the FFN blocks;
    # explicit False keeps attention out, and z-scores never take it unless asked
    model, calib = _model("llama"), _calib()
    measure, priced = Session.output_sensitivity, []

    def recording(self, batches, labels, **kwargs):
        priced.append({label.rsplit(".", 1)[-1] for label in labels})
        return measure(self, batches, labels, **kwargs)

    monkeypatch.setattr(Session, "output_sensitivity", recording)
    options = {} if heads is None else {"heads": heads}
    c = subfit_fx.compress(model, calib, 0.3, method="saap", block=16, progress=False, **options)
    assert priced[0] == ({"mlp"} if heads is False else {"mlp", "self_attn"})
    assert abs(c.report.sparsity_actual - 0.3) <= 0.015, c.report.notes
    z = subfit_fx.compress(model, calib, 0.3, method="saap", block=16, allocation="zscore", progress=False,
                           **options)
    assert all(r.info["kind"] == "ffn" for r in z.recipe.replacements) or heads is True


def test_bypass_damage_is_the_bypass_error_in_the_output_metric():
    from subfit_fx.fit import Fit
    from subfit_fx.methods.hybrid import bypass_damage
    from subfit_fx.stats import BranchStats

    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = torch.tanh(z @ torch.randn(6, 6, generator=g, dtype=torch.float64)) + 0.3
    stats = BranchStats.empty(6, 6)
    stats.update(z, {"normalized": z}, y)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    metric = a @ a.T  # a positive semi-definite output metric
    moment = y.T @ y / len(y)
    layers = [(torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)),
              (torch.randn(6, 3, generator=g, dtype=torch.float64), None)]
    low_rank = Fit("lowrank", layers, 0.0, 0)
    for fit in (low_rank, Fit("remove", [], 0.0, 0, width_out=6)):
        e = y - fit.apply(z)
        direct = float(((e @ metric) * e).sum(1).mean())
        assert bypass_damage(fit, stats, "normalized", moment, metric) == pytest.approx(direct, rel=1e-9)


def test_output_hybrid_prices_every_option_and_gives_each_branch_one_at_the_budget():
    model = _model("llama")
    ids = _calib()[:2]
    for target in (0.3, 0.55):
        c = subfit_fx.compress(model, _calib(), target, method="hybrid", block=16, progress=False)  # the default
        assert c.recipe.options["strategy"] == "output"
        labels = [r.labels[0] for r in c.recipe.replacements]
        assert len(labels) == len(set(labels))  # one option per branch
        assert abs(c.report.sparsity_actual - target) <= 0.015, c.report.notes
        priced = next(b["scores"] for b in c.report.branches if b["label"] == "model.layers.1.mlp")
        assert {"priced_fit", "priced_remove"} <= set(priced) and priced["priced_fit"] <= priced["priced_remove"]
        assert torch.isfinite(_logits(c.module(), ids)).all()
    # at a deep cut, whole branches go next to slimmed ones
    assert {"slim"} < {r.action for r in c.recipe.replacements}
    # an option only the joint strategy reads selects it, or is refused next to strategy "output"
    assert HybridOptions(spans=2).strategy == "joint" and HybridOptions(replace=False).strategy == "joint"
    with pytest.raises(subfit_fx.errors.InputError, match=r"levels: read only by strategy 'joint'.* or drop it$"):
        HybridOptions(strategy="output", levels=(0.5,))
