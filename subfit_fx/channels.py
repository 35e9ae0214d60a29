"""Inner channels of a branch: where width pruning (SAAP, issue 18) can slim it.

A branch `y = W h + b` ends in a matmul (the FFN down projection, the attention output
projection); `h` is its *inner* input. When every channel of `h` is computed channel-wise from
rows of earlier matmuls (`h = act(W_g z) * (W_u z)` for gated FFNs, `act(W_1 z + b_1)` for plain
ones), dropping channel j means dropping row j of each producer and column j of `W`: the branch
gets narrower without changing anything else. `find_channel_sites` finds that structure in the
graph (no module names involved), so the same rewrite serves every architecture it finds.

Attention outputs are not channel sites here: their channels pass through a softmax over heads,
so they need whole-head units (not implemented yet, see docs/results/width.md).

Example:
    >>> from subfit_fx import capture, find_branches
    >>> from subfit_fx.branches import param_nodes_of_program
    >>> from subfit_fx.zoo import tiny_model
    >>> ep = capture(tiny_model("llama"))
    >>> sites = find_channel_sites(ep.graph, find_branches(ep), param_nodes_of_program(ep))
    >>> site = sites["model.layers.0.mlp"]
    >>> site.channels, [key.split(".")[-2] for key, _ in site.producers]
    (128, ['gate_proj', 'up_proj'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from subfit_fx.branches import Branch

__all__ = ["ChannelSite", "find_channel_sites"]

aten = torch.ops.aten

# Ops that act on each channel on its own (with scalars or with other channels of the same
# index): a channel subset commutes with them.
_ELEMENTWISE = {
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
    aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.add.Scalar, aten.erf.default,
    aten.dropout.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default,
    aten.detach.default, aten.contiguous.default,
}


@dataclass(frozen=True)
class ChannelSite:
    """The slimmable structure of one branch, by node names and state_dict keys.

    `last` computes the branch output from `inner` (width `channels`); `producers` are the
    matmuls whose output rows are the channels, as (weight key, bias key or None) in the order of
    `producer_nodes`; `chain` are the channel-wise nodes between them and `inner`, in graph order.
    """

    label: str
    inner: str
    last: str
    last_weight: str
    last_bias: str | None
    producer_nodes: tuple[str, ...]
    producers: tuple[tuple[str, str | None], ...]
    chain: tuple[str, ...]
    channels: int

    def params_per_channel(self, width_in: int, width_out: int) -> int:
        """Parameters one channel costs: a row (and bias) of each producer, a column of `last`.

        Example:
            >>> ChannelSite("f", "h", "l", "w", None, ("a",), (("a.w", "a.b"),), (), 8).params_per_channel(4, 4)
            9
        """
        return sum(width_in + (1 if b else 0) for _, b in self.producers) + width_out


def _param_key(node: object, param_nodes: dict[str, tuple[str, int]]) -> str | None:
    if isinstance(node, fx.Node) and node.name in param_nodes:
        return param_nodes[node.name][0]
    return None


def _linear_parts(node: fx.Node, param_nodes: dict[str, tuple[str, int]]) -> tuple[str, str | None] | None:
    """(weight key, bias key) of an `aten.linear` with parameter operands, else None."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    weight = _param_key(node.args[1], param_nodes)
    bias_arg = node.args[2] if len(node.args) > 2 else None
    bias = _param_key(bias_arg, param_nodes)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    return weight, bias


def _site(branch: Branch, nodes: dict[str, fx.Node], param_nodes: dict[str, tuple[str, int]],
          order: dict[str, int]) -> ChannelSite | None:
    body = set(branch.body)
    last = nodes[branch.output]
    # the output may be a dropout / dtype cast of the last matmul (BERT, mixed precision)
    while last.target in (aten.dropout.default, aten.clone.default, aten.to.dtype, aten._to_copy.default):
        last = last.args[0]
    parts = _linear_parts(last, param_nodes)
    if parts is None or last.name not in body:
        return None
    inner = last.args[0]
    val = inner.meta.get("val") if isinstance(inner, fx.Node) else None
    if not isinstance(val, torch.Tensor) or inner.name not in body:
        return None
    channels = int(val.shape[-1])
    producers: list[fx.Node] = []
    chain: list[fx.Node] = []
    todo, seen = [inner], set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if _linear_parts(node, param_nodes) is not None:
            producers.append(node)
            continue
        if node.op != "call_function" or node.target not in _ELEMENTWISE or node.name not in body:
            return None
        for arg in node.args:
            if isinstance(arg, fx.Node):
                arg_val = arg.meta.get("val")
                if not isinstance(arg_val, torch.Tensor) or arg_val.shape[-1:] != val.shape[-1:]:
                    return None  # a broadcast operand (a parameter vector, a scale) is not channel-wise
                todo.append(arg)
            elif isinstance(arg, (list, tuple, dict)):
                return None
        chain.append(node)
    if not producers or any(len(n.users) != 1 and any(u.name not in seen for u in n.users)
                            for n in producers + chain):
        return None  # something outside the chain reads a channel: slimming would change it
    producers.sort(key=lambda n: order[n.name])
    chain.sort(key=lambda n: order[n.name])
    if any(p.args[0] is not producers[0].args[0] for p in producers):
        return None
    return ChannelSite(
        label=branch.label, inner=inner.name, last=last.name, last_weight=parts[0], last_bias=parts[1],
        producer_nodes=tuple(p.name for p in producers),
        producers=tuple(_linear_parts(p, param_nodes) for p in producers),  # type: ignore[misc]
        chain=tuple(n.name for n in chain), channels=channels)


def find_channel_sites(graph: fx.Graph, branches: list[Branch],
                       param_nodes: dict[str, tuple[str, int]]) -> dict[str, ChannelSite]:
    """Channel sites of the FFN branches of `graph`, by label (branches without one are absent:
    fused projections, Conv1D-style `addmm`, attention).

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.branches import param_nodes_of_program
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("bert"))
        >>> sorted(find_channel_sites(ep.graph, find_branches(ep), param_nodes_of_program(ep)))[0]
        'encoder.layer.0.intermediate+output'
    """
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    sites = {}
    for branch in branches:
        if branch.kind != "ffn":
            continue
        site = _site(branch, nodes, param_nodes, order)
        if site is not None:
            sites[branch.label] = site
    return sites
