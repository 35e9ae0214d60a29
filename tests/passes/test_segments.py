from __future__ import annotations

import pytest
import torch

from subfit_fx.calibrate import REMOVE, ResumableForward, prepare
from subfit_fx.passes.segments import graph_output, initial_values, run_segment, split_graph
from tests.conftest import captured


def inputs():
    torch.manual_seed(0)
    ids = torch.randint(3, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask feeds every layer
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "qwen2", "gemma"])
def test_segments_in_order_compute_the_graph_bitwise(arch):
    _, ep = captured(arch, 3)
    gm = ep.module()
    adds = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    segments = split_graph(gm, adds[1::2], tail=True)
    values = initial_values(gm, inputs())
    for segment in segments:
        run_segment(segment, values)
        assert all(name in values for name in segment.outputs)
    assert sorted(values) == ["output:0"]  # every intermediate value was dropped after its last reader
    assert torch.equal(graph_output(gm, values), gm(*inputs()))
    # parameters are read from the original module, not copied
    param = dict(gm.named_parameters()) | dict(gm.named_buffers())
    with_params = [s for s in segments if s.params]
    assert len(with_params) >= 2
    assert all(getattr_path(s.module, p) is param[p] for s in with_params for p in s.params)


def getattr_path(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def test_without_a_tail_nothing_after_the_last_cut_runs_and_bad_cuts_are_refused():
    _, ep = captured("llama", 2)
    gm = ep.module()
    adds = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    (segment,) = split_graph(gm, [adds[1]])
    assert not any(p.startswith("hf.lm_head") or "layers.1." in p for p in segment.params)
    assert adds[1] in segment.outputs or segment.outputs == ()
    with pytest.raises(ValueError, match="no node named 'nope'"):
        split_graph(gm, ["nope"])
    with pytest.raises(ValueError, match="takes 2 inputs"):
        initial_values(gm, (torch.ones(1, 2),))


def test_resumable_forward_restarts_at_a_branch_with_outputs_equal_to_full_forwards():
    _, ep = captured("llama", 3)
    session = prepare(ep, progress=False)
    batch = inputs()
    run = session.resumable([batch])
    order = session.execution_order()
    (dense,) = run.forward_all()
    assert torch.equal(dense, session.forward(batch))
    session.set_replacement(order[3], REMOVE)
    (tail,) = run.forward_from(order[3])
    assert torch.equal(tail, session.forward(batch)) and not torch.equal(tail, dense)
    session.set_replacement(order[1], REMOVE)  # an earlier branch changed: the saved values are stale
    with pytest.raises(ValueError, match="call forward_all"):
        run.forward_from(order[3])
    (both,) = run.forward_all()
    assert torch.equal(both, session.forward(batch))
    session.clear_replacements()
    (back,) = run.forward_from(order[0])
    assert torch.equal(back, dense)


def test_resumable_forward_keeps_fewer_restart_points_under_a_memory_cap():
    _, ep = captured("llama", 3)
    session = prepare(ep, progress=False)
    batch = inputs()
    order = session.execution_order()
    stream = 2 * 9 * 64 * 4  # bytes of one (2, 9, 64) float32 stream
    run = ResumableForward(session, [batch], max_bytes=3 * stream)
    run.forward_all()
    assert 1 < run.every < len(order)
    # thinned as the first forward runs, not after: at most the cap plus the tables of the first point
    assert run.peak_bytes <= 3 * stream + stream
    session.set_replacement(order[-1], REMOVE)
    (tail,) = run.forward_from(order[-1])  # restarts at the nearest kept point before it
    assert torch.equal(tail, session.forward(batch))
