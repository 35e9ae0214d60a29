"""Split a graph at chosen nodes into segments that run one after another on cached values.

The layer-wise pipeline runs each layer once: segment k holds the nodes after cut k-1 up to and
including cut k, takes the values it needs from earlier segments (the residual stream, the
attention mask, rotary tables...) as inputs and returns the values it defines that later segments
need. Running the segments in order on one batch computes exactly what the whole graph computes
up to the last cut, node for node, so the results are bitwise those of one forward; nothing after
the last cut (final norm, head) runs.

Parameters are not passed between segments: each segment reads the `get_attr` nodes it uses from
the module it was split from (same tensors, no copies), and lists their names in `params`, so a
caller can bring exactly those weights in before it runs (onloading).

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.zoo import tiny_model
    >>> gm = capture(tiny_model("llama")).module()
    >>> adds = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    >>> segments = split_graph(gm, [adds[1]])
    >>> len(segments), segments[0].inputs
    (1, ('input_ids', 'attention_mask'))
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["Segment", "graph_output", "initial_values", "placeholder_names", "run_segment", "split_graph"]


@dataclass(frozen=True)
class Segment:
    """A contiguous run of a graph's nodes as its own module.

    `inputs`: names of the values it reads (graph placeholders or values of earlier segments), in
    the order `module` takes them; `outputs`: names of the values it defines that later segments
    read, in the order `module` returns them; `drop`: names no later segment reads
    (the caller frees them after this segment); `params`: the parameter / buffer targets it reads.
    """

    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    drop: tuple[str, ...]
    params: tuple[str, ...]


def split_graph(gm: fx.GraphModule, cuts: Sequence[str], *, tail: bool = False) -> list[Segment]:
    """Segments of `gm` ending at each node named in `cuts` (in graph order; one segment per cut),
    and with `tail` one more from the last cut to the graph's output (its `outputs` are the
    graph's flat outputs, named by position: `"output:0"`...; `graph_output` rebuilds them).

    Example:
        >>> gm = capture(tiny_model("llama")).module()  # doctest: +SKIP
        >>> [s.outputs for s in split_graph(gm, ["add_1", "add_3"])]  # doctest: +SKIP
        [('add_1', ...), ()]
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    index = {n.name: i for i, n in enumerate(nodes)}
    unknown = [c for c in cuts if c not in index]
    if unknown:
        raise ValueError(f"no node named {unknown[0]!r} in the graph")
    ends = sorted({index[c] for c in cuts})

    def segment_of(node: fx.Node) -> int:
        # placeholders and parameters belong to no segment: they come from outside
        if node.op in ("placeholder", "get_attr"):
            return -1
        return bisect.bisect_left(ends, index[node.name])

    count = len(ends) + int(tail)
    last_use: dict[str, int] = {}  # value name -> last segment that reads it
    for node in [*nodes, output] if tail else nodes:
        k = len(ends) if node is output else segment_of(node)
        if k < 0 or k >= count:
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                last_use[arg.name] = max(last_use.get(arg.name, -1), k)

    members_of: dict[int, list[fx.Node]] = {}
    for node in nodes:
        members_of.setdefault(segment_of(node), []).append(node)
    segments = []
    for k in range(count):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        attrs: dict[str, fx.Node] = {}
        inputs: list[str] = []
        members = members_of.get(k, [])

        def lookup(arg: fx.Node, graph: fx.Graph = graph, env: dict = env, attrs: dict = attrs,
                   inputs: list = inputs) -> fx.Node:
            if arg in env:
                return env[arg]
            if arg.op == "get_attr":
                if arg.target not in attrs:
                    attrs[arg.target] = graph.get_attr(arg.target)
                    attrs[arg.target].meta = dict(arg.meta)
                return attrs[arg.target]
            env[arg] = graph.placeholder(arg.name)
            env[arg].meta = dict(arg.meta)
            inputs.append(arg.name)
            return env[arg]

        for node in members:
            env[node] = graph.node_copy(node, lookup)
        # values read earlier stay with the caller until their last reader: only new ones go out
        if k == len(ends):  # the tail: the graph's own outputs
            flat = torch.utils._pytree.tree_leaves(output.args[0])
            outputs = tuple(f"output:{i}" for i in range(len(flat)))
            graph.output(tuple(lookup(a) if isinstance(a, fx.Node) else a for a in flat))
        else:
            outputs = tuple(n.name for n in members if last_use.get(n.name, -1) > k)
            graph.output(tuple(env[n] for n in members if n.name in outputs))
        drop = tuple(name for name in (*inputs, *(n.name for n in members))
                     if name in last_use and last_use[name] <= k)
        segments.append(Segment(fx.GraphModule(gm, graph), tuple(inputs), outputs, drop, tuple(attrs)))
    return segments


def run_segment(segment: Segment, values: dict[str, torch.Tensor | object]) -> None:
    """Run `segment` on `values` (name -> value) and update them in place: its outputs added,
    the values no later segment reads removed.

    Example:
        >>> values = {"input_ids": ids, "attention_mask": mask}  # doctest: +SKIP
        >>> for s in segments: run_segment(s, values)  # doctest: +SKIP
    """
    out = segment.module(*(values[name] for name in segment.inputs))
    values.update(zip(segment.outputs, out, strict=True))
    for name in segment.drop:
        values.pop(name, None)


def graph_output(gm: fx.GraphModule, values: dict[str, object]) -> object:
    """What `gm` itself returns, from the values after its tail segment ran.

    Example:
        >>> logits = graph_output(gm, values)  # doctest: +SKIP
    """
    flat = [values[name] for name in sorted((n for n in values if n.startswith("output:")),
                                             key=lambda n: int(n.split(":")[1]))]
    spec = getattr(gm, "_out_spec", None)
    return torch.utils._pytree.tree_unflatten(flat, spec) if spec is not None else tuple(flat)


def placeholder_names(gm: fx.GraphModule) -> list[str]:
    """Names of `gm`'s graph inputs, in call order.

    Example:
        >>> placeholder_names(capture(tiny_model("llama")).module())  # doctest: +SKIP
        ['input_ids', 'attention_mask']
    """
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def initial_values(gm: fx.GraphModule, args: Sequence[object]) -> dict[str, object]:
    """The name -> value mapping the first segment starts from, for positional `args`.

    Example:
        >>> sorted(initial_values(gm, (ids, mask)))  # doctest: +SKIP
        ['attention_mask', 'input_ids']
    """
    names = placeholder_names(gm)
    if len(names) != len(args):
        raise ValueError(f"the graph takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    return dict(zip(names, args, strict=True))
