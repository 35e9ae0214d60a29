from __future__ import annotations

import importlib
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import subfit_fx.calibrate
from subfit_fx.branches import count_block_params
from subfit_fx.calibrate import prepare
from subfit_fx.errors import InputError
from subfit_fx.fit import removal
from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.subfit import subfit
from subfit_fx.pipelines import SessionFactory, layer_groups, sequential_calibrate, stats_nbytes
from subfit_fx.pipelines.cli import main
from subfit_fx.scores import rotation
from subfit_fx.stats import BranchStats
from tests.conftest import captured
from tests.pipelines.conftest import batches, flat

LAYERS = 8
ONE_BRANCH = stats_nbytes(BranchStats.empty(64, 64))  # (65*65 + 65*64 + 7) * 8 bytes


class LiveStatsMeter:
    """Measures, independently of the pipeline's own accounting, the bytes of accumulating
    statistics alive at once: every `BranchStats.empty` (how probes make their accumulators) is
    tracked by a weak reference, and the live ones are summed at every `update`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.refs: list[weakref.ref] = []
        self.peak = 0
        empty, update = BranchStats.empty.__func__, BranchStats.update

        def tracked_empty(cls, *args, **kwargs):
            stats = empty(cls, *args, **kwargs)
            self.refs.append(weakref.ref(stats))
            return stats

        def tracked_update(stats, *args, **kwargs):
            update(stats, *args, **kwargs)
            live = [s for s in (r() for r in self.refs) if s is not None]
            self.peak = max(self.peak, sum(stats_nbytes(s) for s in live))

        monkeypatch.setattr(BranchStats, "empty", classmethod(tracked_empty))
        monkeypatch.setattr(BranchStats, "update", tracked_update)

    def reset(self) -> None:
        self.refs, self.peak = [], 0


def test_sequential_pipeline_holds_one_layer_of_statistics_and_matches_all_at_once(monkeypatch, tmp_path):
    _, ep = captured("llama", LAYERS)
    session = prepare(ep, progress=False)
    data = batches()
    meter = LiveStatsMeter(monkeypatch)
    dense = flat(session.calibrate(data, desc=None))  # copies: the meter must not see these alive
    basic_peak = meter.peak

    meter.reset()
    result = sequential_calibrate(session, data, offload=tmp_path, desc=None)
    assert basic_peak == 2 * LAYERS * ONE_BRANCH
    assert meter.peak == 2 * ONE_BRANCH == result.peak_bytes  # one layer: attention + FFN
    assert meter.peak * LAYERS <= basic_peak
    assert result.all_at_once_bytes == result.offloaded_bytes == basic_peak
    assert result.forward_cost == pytest.approx(1.0)  # each layer runs once, nothing after the last probe
    assert list(tmp_path.iterdir()) == []  # offloaded files were unlinked once mapped
    # No replacement active: the same tokens in the same order, so bitwise the same statistics.
    assert flat(result.stats).keys() == dense.keys()
    for label, tensors in flat(result.stats).items():
        assert all(torch.equal(t, dense[label][k]) for k, t in tensors.items()), label

    # Compact results only (the Gram matrices are dropped after each layer).
    meter.reset()
    scores = sequential_calibrate(session, data, reduce=lambda _label, s: rotation(s), desc=None)
    assert meter.peak == 2 * ONE_BRANCH and scores.stats == {}
    assert scores.results == pytest.approx({label: float(t["scalar.angle_sum"] / t["tokens"])
                                            for label, t in dense.items()}, rel=1e-12)
    # Kept in memory instead: the pipeline says so (its peak grows to everything).
    kept = sequential_calibrate(session, data, layers_per_pass=4, desc=None)
    assert kept.peak_bytes == kept.all_at_once_bytes == basic_peak and len(kept.groups) == 2


@pytest.mark.parametrize("options", [{}, {"judge": "statistics", "sequential": True, "rescore_every": 3}])
def test_subfit_policy_gives_the_same_scores_and_recipe_on_the_sequential_session(options, tmp_path):
    _, ep = captured("llama", LAYERS)
    data = batches()

    def run(session):
        ctx = PolicyContext(session, data, [], count_block_params(ep, session.branches), 0.25, True, dict(options))
        return ctx, subfit(ctx)

    ctx_basic, basic = run(prepare(ep, progress=False))
    seq = SessionFactory("sequential", offload=tmp_path)(ep, progress=False)
    ctx_seq, recipe = run(seq)
    assert ctx_seq.scores == ctx_basic.scores  # every score of every branch, exactly
    assert recipe.replaced_labels() == basic.replaced_labels() != []
    assert recipe.tensors.keys() == basic.tensors.keys()
    assert all(torch.equal(recipe.tensors[k], basic.tensors[k]) for k in basic.tensors)
    history = seq.pipeline.history
    assert history[0]["peak_bytes"] == 2 * ONE_BRANCH
    # re-scoring and sequential refits go through the sequential session too
    assert len(history) > 1 if options else len(history) == 1


def test_replacements_set_between_layers_feed_the_next_layers():
    _, ep = captured("llama", LAYERS)
    session = prepare(ep, progress=False)
    data = batches()
    groups = layer_groups(session.branches)
    attention0 = groups[0][0]
    remove = removal(torch.eye(65, dtype=torch.float64), 0.0, 64)

    def on_group(labels, _stats):
        if attention0 in labels:
            session.set_replacement(attention0, remove)

    result = sequential_calibrate(session, data, groups[0] + groups[1], on_group=on_group, desc=None)
    # layers 0 and 1 once, and layer 0 again after its attention was replaced
    assert result.forward_cost == pytest.approx((4 + 2) / (2 * LAYERS))
    compressed = flat(session.calibrate(data, groups[1], desc=None))  # attention 0 still removed
    session.clear_replacements()
    dense = flat(session.calibrate(data, groups[0] + groups[1], desc=None))
    got = flat(result.stats)
    for label in groups[0]:  # observed before the replacement was set
        assert all(torch.equal(t, dense[label][k]) for k, t in got[label].items())
    for label in groups[1]:  # observed with layer 0's attention removed
        assert all(torch.equal(t, compressed[label][k]) for k, t in got[label].items())
        assert not torch.equal(got[label]["gram.normalized"], dense[label]["gram.normalized"])


class WeightUses(TorchDispatchMode):
    """Counts, independently of the pipeline, how often each parameter of a module is read by an
    aten op (a layer that runs twice reads its weights twice)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.names = {p.untyped_storage().data_ptr(): name for name, p in module.named_parameters()}
        self.uses: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.names:
                self.uses[self.names[a.untyped_storage().data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def test_layerwise_pipeline_runs_each_layer_once_with_statistics_equal_to_the_basic_pipeline():
    _, ep = captured("llama", LAYERS)
    session = prepare(ep, progress=False)
    data = batches()
    module = ep.module()
    with WeightUses(module) as one_forward:  # the plain captured model, once over the batches
        for ids, mask in data:
            module(ids, mask)
    with WeightUses(session._module) as layerwise:
        result = sequential_calibrate(session, data, desc=None)
    layers = {name: n for name, n in one_forward.uses.items() if ".layers." in name}
    assert len(layers) == 9 * LAYERS and all(n > 0 for n in layers.values())
    assert {name: layerwise.uses[name] for name in layers} == layers  # every layer exactly once
    assert layerwise.uses["hf.lm_head.weight"] == 0  # nothing after the last layer's probes
    dense = flat(session.calibrate(data, desc=None))
    for label, tensors in flat(result.stats).items():
        assert all(torch.equal(t, dense[label][k]) for k, t in tensors.items()), label
    # groups out of the graph's order are refused before anything runs
    groups = layer_groups(session.branches)
    with pytest.raises(ValueError, match="follow the graph's order"):
        next(session.observe_layerwise(data, [groups[1], groups[0]]))


def test_layer_groups_reject_unknown_labels_and_bad_sizes():
    _, ep = captured("llama", LAYERS)
    branches = prepare(ep, progress=False).branches
    assert [len(g) for g in layer_groups(branches, layers_per_pass=3)] == [6, 6, 4]
    with pytest.raises(InputError, match="no branch labelled 'nope'"):
        layer_groups(branches, ["nope"])
    with pytest.raises(InputError, match="layers_per_pass"):
        layer_groups(branches, layers_per_pass=0)


def test_cli_compresses_on_the_sequential_pipeline_in_one_process(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    code = main(["compress", "builtin:llama", "--calib", str(text), "--samples", "4", "--seq-len", "16",
                 "--batch-size", "2", "--sparsity", "0.25", "--out", str(out), "--method", "subfit",
                 "--pipeline", "sequential",
                 "--offload", str(scratch)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert (out / "recipe.json").is_file() and (out / "report.json").is_file()
    assert "sequential pipeline: 4 passes" in printed
    assert list(Path(scratch).iterdir()) == []
    # the bridge put prepare back (the package attribute `subfit_fx.compress` is the function)
    assert importlib.import_module("subfit_fx.compress").prepare is subfit_fx.calibrate.prepare
    assert main(["compress", "builtin:llama", "--calib", str(text), "--out", str(tmp_path / "o2"),
                 "--offload", str(scratch)]) == 2  # offload without the sequential pipeline


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_inner_statistics_layer_by_layer_equal_one_pass_and_offload_to_disk(arch, tmp_path, monkeypatch):
    from subfit_fx.calibrate import Session
    from subfit_fx.pipelines import LayerByLayer
    from subfit_fx.stats import InnerStats

    _, ep = captured(arch, layers=3)
    data = batches(3)
    one_pass = prepare(ep, progress=False).inner_stats(data)
    session = Session(ep, prepare(ep, progress=False).branches, progress=False,
                      pipeline=LayerByLayer(offload=tmp_path))
    live: list[weakref.ref] = []
    empty = InnerStats.empty.__func__

    def tracked(cls, *args, **kwargs):
        made = empty(cls, *args, **kwargs)
        live.append(weakref.ref(made))
        return made

    with monkeypatch.context() as patch:
        patch.setattr(InnerStats, "empty", classmethod(tracked))
        alive = []
        for stats in session.observe_inner_layerwise(data, layer_groups(session.branches, list(one_pass))):
            alive.append(sum(ref() is not None for ref in live))
            del stats
    assert len(alive) == 3 and max(alive) <= 2  # one layer's accumulators at a time, never all six
    layerwise = session.inner_stats(data)
    assert sorted(layerwise) == sorted(one_pass)
    for label, stats in one_pass.items():
        for key, tensor in stats.tensors().items():
            assert torch.equal(tensor, layerwise[label].tensors()[key]), (label, key)
    assert list(tmp_path.iterdir()) == []  # offloaded files were unlinked once mapped, the scratch removed
