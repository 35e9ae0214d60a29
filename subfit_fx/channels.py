"""Inner channels of a branch: where width pruning (SAAP, issue 18) can slim it.

A branch `y = W h + b` ends in a matmul (the FFN down projection, the attention output
projection); `h` is its *inner* input. When every channel of `h` is computed channel-wise from
rows of earlier matmuls (`h = act(W_g z) * (W_u z)` for gated FFNs, `act(W_1 z + b_1)` for plain
ones), dropping channel j means dropping row j of each producer and column j of `W`: the branch
gets narrower without changing anything else. `find_channel_sites` finds that structure in the
graph (no module names involved), so the same rewrite serves every architecture it finds.

An attention output is a channel site in units of whole key/value groups: dropping group g drops
the rows of its key and value heads, the rows of the query heads that read them, and the matching
columns of the output projection; every other head computes exactly what it did (attention never
mixes heads). The body between the projections and the output projection (head splits, rotary
embeddings, per-head norms, the key/value repeat of grouped-query attention, the attention
itself) is checked op by op: the head axis is followed through every node, and a site exists only
when no op reduces, slices, concatenates or indexes along it (fused `qkv` projections, Conv1D
`addmm`, per-head parameters are refused). The rewrite then narrows the head axis of each view /
reshape / expand literal it recorded (`ChannelSite.heads`).

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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch < 2.12 (the GPU images' torch 2.11) calls it hint_int
    from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint  # type: ignore[no-redef]

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
    kind: str = "ffn"  # "ffn" (single channels) | "attention" (whole key/value groups)
    unit: int = 1  # inner channels per pruning unit: 1, or the query heads of one group x head_dim
    producer_unit: tuple[int, ...] = ()  # rows of each producer per unit (empty: 1 each)
    heads: tuple[int, ...] = ()  # attention: the head axis of each node of `chain`
    producer_chunks: tuple[int, ...] = ()  # fused producers (Phi-3 gate_up): equal chunks of the last axis
    # each producer's output is split into, the channels being one chunk (empty: 1 each)

    @property
    def units(self) -> int:
        """Number of pruning units (channels, or key/value groups).

        Example:
            >>> ChannelSite("a", "h", "l", "w", None, ("q",), (("q.w", None),), (), 8, "attention", 4, (4,)).units
            2
        """
        return self.channels // self.unit

    def params_per_unit(self, width_in: int, width_out: int) -> int:
        """Parameters one unit costs: its rows (and biases) of each producer, its columns of `last`.

        Example:
            >>> ChannelSite("f", "h", "l", "w", None, ("a",), (("a.w", "a.b"),), (), 8).params_per_unit(4, 4)
            9
        """
        rows = self.producer_unit or (1,) * len(self.producers)
        chunks = self.producer_chunks or (1,) * len(self.producers)
        return sum(r * k * (width_in + (1 if b else 0)) for r, k, (_, b) in zip(rows, chunks, self.producers)) \
            + self.unit * width_out

    def params_per_channel(self, width_in: int, width_out: int) -> float:
        """Parameters one inner channel costs on average (`params_per_unit` / `unit`).

        Example:
            >>> ChannelSite("f", "h", "l", "w", None, ("a",), (("a.w", "a.b"),), (), 8).params_per_channel(4, 4)
            9.0
        """
        return self.params_per_unit(width_in, width_out) / self.unit

    def producer_rows(self, kept: torch.Tensor) -> list[torch.Tensor]:
        """The rows of each producer that the kept inner channels `kept` (sorted, whole units) need.

        Example:
            >>> site = ChannelSite("a", "h", "l", "w", None, ("q", "k"), (("q.w", None), ("k.w", None)), (), 8,
            ...                    "attention", 4, (4, 2))
            >>> [r.tolist() for r in site.producer_rows(torch.arange(4, 8))]
            [[4, 5, 6, 7], [2, 3]]
            >>> fused = ChannelSite("f", "h", "l", "w", None, ("gu",), (("gu.w", None),), (), 4, producer_chunks=(2,))
            >>> fused.producer_rows(torch.tensor([1, 3]))[0].tolist()  # gate rows, then up rows
            [1, 3, 5, 7]
        """
        if self.unit == 1:
            chunks = self.producer_chunks or (1,) * len(self.producers)
            return [torch.cat([kept + c * self.channels for c in range(k)]) for k in chunks]
        groups = kept.reshape(-1, self.unit)
        if len(kept) % self.unit or not torch.equal(groups, groups[:, :1] + torch.arange(self.unit)) \
                or bool((groups[:, 0] % self.unit).any()):
            raise ValueError(f"kept channels of '{self.label}' are not whole key/value groups of {self.unit}")
        first = groups[:, 0] // self.unit
        return [(first[:, None] * rows + torch.arange(rows)).flatten() for rows in self.producer_unit]


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


def _last_matmul(node: fx.Node) -> fx.Node:
    # the output may be a dropout / dtype cast of the last matmul (BERT, mixed precision)
    while node.target in (aten.dropout.default, aten.clone.default, aten.to.dtype, aten._to_copy.default):
        node = node.args[0]
    return node


def _last_and_inner(branch: Branch, nodes: dict[str, fx.Node], param_nodes: dict[str, tuple[str, int]]
                    ) -> tuple[fx.Node, tuple[str, str | None], fx.Node] | None:
    """The branch's last matmul, its (weight, bias) keys and its input node, when the branch ends
    in a parameter matmul of its own body."""
    last = _last_matmul(nodes[branch.output])
    parts = _linear_parts(last, param_nodes)
    if parts is None or last.name not in branch.body or not isinstance(last.args[0], fx.Node):
        return None
    return last, parts, last.args[0]


def _site(branch: Branch, nodes: dict[str, fx.Node], param_nodes: dict[str, tuple[str, int]],
          order: dict[str, int]) -> ChannelSite | None:
    body = set(branch.body)
    found = _last_and_inner(branch, nodes, param_nodes)
    if found is None:
        return None
    last, parts, inner = found
    val = inner.meta.get("val")
    if not isinstance(val, torch.Tensor) or inner.name not in body:
        return None
    channels = int(val.shape[-1])
    producers: list[fx.Node] = []
    chain: list[fx.Node] = []
    chunks: dict[str, int] = {}  # fused producer -> number of chunks its output is split into
    todo, seen = [inner], set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if _linear_parts(node, param_nodes) is not None:
            producers.append(node)
            continue
        fused = _chunk_of_linear(node, param_nodes, channels)
        if fused is not None and node.name in body:  # one chunk of a fused producer (Phi-3 gate_up)
            split, producer, count = fused
            chunks[producer.name] = count
            chain += [node] + ([] if split.name in seen else [split])
            seen.add(split.name)
            todo.append(producer)
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
        chain=tuple(n.name for n in chain), channels=channels,
        producer_chunks=tuple(chunks.get(p.name, 1) for p in producers) if chunks else ())


def _chunk_of_linear(node: fx.Node, param_nodes: dict[str, tuple[str, int]], channels: int
                     ) -> tuple[fx.Node, fx.Node, int] | None:
    """(chunk node, linear, chunk count) when `node` takes one of k equal chunks of a parameter
    linear's last axis (`chunk(linear(x), k, -1)[i]`, each `channels` wide), else None. Slicing the
    same rows of every chunk keeps the chunks equal, so the chunk op needs no change."""
    import operator

    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    split = node.args[0]
    if not isinstance(split, fx.Node) or split.target is not aten.chunk.default:
        return None
    source = split.args[0]
    count = int(split.args[1])
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if (not isinstance(val, torch.Tensor) or _linear_parts(source, param_nodes) is None
            or _dim(int(dim), val.dim()) != val.dim() - 1 or optimization_hint(val.shape[-1]) != count * channels):
        return None
    if any(u.target is not operator.getitem for u in split.users):
        return None
    return split, source, count



# How each op moves the head axis (all ops of the attention bodies of the supported architectures;
# anything else refuses the site).
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME_SHAPE = _ELEMENTWISE | {aten.rsqrt.default, aten.type_as.default, aten.pow.Tensor_Tensor, aten.exp.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList}


def _ints(shape: Sequence[object]) -> list[int]:
    """Concrete sizes (symbolic ones at their example value): enough to locate an axis."""
    return [optimization_hint(d) if isinstance(d, torch.SymInt) else int(d) for d in shape]  # type: ignore[arg-type]


def _shape(node: object) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return _ints(val.shape) if isinstance(val, torch.Tensor) else None


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _view_axis(old: list[int], axis: int, new: list[int], groups: int) -> int | None:
    """The axis of `new` (a reshape of `old`) on whose outer end the `groups` units of `old`'s
    `axis` land, or None when the reshape splits them or mixes them with other axes."""
    prefix = math.prod(old[:axis])
    before = 1
    for k, size in enumerate(new):
        if before == prefix and size % groups == 0 and size > 1:
            return k
        before *= size
        if before > prefix:
            return None
    return None


def _head_axis(node: fx.Node, axes: dict[str, int], groups: int) -> int | None:
    """The head axis of `node`'s output from its inputs' (`axes`), or None when `node` is not an op
    that keeps heads apart."""
    target, args = node.target, node.args
    out = _shape(node)
    if out is None:
        return None
    rank = len(out)
    ins = [a for a in node.all_input_nodes if a.name in axes]
    first = args[0] if args else None
    if target in _VIEWS or target is aten.expand.default:
        if first not in ins or len(ins) != 1:
            return None
        old = _shape(first)
        if target is aten.expand.default:
            return axes[first.name] + rank - len(old)
        return _view_axis(old, axes[first.name], out, groups)
    if target is aten.transpose.int and first in ins:
        a, d0, d1 = axes[first.name], _dim(args[1], rank), _dim(args[2], rank)
        return d1 if a == d0 else d0 if a == d1 else a
    if target is aten.permute.default and first in ins:
        return [_dim(d, rank) for d in args[1]].index(axes[first.name])
    if target is aten.unsqueeze.default and first in ins:
        a = axes[first.name]
        return a + 1 if _dim(args[1], rank) <= a else a
    if target is aten.slice.Tensor and first in ins:
        a = axes[first.name]
        return a if _dim(args[1], rank) != a else None
    if target is aten.cat.default:
        parts, dim = args[0], _dim(args[1] if len(args) > 1 else 0, rank)
        found = {axes.get(p.name) if isinstance(p, fx.Node) else None for p in parts}
        return found.pop() if len(found) == 1 and None not in found and dim not in found else None
    if target in _REDUCE and first in ins:
        a, dims = axes[first.name], [_dim(d, len(_shape(first))) for d in args[1]]
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        return None if a in dims else a if keep else a - sum(d < a for d in dims)
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        mask_shape = _shape(mask) if isinstance(mask, fx.Node) else None
        if any(not isinstance(t, fx.Node) or axes.get(t.name) != rank - 3 for t in (q, k, v)) \
                or (mask_shape is not None and len(mask_shape) >= 3 and mask_shape[-3] != 1):
            return None  # heads on axis -3 of q, k and v; a mask that differs per head would be sliced
        return rank - 3
    if target in _SAME_SHAPE:
        found = {axes[a.name] + rank - len(_shape(a)) for a in ins}
        if len(found) != 1:
            return None
        a = found.pop()
        for other in node.all_input_nodes:  # a per-head operand (a scale per head) would need slicing
            shape = _shape(other)
            if other.name not in axes and shape is not None and a - (rank - len(shape)) >= 0 \
                    and shape[a - (rank - len(shape))] != 1:
                return None
        return a
    return None


def _attention_site(branch: Branch, nodes: dict[str, fx.Node], param_nodes: dict[str, tuple[str, int]],
                    order: dict[str, int]) -> ChannelSite | None:
    body = set(branch.body)
    found = _last_and_inner(branch, nodes, param_nodes)
    if found is None:
        return None
    last, parts, inner = found
    out = _shape(inner)
    if out is None or inner.name not in body or inner.target not in _VIEWS:
        return None
    split = _shape(inner.args[0])  # (..., query heads, head_dim) merged into the channels
    if split is None or len(split) < 2 or split[-1] * split[-2] != out[-1]:
        return None
    channels, head_dim = out[-1], split[-1]
    # backwards from the inner input: parameter matmuls of the branch are the producers
    producers, seen, todo = [], set(), [inner]
    while todo:
        node = todo.pop()
        if node.name in seen or node.name not in body:
            continue
        seen.add(node.name)
        if _linear_parts(node, param_nodes) is not None:
            producers.append(node)
            continue
        todo.extend(node.all_input_nodes)
    producers.sort(key=lambda n: order[n.name])
    if not producers or any(p.args[0] is not producers[0].args[0] for p in producers):
        return None
    widths = [_shape(p)[-1] for p in producers]
    if any(w % head_dim for w in widths):
        return None
    heads = [w // head_dim for w in widths]
    groups = min(heads)
    if max(heads) * head_dim != channels or any(h % groups for h in heads):
        return None
    # forwards from the producers: the chain is every node between them and the inner input
    axes = {p.name: len(_shape(p)) - 1 for p in producers}
    chain = []
    for node in sorted((nodes[n] for n in seen), key=lambda n: order[n.name]):
        if node.name in axes or not any(a.name in axes for a in node.all_input_nodes):
            continue
        axis = _head_axis(node, axes, groups)
        if axis is None:
            return None
        axes[node.name] = axis
        chain.append(node)
    members = set(axes)
    for node in [*producers, *chain]:
        readers = {u for u in node.users if u.target is not aten._assert_tensor_metadata.default}
        if any(u.name not in members and not (node is inner and u is last) for u in readers):
            return None  # something outside the attention reads a head (a KV cache): no slicing here
    if axes.get(inner.name) != len(out) - 1:
        return None
    return ChannelSite(
        label=branch.label, inner=inner.name, last=last.name, last_weight=parts[0], last_bias=parts[1],
        producer_nodes=tuple(p.name for p in producers),
        producers=tuple(_linear_parts(p, param_nodes) for p in producers),  # type: ignore[misc]
        chain=tuple(n.name for n in chain), channels=channels, kind="attention", unit=channels // groups,
        producer_unit=tuple(w // groups for w in widths), heads=tuple(axes[n.name] for n in chain))


def find_channel_sites(graph: fx.Graph, branches: list[Branch], param_nodes: dict[str, tuple[str, int]],
                       kinds: tuple[str, ...] = ("ffn", "attention")) -> dict[str, ChannelSite]:
    """Channel sites of the branches of `graph` whose kind is in `kinds`, by label (branches
    without one are absent: fused projections, Conv1D-style `addmm`, per-head parameters).

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.branches import param_nodes_of_program
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("bert"))
        >>> sites = find_channel_sites(ep.graph, find_branches(ep), param_nodes_of_program(ep))
        >>> [(label, site.kind, site.units) for label, site in sites.items()][:2]
        [('encoder.layer.0.attention', 'attention', 4), ('encoder.layer.0.intermediate+output', 'ffn', 128)]
    """
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    sites = {}
    for branch in branches:
        if branch.kind not in kinds:
            continue
        find = _site if branch.kind == "ffn" else _attention_site
        site = find(branch, nodes, param_nodes, order)
        if site is not None:
            sites[branch.label] = site
    return sites
