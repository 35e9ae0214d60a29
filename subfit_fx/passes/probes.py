"""Probes: one module per residual branch, inserted as a graph node right before the branch's
residual add. A probe sees the stream x, the bypass inputs and the branch output y in one call.

- observing: accumulates `BranchStats` (nothing else is stored) and returns y itself, so the
  instrumented graph's outputs are bitwise equal to the original's;
- replacing: returns a bypass g(z) (or zeros: removal) instead of y, which lets policies
  evaluate candidate recipes and fit sequentially without rebuilding the graph;
- recording: keeps the current batch's stream after the branch (dense targets for sequential
  error-correcting fits).

Example:
    >>> from subfit_fx import capture, find_branches
    >>> from subfit_fx.zoo import tiny_model
    >>> ep = capture(tiny_model("llama"))
    >>> gm, probes = insert_probes(ep, find_branches(ep))
    >>> len(probes)
    4
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from subfit_fx.branches import Branch
from subfit_fx.channels import ChannelSite
from subfit_fx.stats import BranchStats, InnerStats

__all__ = ["BranchProbe", "InnerProbe", "InsertProbesPass", "ProbeContext", "insert_inner_probes", "insert_probes"]


class ProbeContext:
    """State shared by all probes of one graph: which tokens count, per batch."""

    def __init__(self, skip_first: bool = False) -> None:
        self.skip_first = skip_first
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool
        self._rows: torch.Tensor | None = None  # flat indices of the kept tokens; None: every token counts

    def set_batch(self, attention_mask: torch.Tensor | None) -> None:
        """Declare the mask of the next forward: padding (0) is excluded from statistics."""
        if attention_mask is None:
            self.token_mask = self._rows = None
            return
        keep = attention_mask.bool()
        if self.skip_first:
            # the first real token of each row (attention sink, massive activations)
            first = (attention_mask.long().cumsum(1) == 1) & keep
            keep = keep & ~first
        self.token_mask = keep
        # the kept rows found once per batch: boolean indexing in every probe would wait for the
        # device (a GPU sync) three times per branch per batch
        self._rows = None if bool(keep.all()) else keep.reshape(-1).nonzero().squeeze(1)

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of `t` (batch, seq, width), or (batch * seq, width) where the model flattens tokens
        (OPT's FFN), that count, flattened to (tokens, width)."""
        flat = t.reshape(-1, t.shape[-1])
        if self.token_mask is None or self._rows is None:
            return flat
        if t.shape[:2] == self.token_mask.shape or (t.dim() == 2 and t.shape[0] == self.token_mask.numel()):
            return flat.index_select(0, self._rows)
        return flat


class BranchProbe(torch.nn.Module):
    """Observer / switch for one branch (see module docstring)."""

    def __init__(self, branch: Branch, context: ProbeContext) -> None:
        super().__init__()
        self.branch = branch
        self.context = context
        self.stats: BranchStats | None = None
        self.observe_inputs: tuple[str, ...] = ()
        self.target_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.replacement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.record = False
        self.recorded: torch.Tensor | None = None

    def start_observing(self, inputs: tuple[str, ...] = ("normalized",),
                        target_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        ) -> None:
        """Reset and start accumulating statistics for the given bypass-input kinds.

        `target_fn(x, y)` overrides the regression target (default: y itself).
        """
        width = self.branch.width
        self.stats = BranchStats.empty(width, width, inputs)
        self.observe_inputs = inputs
        self.target_fn = target_fn

    def stop_observing(self) -> BranchStats | None:
        """Stop accumulating and hand back the statistics."""
        stats, self.stats, self.observe_inputs, self.target_fn = self.stats, None, (), None
        # accumulated where the activations are (no per-batch transfers); handed back on the CPU,
        # where fits, reductions and offload expect them
        return stats.to("cpu") if stats is not None else None

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            sel = self.context.select
            target = self.target_fn(x, y) if self.target_fn is not None else y
            xs = sel(x)
            inputs = {k: xs if k == "stream" else sel(z) for k in self.observe_inputs}
            if self.stats.tokens.device != xs.device:  # float64 sums on the model's device (GPU)
                self.stats.to(xs.device)
            self.stats.update(xs, inputs, sel(target))
        out = y if self.replacement is None else self.replacement(x, z)
        if self.record:
            self.recorded = (x + out).detach()
        return out


class InsertProbesPass(PassBase):
    """Insert a `BranchProbe` call before each branch's residual add (on `ep.module()`-style
    GraphModules); the add then reads the probe's output instead of y."""

    def __init__(self, branches: list[Branch], context: ProbeContext | None = None) -> None:
        super().__init__()
        self.branches = branches
        self.context = context or ProbeContext()
        self.probes: dict[str, BranchProbe] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in graph_module.graph.nodes}
        for i, b in enumerate(self.branches):
            probe = BranchProbe(b, self.context)
            name = f"subfit_probe_{i}"
            graph_module.add_submodule(name, probe)
            self.probes[b.label] = probe
            consumer, y = nodes[b.consumer], nodes[b.output]
            z = nodes[b.normalized] if b.normalized else nodes[b.skip]
            with graph_module.graph.inserting_before(consumer):
                node = graph_module.graph.call_module(name, (nodes[b.skip], z, y))
            node.meta["val"] = y.meta.get("val")
            consumer.replace_input_with(y, node)
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)


def insert_probes(ep: torch.export.ExportedProgram, branches: list[Branch],
                  context: ProbeContext | None = None) -> tuple[fx.GraphModule, dict[str, BranchProbe]]:
    """A runnable copy of `ep` with a probe on every branch; returns (module, probes by label).

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("gpt2"))
        >>> gm, probes = insert_probes(ep, find_branches(ep))
        >>> sorted(probes)[0]
        'transformer.h.0.attn'
    """
    gm = ep.module()
    pass_ = InsertProbesPass(branches, context)
    pass_(gm)
    return gm, pass_.probes


class InnerProbe(torch.nn.Module):
    """Observer of a branch's inner input h (the input of its last matmul): passes h through,
    accumulating `InnerStats` while observing; with a `replacement` set it returns
    replacement(h) instead (e.g. the dropped channels of a slimming under judgement predicted
    from the kept ones), after observing h itself."""

    def __init__(self, site: ChannelSite, context: ProbeContext) -> None:
        super().__init__()
        self.site, self.context = site, context
        self.stats: InnerStats | None = None
        self.replacement: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.update(self.context.select(h))
        if self.replacement is not None:
            return self.replacement(h)
        return h


def insert_inner_probes(gm: fx.GraphModule, sites: dict[str, ChannelSite],
                        context: ProbeContext) -> dict[str, InnerProbe]:
    """Insert an `InnerProbe` between each site's inner input and its last matmul (in place).

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.branches import param_nodes_of_program
        >>> from subfit_fx.channels import find_channel_sites
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("llama"))
        >>> sites = find_channel_sites(ep.graph, find_branches(ep), param_nodes_of_program(ep))
        >>> sorted(insert_inner_probes(ep.module(), sites, ProbeContext()))
        ['model.layers.0.mlp', 'model.layers.0.self_attn', 'model.layers.1.mlp', 'model.layers.1.self_attn']
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    probes = {}
    for i, (label, site) in enumerate(sites.items()):
        probe = InnerProbe(site, context)
        name = f"subfit_inner_probe_{i}"
        gm.add_submodule(name, probe)
        inner, last = nodes[site.inner], nodes[site.last]
        with gm.graph.inserting_before(last):
            node = gm.graph.call_module(name, (inner,))
        node.meta["val"] = inner.meta.get("val")
        last.replace_input_with(inner, node)
        probes[label] = probe
    gm.graph.lint()
    gm.recompile()
    return probes
