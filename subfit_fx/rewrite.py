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
from collections.abc import Sequence

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from subfit_fx.branches import (
    Branch,
    analyze_graph,
    find_branches,
    param_nodes_of_module,
    param_nodes_of_program,
)
from subfit_fx.channels import ChannelSite, find_channel_sites
from subfit_fx.errors import RecipeMismatchError
from subfit_fx.graph_cleanup import drop_unused_inputs, eliminate_dead_code
from subfit_fx.recipe import Recipe, Replacement

__all__ = ["apply_recipe", "apply_recipe_to_module", "stream_after"]

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
    """Builds bypass nodes (linear chains, adds) in one graph; subclasses decide how a recipe
    tensor becomes a graph value (a lifted placeholder, or a `get_attr` of a GraphModule)."""

    def __init__(self, graph: fx.Graph, recipe: Recipe) -> None:
        self.graph, self.recipe = graph, recipe
        self.values: dict[str, fx.Node] = {}
        self.replaced: dict[fx.Node, fx.Node] = {}  # stream nodes that earlier spans replaced
        vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = detect_fake_mode(vals)
        self.device = vals[0].device if vals else torch.device("cpu")  # where the program's tensors live

    def resolve(self, node: fx.Node) -> fx.Node:
        """The node that now stands for `node` (a span may have replaced it)."""
        while node in self.replaced:
            node = self.replaced[node]
        return node

    def _tensor(self, key: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.nn.Parameter:
        value = self.recipe.tensors[key].detach().to(device or self.device, dtype).contiguous()
        return torch.nn.Parameter(value, requires_grad=False)

    def _new_value(self, key: str, value: torch.nn.Parameter) -> fx.Node:
        raise NotImplementedError

    def param(self, key: str, dtype: torch.dtype, device: torch.device | None = None) -> fx.Node:
        if key not in self.values:
            value = self._tensor(key, dtype, device)
            node = self._new_value(key, value)
            if self.fake_mode is not None:
                node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
            self.values[key] = node
        return self.values[key]

    def _call(self, target: object, args: tuple, before: fx.Node, kwargs: dict | None = None) -> fx.Node:
        kwargs = dict(kwargs or {})
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args, kwargs)
        if self.fake_mode is not None:
            vals = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])  # nested lists too (view sizes)
            with self.fake_mode:
                node.meta["val"] = _fake_call(target, vals[0], vals[1])
        node.meta["nn_module_stack"] = {}
        return node

    def chain(self, z: fx.Node, layers: list[tuple[str, str | None]], before: fx.Node) -> fx.Node:
        val = z.meta.get("val")
        # bypass weights take the dtype and device of the activations they multiply
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        device = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
        out = z
        for w_key, b_key in layers:
            w = self.param(w_key, dtype, device)
            args = (out, w, self.param(b_key, dtype, device)) if b_key else (out, w)
            out = self._call(aten.linear.default, args, before)
        return out

    def add(self, a: fx.Node, b: fx.Node, before: fx.Node) -> fx.Node:
        return self._call(aten.add.Tensor, (a, b), before)

    def finish(self) -> None:
        """Called once after all replacements."""


class _ProgramBuilder(_Builder):
    """Recipe tensors become lifted PARAMETER placeholders with specs and state_dict entries."""

    def __init__(self, ep: torch.export.ExportedProgram, recipe: Recipe) -> None:
        super().__init__(ep.graph_module.graph, recipe)
        self.ep = ep
        self.first_placeholder = next(n for n in self.graph.nodes if n.op == "placeholder")
        self.new_specs: list[InputSpec] = []

    def _new_value(self, key: str, value: torch.nn.Parameter) -> fx.Node:
        target = f"subfit.{key}"
        with self.graph.inserting_before(self.first_placeholder):
            node = self.graph.placeholder(_safe(key))
        self.ep.state_dict[target] = value
        self.new_specs.append(InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target, None))
        return node

    def finish(self) -> None:
        # parameter placeholders come first, in the order of their specs
        self.ep.graph_signature.input_specs[:0] = self.new_specs
        # a replaced span that ends the model (post-LN BERT's last layer) changes which node the
        # program returns; the signature names it, so it must follow
        returned = self.graph.output_node().args[0]
        for spec, node in zip(self.ep.graph_signature.output_specs, returned):
            if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node) and spec.arg.name != node.name:
                spec.arg = TensorArgument(node.name)


class _ModuleBuilder(_Builder):
    """Recipe tensors become parameters of a GraphModule, read with `get_attr`."""

    def __init__(self, gm: fx.GraphModule, recipe: Recipe) -> None:
        super().__init__(gm.graph, recipe)
        self.gm = gm

    def _new_value(self, key: str, value: torch.nn.Parameter) -> fx.Node:
        name = _safe(key)
        self.gm.register_parameter(name, value)
        first = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(first):
            return self.graph.get_attr(name)


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
    x = builder.resolve(nodes[first.skip])
    end = stream_after(last, nodes)
    # right after `end`, hence before every user of it (users are not kept in graph order: the
    # KV-cache capture has a metadata assert that reads the stream before the next layer does)
    anchor = end.next
    new = x if r.action == "remove" else builder.add(x, builder.chain(x, r.layers, anchor), anchor)
    end.replace_all_uses_with(new)
    builder.replaced[end] = new


def _fake_call(target: object, args: tuple, kwargs: dict) -> object:
    """The op on fake values, for a new node's metadata. torch 2.11's matmul calls numel() on the
    symbolic sizes of a `Dim.DYNAMIC` capture (seen on CUDA) and raises; a linear's output shape
    is known without running it."""
    try:
        return target(*args, **kwargs)
    except RuntimeError as exc:
        if target is not aten.linear.default or "symbolic sizes" not in str(exc):
            raise
        x, w = args[0], args[1]
        return x.new_empty((*x.shape[:-1], w.shape[0]))


_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _narrowed(sizes: list, axis: int, groups: int, kept: int, label: str) -> list:
    size = sizes[axis]
    if isinstance(size, int) and size != -1:
        sizes[axis] = size // groups * kept
    elif size != -1:
        raise RecipeMismatchError(f"cannot narrow the heads of '{label}': a symbolic size sits on the head axis")
    return sizes


def _replace_slim(builder: _Builder, r: Replacement, site: ChannelSite | None, nodes: dict[str, fx.Node]) -> None:
    """Narrow one branch: new producers with the kept rows, the channel-wise ops copied onto them,
    a new last matmul; the old ones (and their weights) die with dead-code elimination."""
    if site is None or len(site.producers) != len(r.producers):
        raise RecipeMismatchError(f"recipe slims '{r.labels[0]}', whose inner channels this model's graph does "
                                  "not expose the same way; apply the recipe to the model it was made for")
    last = nodes[site.last]
    val = nodes[site.inner].meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    new: dict[fx.Node, fx.Node] = {}
    for name, (w_key, b_key) in zip(site.producer_nodes, r.producers):
        old = nodes[name]
        args = (old.args[0], builder.param(w_key, dtype)) + ((builder.param(b_key, dtype),) if b_key else ())
        new[old] = builder._call(aten.linear.default, args, last)
    # attention: the head axis of each view / reshape / expand literal shrinks to the kept groups
    kept = builder.recipe.tensors[r.producers[0][0]].shape[0] // site.producer_unit[0] if site.heads else 0
    for i, name in enumerate(site.chain):
        old = nodes[name]
        args = fx.node.map_arg(old.args, lambda a: new.get(a, a))  # nested too: cat's list
        if site.heads and old.target in _SIZED:
            args = (args[0], _narrowed(list(args[1]), site.heads[i], site.units, kept, r.labels[0]), *args[2:])
        new[old] = builder._call(old.target, args, last, old.kwargs)
    (w_key, b_key), = r.layers
    h = new[nodes[site.inner]]
    args = (h, builder.param(w_key, dtype)) + ((builder.param(b_key, dtype),) if b_key else ())
    last.replace_all_uses_with(builder._call(aten.linear.default, args, last))


def _apply(builder: _Builder, recipe: Recipe, branches: dict[str, Branch],
           sites: dict[str, ChannelSite] | None = None) -> None:
    nodes = {n.name: n for n in builder.graph.nodes}
    for r in recipe.replacements:
        missing = [label for label in r.labels if label not in branches]
        if missing:
            raise RecipeMismatchError(f"recipe replaces '{missing[0]}', which this model does not have; "
                                      "apply the recipe to the model it was made for")
        if r.action == "slim":
            _replace_slim(builder, r, (sites or {}).get(r.labels[0]), nodes)
        elif r.is_span():
            _replace_span(builder, r, branches[r.labels[0]], branches[r.labels[-1]], nodes)
        else:
            _replace_single(builder, r, branches[r.labels[0]], nodes)
    builder.finish()
    eliminate_dead_code(builder.graph)


def apply_recipe(ep: torch.export.ExportedProgram, recipe: Recipe, *, check: bool = True,
                 inplace: bool = False, branches: Sequence[Branch] | None = None) -> torch.export.ExportedProgram:
    """Return a program in which the recipe's branches are removed or bypassed.

    The recipe is checked against the program's branches before anything changes
    (`RecipeMismatchError`). The result passes `ep.validate()` and exports to ONNX. `branches`:
    `find_branches(ep)` when the caller has them already (discovery runs once per program).

    Example:
        >>> compressed = apply_recipe(ep, recipe)  # doctest: +SKIP
    """
    by_label = {b.label: b for b in (branches if branches is not None else find_branches(ep))}
    if check:
        recipe.check_against(list(by_label.values()))
    ep = ep if inplace else copy.deepcopy(ep)
    sites = find_channel_sites(ep.graph, list(by_label.values()), param_nodes_of_program(ep)) \
        if recipe.slimmed_labels() else {}
    _apply(_ProgramBuilder(ep, recipe), recipe, by_label, sites)
    drop_unused_inputs(ep)
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    ep.validate()
    return ep


def apply_recipe_to_module(graph_module: fx.GraphModule, recipe: Recipe, *, check: bool = True) -> fx.GraphModule:
    """Apply `recipe` to a GraphModule in place (e.g. `ep.module()`): bypass weights become its
    parameters; dead code and unused parameters go. The module form of `apply_recipe`.

    Example:
        >>> gm = apply_recipe_to_module(ep.module(), recipe)  # doctest: +SKIP
    """
    param_nodes = param_nodes_of_module(graph_module)
    branches = analyze_graph(graph_module.graph, param_nodes)
    if check:  # before any mutation: a mismatched recipe leaves the module untouched
        recipe.check_against(branches)
    sites = find_channel_sites(graph_module.graph, branches, param_nodes) if recipe.slimmed_labels() else {}
    _apply(_ModuleBuilder(graph_module, recipe), recipe, {b.label: b for b in branches}, sites)
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()):
        if name not in used and "." not in name:
            delattr(graph_module, name)
    graph_module.delete_all_unused_submodules()
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
