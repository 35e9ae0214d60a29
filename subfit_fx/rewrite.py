"""Apply a Recipe to a captured program: bypass nodes replace chosen branches.

Works inside the ExportedProgram (ARCHITECTURE.md "Rewrite"): each bypass weight becomes a new
PARAMETER placeholder with an InputSpec and a state_dict entry; `aten.linear` nodes (with
`meta["val"]`, which the ONNX exporter needs) compute the bypass; the residual add reads them;
then dead code and unused parameters are removed, so their weights leave the file too.

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.recipe import Recipe, Replacement, branch_records
    >>> from subfit_fx.branches import count_params, find_branches
    >>> from subfit_fx.zoo import tiny_model
    >>> ep = capture(tiny_model("llama"))
    >>> r = Recipe("manual", branch_records(find_branches(ep)), [Replacement(("model.layers.0.mlp",), "remove")])
    >>> count_params(apply_recipe(ep, r)) < count_params(ep)
    True
"""

from __future__ import annotations

import copy
import re

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from subfit_fx.branches import Branch, find_branches
from subfit_fx.errors import RecipeMismatchError
from subfit_fx.passes.dead_code import drop_unused_inputs, eliminate_dead_code
from subfit_fx.recipe import Recipe, Replacement

__all__ = ["apply_recipe", "stream_after"]

aten = torch.ops.aten


def stream_after(branch: Branch, nodes: dict[str, fx.Node]) -> fx.Node:
    """The residual stream right after `branch`: its add, or (post-LN) the norm of that add.

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("bert")); b = find_branches(ep)[0]
        >>> stream_after(b, {n.name: n for n in ep.graph.nodes}).target
        <OpOverload(op='aten.layer_norm', overload='default')>
    """
    consumer = nodes[branch.consumer]
    users = list(consumer.users)
    if len(users) == 1 and users[0].target is aten.layer_norm.default:
        return users[0]
    return consumer


def _safe(key: str) -> str:
    return "subfit_" + re.sub(r"[^0-9a-zA-Z_]", "_", key)


class _Builder:
    """Adds recipe tensors as parameters of one program and builds linear chains from them."""

    def __init__(self, ep: torch.export.ExportedProgram, recipe: Recipe) -> None:
        self.ep, self.recipe = ep, recipe
        self.graph = ep.graph_module.graph
        self.placeholders: dict[str, fx.Node] = {}
        first_ph = next(n for n in self.graph.nodes if n.op == "placeholder")
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"])
        self.insert_before = first_ph
        self.new_specs: list[InputSpec] = []

    def param(self, key: str, dtype: torch.dtype) -> fx.Node:
        if key in self.placeholders:
            return self.placeholders[key]
        value = torch.nn.Parameter(self.recipe.tensors[key].detach().to(dtype).contiguous(), requires_grad=False)
        target = f"subfit.{key}"
        with self.graph.inserting_before(self.insert_before):
            node = self.graph.placeholder(_safe(key))
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        self.ep.state_dict[target] = value
        self.new_specs.append(InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target, None))
        self.placeholders[key] = node
        return node

    def chain(self, z: fx.Node, layers: list[tuple[str, str | None]], before: fx.Node) -> fx.Node:
        dtype = z.meta["val"].dtype
        out = z
        for w_key, b_key in layers:
            w, b = self.param(w_key, dtype), self.param(b_key, dtype) if b_key else None
            with self.graph.inserting_before(before):
                node = self.graph.call_function(aten.linear.default, (out, w, b) if b is not None else (out, w))
            with self.fake_mode:
                node.meta["val"] = aten.linear.default(out.meta["val"], w.meta["val"],
                                                       b.meta["val"] if b is not None else None)
            node.meta["nn_module_stack"] = {}
            out = node
        return out

    def add(self, a: fx.Node, b: fx.Node, before: fx.Node) -> fx.Node:
        with self.graph.inserting_before(before):
            node = self.graph.call_function(aten.add.Tensor, (a, b))
        with self.fake_mode:
            node.meta["val"] = aten.add.Tensor(a.meta["val"], b.meta["val"])
        return node

    def finish(self) -> None:
        sig = self.ep.graph_signature
        sig.input_specs[:0] = self.new_specs


def _input_node(r: Replacement, branch: Branch, nodes: dict[str, fx.Node]) -> fx.Node:
    if r.input == "normalized" and branch.normalized:
        return nodes[branch.normalized]
    return nodes[branch.skip]


def _replace_single(builder: _Builder, r: Replacement, b: Branch, nodes: dict[str, fx.Node]) -> None:
    y = nodes[b.output]
    consumer = nodes.get(b.consumer)
    if consumer is None or y not in consumer.all_input_nodes:
        # the consumer add was already folded away (both terms of a parallel residual removed)
        consumer = next(u for u in y.users if u.target is aten.add.Tensor)
    if r.action == "remove":
        other = next(a for a in consumer.args if a is not y)
        consumer.replace_all_uses_with(other)
        builder.graph.erase_node(consumer)
        del nodes[consumer.name]
        return
    out = builder.chain(_input_node(r, b, nodes), r.layers, consumer)
    consumer.replace_input_with(y, out)


def _replace_span(builder: _Builder, r: Replacement, first: Branch, last: Branch,
                  nodes: dict[str, fx.Node]) -> None:
    x = nodes[first.skip]
    end = stream_after(last, nodes)
    anchor = next(iter(end.users))
    new = x if r.action == "remove" else builder.add(x, builder.chain(x, r.layers, anchor), anchor)
    end.replace_all_uses_with(new)


def apply_recipe(ep: torch.export.ExportedProgram, recipe: Recipe, *, check: bool = True,
                 inplace: bool = False) -> torch.export.ExportedProgram:
    """Return a program in which the recipe's branches are removed or bypassed.

    The recipe is checked against the program's branches before anything changes
    (`RecipeMismatchError`). The result passes `ep.validate()` and exports to ONNX.

    Example:
        >>> compressed = apply_recipe(ep, recipe)  # doctest: +SKIP
    """
    branches = {b.label: b for b in find_branches(ep)}
    if check:
        recipe.check_against(list(branches.values()))
    ep = ep if inplace else copy.deepcopy(ep)
    graph = ep.graph_module.graph
    nodes = {n.name: n for n in graph.nodes}
    builder = _Builder(ep, recipe)
    for r in recipe.replacements:
        missing = [label for label in r.labels if label not in branches]
        if missing:
            raise RecipeMismatchError(f"recipe replaces '{missing[0]}', which this model does not have; "
                                      "apply the recipe to the model it was made for")
        if r.is_span():
            _replace_span(builder, r, branches[r.labels[0]], branches[r.labels[-1]], nodes)
        else:
            _replace_single(builder, r, branches[r.labels[0]], nodes)
    builder.finish()
    eliminate_dead_code(graph)
    drop_unused_inputs(ep)
    graph.lint()
    ep.graph_module.recompile()
    ep.validate()
    return ep
