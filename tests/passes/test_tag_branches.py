from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_manager import PassManager

from subfit_fx.passes import META_KEY, TagBranchesPass
from tests.conftest import captured


def test_tag_pass_annotates_without_changing_the_graph():
    _, ep = captured("llama")
    gm = ep.module()
    before = [(n.name, n.target) for n in gm.graph.nodes]
    tag = TagBranchesPass()
    result = PassManager([tag])(gm)
    assert not result.modified
    assert [(n.name, n.target) for n in result.graph_module.graph.nodes] == before
    assert len(tag.branches) == 4
    roles = {}
    for node in gm.graph.nodes:
        for t in node.meta.get(META_KEY, ()):
            roles.setdefault(t.label, set()).add(t.role)
    assert roles["model.layers.0.self_attn"] == {"skip", "normalized", "body", "output", "consumer"}
    ids = torch.randint(0, 128, (2, 5))
    assert torch.equal(gm(ids, torch.ones_like(ids)), ep.module()(ids, torch.ones_like(ids)))
