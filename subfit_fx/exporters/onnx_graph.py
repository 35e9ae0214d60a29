"""Small edits of ONNX graphs (onnx_ir): readable dimension names, pruning of unused graph inputs,
batch-broadcast rotary caches.

Example:
    >>> model = ir.load("model.onnx")  # doctest: +SKIP
    >>> rename_dims(model, {"input_ids": ("batch_size", "sequence_length")})  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import onnx_ir as ir

__all__ = ["broadcast_rotary_caches", "drop_unused_inputs", "rename_dims"]

_SYMBOL = re.compile(r"\b[su]\d+\b")  # torch.export's shape symbols (s17, u3)


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.outputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def rename_dims(model: ir.Model, names: dict[str, Iterable[str | None]]) -> dict[str, str]:
    """Give the symbolic dims of named graph inputs readable names, everywhere in the graph.

    `names` maps an input name to one name per axis (None leaves that axis). Symbols inside
    expressions (`s17 + s70`) are renamed too. Returns the symbol -> name mapping used.

    Example:
        >>> model = ir.load("model.onnx")  # doctest: +SKIP
        >>> rename_dims(model, {"input_ids": ("batch_size", "sequence_length")})  # doctest: +SKIP
        {'s26': 'batch_size', 's70': 'sequence_length'}
    """
    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        if value.name not in names or value.shape is None:
            continue
        for dim, new in zip(value.shape, names[value.name]):
            symbol = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if new is not None and symbol and _SYMBOL.fullmatch(symbol):
                mapping.setdefault(symbol, new)
    if not mapping:
        return mapping

    def rename(dim: object) -> object:
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return _SYMBOL.sub(lambda m: mapping.get(m[0], m[0]), dim.value)
        return dim

    for value in _values(model.graph):
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in value.shape):
            value.shape = ir.Shape([rename(d) for d in value.shape])
    return mapping


def drop_unused_inputs(model: ir.Model, names: Iterable[str] | None = None) -> list[str]:
    """Remove graph inputs that nothing reads (only those in `names` when given); returns them.

    Example:
        >>> drop_unused_inputs(ir.load("model.onnx"))  # doctest: +SKIP
        []
    """
    allowed = None if names is None else set(names)
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    unused = [v for v in graph.inputs
              if not v.uses() and id(v) not in outputs and (allowed is None or v.name in allowed)]
    for value in unused:
        graph.inputs.remove(value)
    return [v.name for v in unused]


def broadcast_rotary_caches(model: ir.Model) -> int:
    """Expand the cos/sin inputs of opset-23 `RotaryEmbedding` nodes to the batch of their input.

    torch.onnx writes the rotary tables of a graph without `position_ids` input with batch 1 (they
    come from `arange`), and the op broadcasts nothing: ONNX Runtime rejects any batch above 1.
    Each table gets one `Expand` to `(batch of x, *table dims after the first)`, shared by every
    node that reads it. Returns the number of tables expanded.

    Example:
        >>> broadcast_rotary_caches(ir.load("model.onnx"))  # doctest: +SKIP
        2
    """
    expanded: dict[int, ir.Value] = {}
    graph = model.graph
    for node in list(graph):
        if node.op_type != "RotaryEmbedding" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            continue  # 2-D tables indexed by position_ids: no batch axis
        x = node.inputs[0]
        for index in (1, 2):
            table = node.inputs[index]
            if table is None:
                continue
            if id(table) not in expanded:
                batch = ir.node("Shape", [x], attributes={"start": 0, "end": 1})
                rest = ir.node("Shape", [table], attributes={"start": 1})
                shape = ir.node("Concat", [batch.outputs[0], rest.outputs[0]], attributes={"axis": 0})
                expand = ir.node("Expand", [table, shape.outputs[0]])
                expand.outputs[0].name = f"{table.name}_batch"
                graph.insert_before(node, [batch, rest, shape, expand])
                expanded[id(table)] = expand.outputs[0]
            node.replace_input_with(index, expanded[id(table)])
    return len(expanded)
