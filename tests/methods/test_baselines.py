"""The baselines (METHOD.md): budget, structure, selection rules, and exactness of ReplaceMe's fit."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import subfit_fx
from subfit_fx import capture, prepare
from subfit_fx.errors import InputError
from subfit_fx.fit import removal
from subfit_fx.methods.layers import (
    BaselineOptions,
    Layer,
    group_layers,
    record_stream_after,
    smallest_span,
    stream_statistics,
)
from subfit_fx.methods.replaceme import fit_block
from subfit_fx.selection import Candidate, select
from subfit_fx.zoo import tiny_model

CALIB = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
BATCHES = [(ids, torch.ones_like(ids)) for ids in CALIB.split(4)]
LAYER_METHODS = ("shortgpt", "uidl", "replaceme")
BRANCH_METHODS = ("llm-drop", "blockpruner")
TARGET = 0.25


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, layers=4) for arch in ("llama", "bert")}


@pytest.fixture(scope="module")
def compressed(models):
    cache = {}

    def get(arch, method):
        if (arch, method) not in cache:
            cache[arch, method] = subfit_fx.compress(models[arch], CALIB, TARGET, method=method, progress=False)
        return cache[arch, method]

    return get


def _layers(report):
    layers: dict[int, list[dict]] = {}
    for b in report.branches:
        layers.setdefault(b["layer"], []).append(b)
    return layers


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", LAYER_METHODS + BRANCH_METHODS)
def test_budget_and_structure(compressed, models, arch, method):
    torch.set_grad_enabled(False)
    c = compressed(arch, method)
    r, recipe = c.report, c.recipe
    layers = _layers(r)
    if method in LAYER_METHODS:
        unit = max(sum(b["params"] for b in bs) for bs in layers.values()) / r.block_params
    else:
        unit = max(b["params"] for b in r.branches) / r.block_params
    # net block sparsity reaches the target and overshoots by less than one unit of replacement
    assert TARGET - 0.015 <= r.sparsity_actual < TARGET + unit
    order = [b["label"] for b in r.branches]
    if method in LAYER_METHODS:
        for rep in recipe.replacements:
            covered = {b["layer"] for b in r.branches if b["label"] in rep.labels}
            whole = [b["label"] for k in sorted(covered) for b in layers[k]]
            assert list(rep.labels) == whole  # whole layers, in graph order
            assert sorted(covered) == list(range(min(covered), max(covered) + 1))  # contiguous
        if method == "shortgpt":  # one span per run of adjacent removed layers
            assert all(rep.action == "remove" for rep in recipe.replacements)
            runs = [rep.info["layers"] for rep in recipe.replacements]
            assert all(a[-1] + 1 < b[0] for a, b in itertools.pairwise(runs))
        else:
            assert len(recipe.replacements) == 1
        if method == "uidl":
            assert recipe.replacements[0].action == "remove"
        if method == "replaceme":
            rep = recipe.replacements[0]
            assert (rep.action, rep.form, rep.input) == ("bypass", "linear", "stream")
            width = models[arch].config.hidden_size
            assert r.bypass_params == width * width + width
            assert rep.info["fit_error"] <= rep.info["removal_error"]
    else:
        assert all(len(rep.labels) == 1 and rep.action == "remove" for rep in recipe.replacements)
        assert r.bypass_params == 0
    if arch == "llama" or method in BRANCH_METHODS:
        removed = sum(b["params"] for b in r.branches if b["replaced"])
        assert r.params_after == r.params_before - removed + r.bypass_params
    else:  # post-LN: removing whole layers also drops their LayerNorms (not counted as branch params)
        assert r.params_after <= r.params_before - r.sparsity_actual * r.block_params
    assert all(label in order for label in recipe.replaced_labels())
    ids = CALIB[:2]
    out = c.module()(ids, torch.ones_like(ids))
    assert out.shape[:2] == ids.shape and torch.isfinite(out).all()


def test_shortgpt_removes_lowest_block_influence(compressed):
    r = compressed("llama", "shortgpt").report
    bi = {k: bs[0]["scores"]["layer_block_influence"] for k, bs in _layers(r).items()}
    removed = {k for k, bs in _layers(r).items() if bs[0]["replaced"]}
    assert removed and max(bi[k] for k in removed) <= min(bi[k] for k in bi if k not in removed)


@pytest.mark.parametrize("method", ["uidl", "replaceme"])
def test_block_choice_has_smallest_distance(compressed, method):
    c = compressed("llama", method)
    rep = c.recipe.replacements[0]
    n = len(rep.info["layers"])
    key = f"span{n}_angular_distance"
    spans = {b["layer"]: b["scores"][key] for b in c.report.branches if key in b["scores"]}
    assert len(spans) == 4 - n + 1
    assert spans[rep.info["layers"][0]] == min(spans.values())


def test_llm_drop_removes_least_important_per_parameter(compressed):
    r = compressed("llama", "llm-drop").report
    rate = {b["label"]: b["scores"]["llm_drop_importance"] / b["params"] for b in r.branches}
    removed = [b["label"] for b in r.branches if b["replaced"]]
    cands = [Candidate(b["label"], b["scores"]["llm_drop_importance"], b["params"], 0) for b in r.branches]
    assert sorted(removed) == sorted(select(cands, r.block_params, TARGET))
    greedy = select(cands, r.block_params, TARGET, tolerance=1.0)  # before the budget repair
    assert max(rate[x] for x in greedy[:-1]) <= min(v for k, v in rate.items() if k not in greedy)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_blockpruner_first_step_is_least_harmful(compressed, arch):
    r = compressed(arch, "blockpruner").report
    alone = {b["label"]: b["scores"]["blockpruner_loss_increase_alone"] for b in r.branches}
    first = next(b["label"] for b in r.branches if b["scores"].get("blockpruner_step") == 1)
    assert alone[first] == min(alone.values())
    steps = sorted(b["scores"]["blockpruner_step"] for b in r.branches if b["replaced"])
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", ["shortgpt", "uidl"])
def test_layer_removal_equals_deleting_the_layers(compressed, models, arch, method):
    """The compressed graph equals the Hugging Face model with the removed layers deleted from its
    layer list (post-LN included: the stream after a layer is its LayerNorm output)."""
    torch.set_grad_enabled(False)
    c = compressed(arch, method)
    removed = sorted({b["layer"] for b in c.report.branches if b["replaced"]})
    model = copy.deepcopy(models[arch])
    layer_list = model.model.layers if arch == "llama" else model.encoder.layer
    for k in reversed(removed):
        del layer_list[k]
    ids = CALIB[:3]
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask)
    reference = out.logits if arch == "llama" else out.last_hidden_state
    assert torch.allclose(c.module()(ids, mask), reference, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", BRANCH_METHODS)
def test_branch_removal_rewrite_equals_session_removal(compressed, models, arch, method):
    """What the policies measure at run time (probe replacement) is what the rewrite builds."""
    torch.set_grad_enabled(False)
    c = compressed(arch, method)
    session = prepare(capture(models[arch]), progress=False)
    for label in c.recipe.replaced_labels():
        session.set_replacement(label, removal(torch.zeros(1, 1), 0.0, session.by_label[label].width))
    ids = CALIB[:3]
    assert torch.allclose(c.module()(ids, torch.ones_like(ids)), session.forward((ids, torch.ones_like(ids))),
                          atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_stream_after_layer_is_next_layer_input(models, arch):
    """The stream the statistics use after a layer (post-LN: the LayerNorm output) is exactly what
    the next layer reads."""
    torch.set_grad_enabled(False)
    session = prepare(capture(models[arch]), progress=False)
    layers = group_layers(session.branches)
    seen = []
    session.watch(BATCHES, lambda _label, x, _y: seen.append(x), labels=[layers[1].labels[0]])
    after = record_stream_after(session, BATCHES, layers[0].labels[-1])
    assert len(seen) == len(after) == len(BATCHES)
    for a, b in zip(after, seen):
        assert torch.allclose(a, b, atol=1e-6)


def test_branch_cosines_match_branch_stats_pre_ln(models):
    """Pre-LN, the hook statistics agree with the probes' own BranchStats (same tokens, padding out)."""
    torch.set_grad_enabled(False)
    session = prepare(capture(models["llama"]), progress=False)
    ids = CALIB[:4]
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # padding must be excluded from both
    stream = stream_statistics(session, [(ids, mask)], (1,), desc=None)
    stats = session.calibrate([(ids, mask)], desc=None)
    for label, s in stats.items():
        assert stream.cos(("branch", label)) == pytest.approx(s.mean("cos_sum"), abs=1e-9)
    ffn0 = session.branches[1].label
    assert stream.cos(("span", 0, 1)) != stream.cos(("branch", ffn0))  # a layer is not its last branch


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_replaceme_identity_block_is_exact(arch):
    """Layers 1-2 made identity (output projections zeroed): ReplaceMe picks them, fits x -> x
    (a zero residual map), and the compressed model equals the dense one."""
    torch.set_grad_enabled(False)
    model = tiny_model(arch, layers=4)
    for k in (1, 2):
        if arch == "llama":
            layer = model.model.layers[k]
            projections = [layer.self_attn.o_proj, layer.mlp.down_proj]
        else:
            layer = model.encoder.layer[k]
            projections = [layer.attention.output.dense, layer.output.dense]
        for proj in projections:
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    c = subfit_fx.compress(model, CALIB, TARGET, method="replaceme", progress=False)
    rep = c.recipe.replacements[0]
    assert rep.info["layers"] == [1, 2]
    weight, bias = (c.recipe.tensors[key] for key in rep.layers[0])
    assert weight.abs().max() < 1e-5 and bias.abs().max() < 1e-5
    ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(7))
    dense = capture(model).module()(ids, torch.ones_like(ids))
    assert torch.allclose(c.module()(ids, torch.ones_like(ids)), dense, atol=1e-5)


def test_replaceme_fit_recovers_affine_block():
    """GPT-2 layers 1-2 with zero output weights but random output biases map x -> x + c: the
    closed-form fit recovers W = 0 and b = c exactly (the bias is not regularized)."""
    torch.set_grad_enabled(False)
    model = tiny_model("gpt2", layers=4)
    gen = torch.Generator().manual_seed(3)
    shift = torch.zeros(64)
    for k in (1, 2):
        for proj in (model.transformer.h[k].attn.c_proj, model.transformer.h[k].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.copy_(torch.randn(64, generator=gen))
            shift += proj.bias
    session = prepare(capture(model), progress=False)
    fit, removal_error = fit_block(session, BATCHES, group_layers(session.branches)[1:3], lam=1e-3)
    (weight, bias), = fit.layers
    assert weight.abs().max() < 1e-5
    assert torch.allclose(bias.float(), shift, atol=1e-4)
    assert fit.error < 1e-8 * removal_error


@pytest.mark.parametrize("method", ["shortgpt", "replaceme"])
def test_span_recipes_save_and_reload_bitwise(compressed, models, method, tmp_path):
    torch.set_grad_enabled(False)
    c = compressed("bert", method)
    c.save(tmp_path / method)
    loaded = subfit_fx.load(tmp_path / method, model=models["bert"])
    assert loaded.recipe.replacements[0].labels == c.recipe.replacements[0].labels
    ids = CALIB[:2]
    assert torch.equal(loaded.module()(ids, torch.ones_like(ids)), c.module()(ids, torch.ones_like(ids)))


def test_parallel_residual_refused_by_layer_methods_fine_for_branch_methods():
    torch.set_grad_enabled(False)
    model = tiny_model("gpt_neox", layers=4)
    with pytest.raises(InputError, match="parallel residual"):
        subfit_fx.compress(model, CALIB, TARGET, method="uidl", progress=False)
    c = subfit_fx.compress(model, CALIB, TARGET, method="llm-drop", progress=False)
    assert c.report.sparsity_actual >= TARGET - 0.015
    session = prepare(capture(model), progress=False)
    for label in c.recipe.replaced_labels():
        session.set_replacement(label, removal(torch.zeros(1, 1), 0.0, session.by_label[label].width))
    ids = CALIB[:3]
    assert torch.allclose(c.module()(ids, torch.ones_like(ids)), session.forward((ids, torch.ones_like(ids))),
                          atol=1e-5)


def test_distance_over_all_tokens_option(compressed):
    c = subfit_fx.compress(tiny_model("llama", layers=4), CALIB, TARGET, method="uidl", progress=False,
                           distance_tokens="all")
    assert c.recipe.options["distance_tokens"] == "all" and c.report.sparsity_actual >= TARGET - 0.015


def test_smallest_span_and_options_validate():
    layers = [Layer(i, (f"a{i}", f"f{i}"), 10) for i in range(4)]
    assert smallest_span(layers, 40, 0.25) == (1, [0, 1, 2, 3])
    assert smallest_span(layers, 40, 0.25, cost=2) == (2, [0, 1, 2])
    with pytest.raises(InputError, match="lower sparsity"):
        smallest_span(layers, 40, 0.8, cost=20)
    with pytest.raises(InputError, match="distance_tokens"):
        BaselineOptions(distance_tokens="middle")
    with pytest.raises(InputError, match="eval_batches"):
        BaselineOptions(eval_batches=0)
