"""Analysis pass: tag residual-branch nodes in `node.meta["subfit"]` (never mutates the graph).

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.zoo import tiny_model
    >>> gm = capture(tiny_model("llama")).module()
    >>> result = TagBranchesPass()(gm)
    >>> sorted({t.label for n in gm.graph.nodes for t in n.meta.get(META_KEY, ())})[0]
    'model.layers.0.mlp'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from subfit_fx.branches import Branch, analyze_graph, param_nodes_of_module

__all__ = ["META_KEY", "BranchTag", "TagBranchesPass"]

META_KEY = "subfit"


@dataclass(frozen=True)
class BranchTag:
    """What one node is to one branch. A node can carry several tags (a branch's consumer add
    is the next branch's skip input)."""

    label: str
    kind: str
    layer: int
    role: str  # "skip" | "normalized" | "body" | "output" | "consumer"


class TagBranchesPass(PassBase):
    """Find residual branches and write `BranchTag`s into `node.meta["subfit"]`.

    `param_nodes` maps parameter nodes to (name, numel); by default the pass reads the
    `get_attr` parameters of the GraphModule it runs on. The branches found by the last call
    are in `self.branches`.
    """

    def __init__(self, param_nodes: dict[str, tuple[str, int]] | None = None) -> None:
        super().__init__()
        self.param_nodes = param_nodes
        self.branches: list[Branch] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        params = self.param_nodes if self.param_nodes is not None else param_nodes_of_module(graph_module)
        self.branches = analyze_graph(graph_module.graph, params)
        nodes = {n.name: n for n in graph_module.graph.nodes}
        for node in nodes.values():
            node.meta.pop(META_KEY, None)
        for b in self.branches:
            roles = {name: "body" for name in b.body}
            roles.update({b.skip: "skip", b.output: "output", b.consumer: "consumer"})
            if b.normalized:
                roles[b.normalized] = "normalized"
            for name, role in roles.items():
                tags = nodes[name].meta.get(META_KEY, ())
                nodes[name].meta[META_KEY] = (*tags, BranchTag(b.label, b.kind, b.layer, role))
        return PassResult(graph_module, False)
