"""The default SubFit judges candidates at the model's output: it never picks a replacement that
judges worse than plain removal of the same branch, on causal LMs and encoders alike."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import subfit_fx
from subfit_fx.calibrate import prepare
from subfit_fx.capture import is_causal_lm
from subfit_fx.fit import removal
from subfit_fx.methods.base import OutputJudge
from subfit_fx.zoo import tiny_model


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(arch, layers=4)


def _calib(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(seed))


def _divergence(model: torch.nn.Module, held: torch.Tensor, replacements: dict) -> float:
    ep = subfit_fx.capture(model)
    session = prepare(ep, progress=False)
    judge = OutputJudge(session, [(held, torch.ones_like(held))], is_causal_lm(model))
    for label, fit in replacements.items():
        session.set_replacement(label, fit)
    return judge()


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(["llama", "gpt2", "bert", "qwen2"]), sparsity=st.sampled_from([0.2, 0.3, 0.4]),
       seed=st.integers(0, 3))
# found by this property: budget repair swapped in a fit judged in an early round although a later
# round found it dominated by removal
@example(arch="qwen2", sparsity=0.3, seed=3)
def test_default_is_judged_and_never_worse_than_removal(arch, sparsity, seed):
    model, calib = _model(arch), _calib(seed)
    c = subfit_fx.compress(model, calib, sparsity, "subfit", progress=False)
    assert c.recipe.options["judge"] == "output"
    scores = {b["label"]: b["scores"] for b in c.report.branches}
    for rep in c.recipe.replacements:
        label = rep.labels[0]
        assert "judged_remove" in scores[label]
        if rep.form != "remove":  # per branch: its judged form damages no more than removal
            assert scores[label]["judged"] <= scores[label]["judged_remove"]
    # the whole selection judges no worse than removing the same branches (same held-out sequences)
    held = calib[-4:]
    width = model.config.hidden_size
    removed = {rep.labels[0]: removal(torch.eye(2, dtype=torch.float64), 0.0, width)
               for rep in c.recipe.replacements}
    ours = _divergence_of_program(c, model, held)
    baseline = _divergence(model, held, removed)
    assert ours <= baseline * (1 + 1e-6) + 1e-9, c.report.notes


def _divergence_of_program(c, model, ids: torch.Tensor) -> float:
    """Divergence of the compressed program from the dense model, measured like the judge."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        dense = subfit_fx.capture(model).module()(ids, mask)
        out = c.module()(ids, mask)
    if is_causal_lm(model):
        ref = torch.log_softmax(dense.flatten(0, 1).float(), -1)
        got = torch.log_softmax(out.flatten(0, 1).float(), -1)
        return float((ref.exp() * (ref - got)).sum()) / ref.shape[0]
    return float(((out - dense).double() ** 2).sum() / (dense.double() ** 2).sum())


def test_output_judge_is_zero_for_dense_and_positive_after_removal():
    model = _model("llama")
    ids = _calib(0)[:4]
    session = prepare(subfit_fx.capture(model), progress=False)
    judge = OutputJudge(session, [(ids, torch.ones_like(ids))], causal=True)
    assert judge() == pytest.approx(0.0, abs=1e-7)
    session.set_replacement("model.layers.1.mlp", removal(torch.eye(2, dtype=torch.float64), 0.0, 64))
    assert judge() > 1e-6
    assert judge.calls == 2


def test_output_judge_counts_forwards_that_scale_with_branches():
    """Forwards of the judge stay near F * (n + (rounds - 1) * shortlist), far below n^2."""
    model = tiny_model("llama", layers=8)
    c = subfit_fx.compress(model, _calib(1), 0.3, "subfit", progress=False, rounds=3)
    note = next(n for n in c.report.notes if n.startswith("output judge:"))
    forwards = int(note.split()[2])
    n = 16
    assert forwards < n * n / 2
    assert forwards >= 2 * n  # every branch judged at least once with both forms


def test_options_are_validated():
    with pytest.raises(subfit_fx.errors.InputError, match="judge="):
        subfit_fx.compress(_model("llama"), _calib(0), 0.25, "subfit", progress=False, judge="vibes")
    with pytest.raises(subfit_fx.errors.InputError, match="rounds="):
        subfit_fx.compress(_model("llama"), _calib(0), 0.25, "subfit", progress=False, rounds=0)
    with pytest.raises(subfit_fx.errors.InputError, match="judge='statistics'"):
        subfit_fx.compress(_model("llama"), _calib(0), 0.25, "subfit", progress=False, rescore_every=2)


def test_knapsack_is_the_default_selection_and_greedy_stays_an_option():
    model, calib = _model("llama"), _calib(2)
    knapsack = subfit_fx.compress(model, calib, 0.3, "subfit", progress=False)
    greedy = subfit_fx.compress(model, calib, 0.3, "subfit", progress=False, selection="greedy")
    assert (knapsack.recipe.options["selection"], greedy.recipe.options["selection"]) == ("knapsack", "greedy")
    # the knapsack plans inside the budget window; greedy may land anywhere the repair allows
    assert 0.3 <= knapsack.report.sparsity_actual <= 0.3 + 0.015 + 1e-9, knapsack.report.notes
    assert abs(greedy.report.sparsity_actual - 0.3) <= 0.015 + 1e-9
    with pytest.raises(subfit_fx.errors.InputError, match="selection="):
        subfit_fx.compress(model, calib, 0.3, "subfit", progress=False, selection="best")


def test_context_gain_term_is_the_gain_lost_when_attention_is_gone():
    """Without any attention a position never sees the passage before it, so the context gain is
    exactly 0 and the judge adds `context` x the dense model's gain; the dense model judges 0."""
    model = _model("llama")
    ids = _calib(2)[:4]
    session = prepare(subfit_fx.capture(model), progress=False)
    plain = OutputJudge(session, [(ids, torch.ones_like(ids))], causal=True)
    judge = OutputJudge(session, [(ids, torch.ones_like(ids))], causal=True, context=2.0)
    assert judge() == pytest.approx(0.0, abs=1e-7)
    assert abs(judge.reference_gain) > 1e-5  # random attention already reads the passage
    width = model.config.hidden_size
    for layer in range(4):
        session.set_replacement(f"model.layers.{layer}.self_attn",
                                removal(torch.eye(2, dtype=torch.float64), 0.0, width))
    added = judge() - plain()
    assert added == pytest.approx(2.0 * max(0.0, judge.reference_gain), rel=1e-4, abs=1e-7)


def test_context_gain_needs_two_unpadded_sequences():
    from subfit_fx.errors import InputError
    from subfit_fx.methods.base import context_batch

    ids = _calib(0)[:2]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with pytest.raises(InputError, match="context=0"):
        context_batch([(ids, mask)])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True])
def test_judge_context_option_is_validated(bad):
    from subfit_fx.errors import InputError
    from subfit_fx.methods.subfit import SubfitOptions

    with pytest.raises(InputError, match="judge_context"):
        SubfitOptions(judge_context=bad)
