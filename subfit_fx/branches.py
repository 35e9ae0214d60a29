"""Structural discovery of residual branches (attention / FFN) in a captured graph.

A residual branch is the sub-graph between a stream node x (the skip input of a residual add)
and the add's other input y = f(x), where f contains at least one matmul. Discovery uses graph
structure only; module names give labels, never decisions.

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.zoo import tiny_model
    >>> branches = find_branches(capture(tiny_model("llama", layers=2)))
    >>> [(b.layer, b.kind, b.label) for b in branches][:2]
    [(0, 'attention', 'model.layers.0.self_attn'), (0, 'ffn', 'model.layers.0.mlp')]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from subfit_fx.capture import WRAPPED_PREFIX
from subfit_fx.errors import NoBranchesError

__all__ = [
    "Branch", "analyze_graph", "count_block_params", "count_params", "find_branches",
    "param_nodes_of_module", "param_nodes_of_program",
]

aten = torch.ops.aten

MATMUL_OPS = {
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.matmul.default, aten.baddbmm.default, aten.einsum.default, aten.conv1d.default,
}
ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default, aten._softmax.default, aten.softmax.int,
    aten._safe_softmax.default,
}
# Ops that only reshape or re-type their input: walked through to find the normalized input.
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default,
    aten.flatten.using_ints, aten.dropout.default, aten.detach.default,
}
ADD_OPS = {aten.add.Tensor}


@dataclass(frozen=True)
class Branch:
    """One residual branch: `consumer = skip + output` (or a term of such a sum).

    Node fields are node *names*, valid in the ExportedProgram it came from and in graphs
    derived from it (`ep.module()`, copies). `label` is stable across captures of one model.
    """

    label: str
    kind: str  # "attention" | "ffn"
    layer: int
    skip: str  # the stream x
    output: str  # the branch output y
    consumer: str  # the add that sums the stream and y
    normalized: str | None  # the branch's normalized input, when it starts with a norm
    body: tuple[str, ...]
    param_names: tuple[str, ...]  # state_dict keys of the parameters only this branch uses
    params: int
    width: int  # size of the last dimension of x and y
    norm_params: int = 0  # owned parameters on the way to `normalized` (kept by a bypass that reads it)

    @property
    def input_node(self) -> str:
        """The bypass input by default: the normalized input where there is one, else x."""
        return self.normalized or self.skip


def param_nodes_of_program(ep: torch.export.ExportedProgram) -> dict[str, tuple[str, int]]:
    """Map parameter placeholder names of `ep` to (state_dict key, numel).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> sorted(param_nodes_of_program(capture(tiny_model("gpt2"))).values())[0][0]
        'hf.lm_head.weight'
    """
    out = {}
    state = ep.state_dict
    for spec in ep.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.PARAMETER:
            out[spec.arg.name] = (spec.target, state[spec.target].numel())
    return out


def param_nodes_of_module(gm: fx.GraphModule) -> dict[str, tuple[str, int]]:
    """Map `get_attr` node names of `gm` that fetch parameters to (qualified name, numel).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> len(param_nodes_of_module(capture(tiny_model("llama")).module())) > 0
        True
    """
    params = dict(gm.named_parameters())
    return {n.name: (n.target, params[n.target].numel())
            for n in gm.graph.nodes if n.op == "get_attr" and n.target in params}


def find_branches(ep: torch.export.ExportedProgram) -> list[Branch]:
    """Find every residual branch of a captured program, in graph order.

    Raises `NoBranchesError` when there are none (the graph has no `x + f(x)` with a matmul in f).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> len(find_branches(capture(tiny_model("bert", layers=3))))
        6
    """
    branches = analyze_graph(ep.graph, param_nodes_of_program(ep))
    if not branches:
        raise NoBranchesError("no residual branches found (no 'x + f(x)' where f has a matmul); "
                              "subfit_fx compresses residual networks such as transformers")
    return branches


def _tensor_val(node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _data_graph(graph: fx.Graph) -> nx.DiGraph:
    """Dependency graph without edges out of SymInt nodes (shape plumbing is not data flow)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            if isinstance(inp.meta.get("val"), torch.SymInt | int) and inp.op != "placeholder":
                continue
            g.add_edge(inp.name, node.name)
    return g


class _Reach:
    """Cached ancestor / descendant sets on the data graph."""

    def __init__(self, g: nx.DiGraph) -> None:
        self.g = g
        self._anc: dict[str, set[str]] = {}
        self._desc: dict[str, set[str]] = {}

    def anc(self, name: str) -> set[str]:
        if name not in self._anc:
            self._anc[name] = nx.ancestors(self.g, name)
        return self._anc[name]

    def desc(self, name: str) -> set[str]:
        if name not in self._desc:
            self._desc[name] = nx.descendants(self.g, name)
        return self._desc[name]


def _feeds_through_matmul(reach: _Reach, nodes: dict[str, fx.Node], skip: str, out: str) -> bool:
    """True when `skip` reaches `out` through at least one matmul."""
    if skip not in reach.anc(out):
        return False
    between = reach.desc(skip) & (reach.anc(out) | {out})
    return any(nodes[n].target in MATMUL_OPS for n in between)


def _split_terms(reach: _Reach, nodes: dict[str, fx.Node], skip: str, out: str,
                 consumer: str) -> list[tuple[str, str]]:
    """Split a parallel-residual sum y = a + b (GPT-NeoX, GPT-J) into its branch terms.

    Returns (term, consumer) pairs: the term is a branch output, the consumer the add using it.
    """
    node = nodes[out]
    if node.target in ADD_OPS and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        a, b = (x.name for x in node.args)
        if all(_feeds_through_matmul(reach, nodes, skip, t) for t in (a, b)) and \
                a not in reach.anc(b) and b not in reach.anc(a):
            return (_split_terms(reach, nodes, skip, a, out)
                    + _split_terms(reach, nodes, skip, b, out))
    return [(out, consumer)]


def _owned_params(nodes: dict[str, fx.Node], body: set[str], param_nodes: Iterable[str]) -> list[str]:
    """Parameters used only inside `body`, directly or through weight-only ops (Gemma's `1 + w`)."""
    params = set(param_nodes)
    memo: dict[str, bool] = {}

    def real_users(name: str) -> list[fx.Node]:
        # metadata asserts use a tensor without computing from it
        return [u for u in nodes[name].users if u.target is not aten._assert_tensor_metadata.default]

    def weight_only(node: fx.Node) -> bool:
        return all(i.name in params or i.op == "get_attr" or
                   (i.op == "call_function" and weight_only(i)) for i in node.all_input_nodes)

    def only_into_body(name: str) -> bool:
        if name in body:
            return True
        if name not in memo:
            memo[name] = False
            node, users = nodes[name], real_users(name)
            memo[name] = (name in params or weight_only(node)) and bool(users) and all(
                u.op != "output" and only_into_body(u.name) for u in users)
        return memo[name]

    return [p for p in params if real_users(p) and all(only_into_body(u.name) for u in real_users(p))]


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path[len(WRAPPED_PREFIX):] if path.startswith(WRAPPED_PREFIX) else path


def _label(matmul_nodes: Iterable[fx.Node], fallback: str) -> str:
    paths = [p.split(".") for p in (_module_path(n) for n in matmul_nodes) if p]
    if not paths:
        return fallback
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    children = sorted({p[len(common)] for p in paths if len(p) > len(common)})
    # The branch's modules share no single parent module that holds only them (OPT's fc1/fc2,
    # BERT's intermediate/output): name the children so the label stays unique and stable.
    if common and common[-1].isdigit() and len(children) > 1:
        return ".".join(common) + "." + "+".join(children)
    return ".".join(common) or fallback


def _normalized_input(nodes: dict[str, fx.Node], body: set[str], skip: str) -> str | None:
    """The node every first matmul of the branch reads (walking through views); None if it is x."""
    entries: set[str] = set()
    frontier, seen = [skip], {skip}
    while frontier:
        cur = frontier.pop()
        for user in nodes[cur].users:
            if user.name not in body or user.name in seen:
                continue
            seen.add(user.name)
            if user.target in MATMUL_OPS:
                entries.add(cur)
            else:
                frontier.append(user.name)
    roots = set()
    for name in entries:
        node = nodes[name]
        while (node.name != skip and node.target in VIEW_OPS and node.args
               and isinstance(node.args[0], fx.Node)):
            node = node.args[0]
        roots.add(node.name)
    if len(roots) != 1:
        return None
    root = roots.pop()
    return None if root == skip else root


def analyze_graph(graph: fx.Graph, param_nodes: dict[str, tuple[str, int]]) -> list[Branch]:
    """Find residual branches in `graph`; `param_nodes` maps parameter nodes to (name, numel).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("opt"))
        >>> [b.label for b in analyze_graph(ep.graph, param_nodes_of_program(ep))][:2]
        ['model.decoder.layers.0.self_attn', 'model.decoder.layers.0.fc1+fc2']
    """
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    reach = _Reach(_data_graph(graph))
    found: list[tuple[str, str, str]] = []  # (skip, output, consumer)
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ADD_OPS or len(node.args) != 2:
            continue
        a, b = node.args
        va, vb = _tensor_val(a), _tensor_val(b)
        if va is None or vb is None or str(va.shape) != str(vb.shape) or va.dim() < 2:
            continue
        for skip, out in ((a.name, b.name), (b.name, a.name)):
            if _feeds_through_matmul(reach, nodes, skip, out):
                for term, consumer in _split_terms(reach, nodes, skip, out, node.name):
                    found.append((skip, term, consumer))
                break

    branches: list[Branch] = []
    attention_seen = 0
    for skip, out, consumer in sorted(found, key=lambda t: order[t[1]]):
        body = (reach.desc(skip) & reach.anc(out)) | {out}
        body_nodes = sorted((nodes[n] for n in body), key=lambda n: order[n.name])
        kind = "attention" if any(n.target in ATTENTION_OPS for n in body_nodes) else "ffn"
        owned = _owned_params(nodes, body, param_nodes)
        matmuls = [n for n in body_nodes if n.target in MATMUL_OPS]
        label = _label(matmuls, fallback=f"branch_{len(branches)}")
        normalized = _normalized_input(nodes, body, skip)
        norm_params = 0
        if normalized:
            region = (reach.anc(normalized) & body) | {normalized}
            norm_params = sum(param_nodes[p][1] for p in _owned_params(nodes, region, owned))
        digits = [int(part) for part in label.split(".") if part.isdigit()]
        layer = digits[0] if digits else attention_seen
        attention_seen += kind == "attention"
        branches.append(Branch(
            label=label, kind=kind, layer=layer, skip=skip, output=out, consumer=consumer,
            normalized=normalized,
            body=tuple(n.name for n in body_nodes),
            param_names=tuple(sorted(param_nodes[p][0] for p in owned)),
            params=sum(param_nodes[p][1] for p in owned),
            width=int(_tensor_val(nodes[out]).shape[-1]),
            norm_params=norm_params,
        ))
    return branches


def count_block_params(ep: torch.export.ExportedProgram, branches: list[Branch]) -> int:
    """Parameters of all transformer blocks: those used only between the first branch's stream
    input and the last branch's residual add (so post-LN norms count; embeddings and heads don't).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("llama"))
        >>> count_block_params(ep, find_branches(ep)) == sum(b.params for b in find_branches(ep))
        True
    """
    nodes = {n.name: n for n in ep.graph.nodes}
    reach = _Reach(_data_graph(ep.graph))
    first = min(branches, key=lambda b: list(nodes).index(b.skip)).skip
    last = max(branches, key=lambda b: list(nodes).index(b.consumer)).consumer
    region = (reach.desc(first) & reach.anc(last)) | {last}
    # Post-LN (BERT): each block ends with a norm of its residual sum, the last one included.
    post_norms = [u for u in nodes[last].users if u.target is aten.layer_norm.default]
    skips = {b.skip for b in branches}
    if post_norms and any(nodes[s].target is aten.layer_norm.default for s in skips):
        region.add(post_norms[0].name)
    params = param_nodes_of_program(ep)
    return sum(params[p][1] for p in _owned_params(nodes, region, params))


def count_params(ep: torch.export.ExportedProgram) -> int:
    """All parameters of a program, tied weights counted once.

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> count_params(capture(tiny_model("llama"))) == tiny_model("llama").num_parameters()
        True
    """
    seen: set[int] = set()
    total = 0
    for name, _numel in param_nodes_of_program(ep).values():
        tensor = ep.state_dict[name]
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    return total
