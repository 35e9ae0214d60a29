"""Dead-code elimination that really removes dead attention bodies and their weights.

Example:
    >>> g = fx.Graph(); x = g.placeholder("x"); _ = g.call_function(torch.relu, (x,)); _ = g.output(x)
    >>> eliminate_dead_code(g); len(g.nodes)
    2
"""

from __future__ import annotations

import torch
from torch import fx
from torch.export.graph_signature import InputKind

__all__ = ["clean_program", "drop_unused_inputs", "eliminate_dead_code"]

aten = torch.ops.aten


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove dead nodes, including attention bodies (sdpa is tagged random, so the default pass
    keeps it) and metadata asserts that are the last user of their subject; to a fixed point.

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x"); _ = g.call_function(torch.relu, (x,)); _ = g.output(x)
        >>> eliminate_dead_code(g); len(g.nodes)
        2
    """
    while True:
        changed = graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        for node in list(graph.nodes):
            if node.target is aten._assert_tensor_metadata.default and node.args:
                subject = node.args[0]
                if isinstance(subject, fx.Node) and all(
                        u.target is aten._assert_tensor_metadata.default for u in subject.users):
                    graph.erase_node(node)
                    changed = True
        if not changed:
            return


def drop_unused_inputs(ep: torch.export.ExportedProgram) -> None:
    """Remove parameter / buffer / constant placeholders nobody uses, with their specs and values,
    so their weights do not reach saved programs or ONNX files.

    Example:
        >>> drop_unused_inputs(ep)  # doctest: +SKIP
    """
    sig = ep.graph_signature
    graph = ep.graph_module.graph
    keep = []
    removed_targets = set()
    for spec, node in zip(list(sig.input_specs), [n for n in graph.nodes if n.op == "placeholder"]):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) and not node.users:
            graph.erase_node(node)
            removed_targets.add((spec.kind, spec.target))
            continue
        keep.append(spec)
    sig.input_specs[:] = keep
    still_used = {s.target for s in keep}
    for kind, target in removed_targets:
        if target in still_used:
            continue
        if kind == InputKind.CONSTANT_TENSOR:
            ep.constants.pop(target, None)
        else:
            ep.state_dict.pop(target, None)


def clean_program(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Dead-code-eliminate a program in place (nodes and unused weights) and return it.

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> "hf.pooler.dense.weight" in clean_program(capture(tiny_model("bert"))).state_dict
        False
    """
    eliminate_dead_code(ep.graph_module.graph)
    drop_unused_inputs(ep)
    ep.graph_module.recompile()
    return ep
