"""prepare -> calibrate: instrument a capture with probes and stream batches through it.

The `Session` is the calibration boundary: a policy asks it for what it needs - branch
statistics (`calibrate`), the streams after branches (`record_streams`), every branch's input and
output as batches pass (`watch`), outputs under a set of replacements (`replaced`, `forward`) - and
never touches the probes, their shared token context or the probed module, which belong to the
session and the pipelines (`subfit_fx.pipelines`) that run it.

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.zoo import tiny_model
    >>> session = prepare(capture(tiny_model("llama")))
    >>> stats = session.calibrate([(torch.randint(0, 128, (2, 8)), torch.ones(2, 8, dtype=torch.long))])
    >>> int(stats["model.layers.0.mlp"].tokens)
    16
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final, Protocol

import torch
from tqdm.auto import tqdm

from subfit_fx.branches import Branch, find_branches, param_nodes_of_program
from subfit_fx.channels import ChannelSite, find_channel_sites
from subfit_fx.data import Batch
from subfit_fx.errors import CalibrationError, InputError
from subfit_fx.fit import Fit
from subfit_fx.interrupts import raise_if_interrupted
from subfit_fx.passes.probes import BranchProbe, InnerProbe, ProbeContext, insert_inner_probes, insert_probes
from subfit_fx.passes.segments import Segment, graph_output, initial_values, run_segment, split_graph
from subfit_fx.rewrite import stream_after
from subfit_fx.stats import BranchStats, InnerStats

if TYPE_CHECKING:  # importing it at run time pulls in transformers
    from subfit_fx.offload import OffloadedWeights

__all__ = ["PIPELINES", "REMOVE", "LocalReducer", "OnePass", "Pipeline", "Reducer", "ResumableForward", "Session",
           "prepare", "register_pipeline"]

REMOVE: Final = "remove"  # a replacement that removes the branch (its output becomes 0)


def _zeros(x: torch.Tensor, _z: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


Target = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Reducer(Protocol):
    """Where the data lives: which batches this process runs, and how its sums combine with the
    other processes' (`LocalReducer`: one process; `subfit_fx.pipelines.AllReduce`: data-parallel)."""

    rank: int
    world: int

    def shard(self, batches: list[Batch]) -> list[Batch]:
        """The batches this process runs."""

    def stats(self, stats: dict[str, BranchStats]) -> dict[str, BranchStats]:
        """Statistics of one observation, summed over processes (in place)."""

    def sums(self, sums: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """A policy's own sums, summed over processes."""


class LocalReducer:
    """One process: every batch runs here and every sum is complete already.

    Example:
        >>> LocalReducer().shard([1, 2, 3])
        [1, 2, 3]
    """

    rank, world = 0, 1

    def shard(self, batches: list[Batch]) -> list[Batch]:
        """All of them."""
        return batches

    def stats(self, stats: dict[str, BranchStats]) -> dict[str, BranchStats]:
        """As they are."""
        return stats

    def sums(self, sums: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """As they are."""
        return sums


class Pipeline(Protocol):
    """How `Session.calibrate` gathers statistics: in one pass (`OnePass`) or e.g. layer by layer
    (`subfit_fx.pipelines.LayerByLayer`), through `Session.observe` or `Session.observe_layerwise`."""

    def calibrate(self, session: Session, batches: list[Batch], labels: list[str], inputs: tuple[str, ...],
                  desc: str | None, targets: dict[str, Target] | None) -> dict[str, BranchStats]:
        """Statistics of `labels`."""

    # optional: `inner(session, batches, labels, gram, desc) -> dict[str, InnerStats]`, the inner
    # statistics of width pruning (`Session.inner_stats`; one pass when a pipeline lacks it)


class OnePass:
    """Every requested branch observed in one pass over the batches (the basic pipeline).

    Example:
        >>> OnePass().calibrate  # doctest: +ELLIPSIS
        <bound method OnePass.calibrate of ...>
    """

    def calibrate(self, session: Session, batches: list[Batch], labels: list[str], inputs: tuple[str, ...],
                  desc: str | None, targets: dict[str, Target] | None) -> dict[str, BranchStats]:
        """One observation of all `labels`."""
        return session.observe(batches, labels, inputs, desc, targets)

    def inner(self, session: Session, batches: list[Batch], labels: list[str], gram: bool,
              desc: str | None) -> dict[str, InnerStats]:
        """Inner statistics of all `labels` in one pass."""
        return session.observe_inner(batches, labels, gram, desc)


# name -> Pipeline factory (keyword options); subfit_fx.pipelines registers "sequential"
PIPELINES: dict[str, Callable[..., Pipeline]] = {"basic": OnePass}


def register_pipeline(name: str, factory: Callable[..., Pipeline]) -> None:
    """Make a pipeline available by name (`SessionFactory(name)`, `--pipeline name`).

    Example:
        >>> register_pipeline("basic", OnePass); "basic" in PIPELINES
        True
    """
    PIPELINES[name] = factory


class Session:
    """A probed, runnable copy of a capture plus its branches: the workspace of every policy.

    `pipeline` decides how `calibrate` gathers statistics (default `OnePass`), `reducer` where the
    data lives (default `LocalReducer`); both are strategies, so policies never know which run.
    """

    def __init__(self, ep: torch.export.ExportedProgram, branches: list[Branch], skip_first: bool = False,
                 progress: bool = True, *, pipeline: Pipeline | None = None, reducer: Reducer | None = None,
                 weights: OffloadedWeights | None = None) -> None:
        self.ep = ep
        self.branches = branches
        self.by_label = {b.label: b for b in branches}
        self.pipeline = pipeline or OnePass()
        self.reducer = reducer or LocalReducer()
        self._context = ProbeContext(skip_first=skip_first)
        self._module, self._probes = insert_probes(ep, branches, self._context)
        self.weights: OffloadedWeights | None = None  # None: every weight resident
        if weights is not None:
            self.offload_weights(weights)
        self._inner: dict[str, InnerProbe] | None = None  # inserted on the first inner_stats call
        self._closures: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.graph_version = 0  # bumped whenever the probed graph changes
        self.progress = progress and self.reducer.rank == 0  # one progress bar, on rank 0

    # -- running --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Run one batch through the probed graph (probes do what they are set to do)."""
        self.require_weights("a whole forward of the model")
        ids, mask = batch
        self._context.set_batch(mask)
        return self._module(ids, mask)

    def run(self, batches: Iterable[Batch], desc: str | None = None,
            each: Callable[[Batch, torch.Tensor], None] | None = None) -> None:
        """Run this process's share of `batches` (all of them in one process; a progress bar when
        `desc` is given), calling `each(batch, out)`."""
        batches = self.reducer.shard(list(batches))
        bar = tqdm(batches, desc=desc, leave=False, disable=not (self.progress and desc), unit="batch")
        for batch in bar:
            raise_if_interrupted()
            out = self.forward(batch)
            if each is not None:
                each(batch, out)

    def offload_weights(self, weights: OffloadedWeights) -> None:
        """From now on keep this session's weights in `weights`' checkpoint: the probed graph and
        the capture hold meta stand-ins, and the layer-wise pipeline reads each segment's weights
        while it runs (`subfit_fx.offload`).

        Example:
            >>> session.offload_weights(OffloadedWeights("runs/reference"))  # doctest: +SKIP
        """
        if isinstance(self.pipeline, OnePass):
            raise InputError("weight offload needs the layer-wise pipeline (the basic one runs whole forwards); "
                             "pass --pipeline sequential")
        weights.detach(self._module, self.ep.state_dict)
        self.weights = weights

    def require_weights(self, what: str) -> None:
        """Raise an `InputError` naming `what` when this session's weights are offloaded (only
        the layer-wise pipeline brings them in, one segment at a time).

        Example:
            >>> session.require_weights("the output judge")  # doctest: +SKIP
        """
        if self.weights is not None:
            raise InputError(f"{what} needs every weight in memory, but this session's weights are offloaded "
                             f"(read from '{self.weights.directory}' one layer at a time); calibrate with the "
                             "layer-wise pipeline (--pipeline sequential) and a statistics-only policy "
                             "(e.g. --judge statistics), or run without weight offload")

    def resumable(self, batches: list[Batch]) -> ResumableForward:
        """Forwards of `batches` that can restart at a branch (see `ResumableForward`).

        Example:
            >>> run = session.resumable(held); outs = run.forward_all()  # doctest: +SKIP
        """
        return ResumableForward(self, batches)

    def _probe_nodes(self) -> dict[str, str]:
        """Branch label -> name of its probe's node in the probed graph."""
        owner = {id(probe): label for label, probe in self._probes.items()}
        return {owner[id(self._module.get_submodule(n.target))]: n.name for n in self._module.graph.nodes
                if n.op == "call_module" and id(self._module.get_submodule(n.target)) in owner}

    def execution_order(self) -> list[str]:
        """Branch labels in the order the graph runs their probes."""
        return list(self._probe_nodes())  # graph order

    # -- replacements ---------------------------------------------------------------------

    def set_replacement(self, label: str, fit: Fit | str | None, input_kind: str = "normalized") -> None:
        """Make branch `label` return fit(z) (or fit(x) for input_kind "stream"; a fit that names
        its own `input` reads that), 0 for `REMOVE`, or its own output again for None."""
        probe = self._probes[label]
        if fit is None or isinstance(fit, str):
            if fit not in (None, REMOVE):
                raise ValueError(f"replacement {fit!r} is not a Fit, REMOVE or None")
            probe.replacement = None if fit is None else _zeros
            return
        stream = (fit.input or input_kind) == "stream" or self.by_label[label].normalized is None
        # one closure per live (fit, input): setting the same fit again is the same replacement, so
        # `replacements()` compares by identity (restart points of ResumableForward stay valid); an
        # entry lives while its closure (which holds the fit, so the id stays unique) is referenced
        key = (id(fit), stream)
        replacement = self._closures.get(key)
        if replacement is None:
            def replacement(x: torch.Tensor, z: torch.Tensor, _fit: Fit = fit) -> torch.Tensor:
                return _fit.apply(x if stream else z)

            self._closures[key] = replacement
        probe.replacement = replacement

    def replacements(self, labels: Iterable[str]) -> tuple[tuple[Callable[..., torch.Tensor] | None, ...], ...]:
        """What each branch in `labels` currently returns instead of its output, and what its
        inner probe returns instead of h (None: unchanged); compare two calls to see whether
        replacements changed in between.

        Example:
            >>> session.replacements(["model.layers.0.mlp"])  # doctest: +SKIP
            ((None, None),)
        """
        inner = self._inner or {}
        return tuple((self._probes[label].replacement,
                      inner[label].replacement if label in inner else None) for label in labels)

    def set_inner_replacement(self, label: str, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Make branch `label`'s last matmul read fn(h) instead of its inner input h (None: h
        again): how a width-pruning policy judges a slimming at the output before it rewrites
        anything. Only branches with a channel site (`channel_sites`) have one.

        Example:
            >>> session.set_inner_replacement("model.layers.3.mlp", lambda h: h * keep)  # doctest: +SKIP
        """
        inner = self._inner_probes()
        if label not in inner:
            raise ValueError(f"branch {label!r} has no channel site (no inner input to replace)")
        inner[label].replacement = fn

    def clear_replacements(self) -> None:
        """Restore every branch (inner replacements included)."""
        for probe in self._probes.values():
            probe.replacement = None
        for inner in (self._inner or {}).values():
            inner.replacement = None

    @contextmanager
    def replaced(self, replacements: Mapping[str, Fit | str | None] | None = None,
                 input_kind: str = "normalized") -> Iterator[Session]:
        """Within the block exactly `replacements` apply (every other branch runs as in the dense
        model); whatever was set before comes back on exit.

        Example:
            >>> with session.replaced({"model.layers.1.mlp": REMOVE}):  # doctest: +SKIP
            ...     logits = session.forward(batch)
        """
        saved = {label: probe.replacement for label, probe in self._probes.items()}
        saved_inner = {label: probe.replacement for label, probe in (self._inner or {}).items()}
        self.clear_replacements()
        try:
            for label, fit in (replacements or {}).items():
                self.set_replacement(label, fit, input_kind)
            yield self
        finally:
            for label, fn in saved.items():
                self._probes[label].replacement = fn
            for label, fn in saved_inner.items():
                self._inner[label].replacement = fn  # type: ignore[index]

    # -- streams --------------------------------------------------------------------------

    def real_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of `t` (batch, seq, width) that count in the current batch (no padding; not the
        first token with skip_first), flattened to (tokens, width)."""
        return self._context.select(t)

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(batch, seq) bool mask of the tokens that count in the current batch (None: all)."""
        return self._context.token_mask

    def watch(self, batches: Iterable[Batch], each: Callable[[str, torch.Tensor, torch.Tensor], None],
              labels: Iterable[str] | None = None, desc: str | None = None) -> None:
        """Run `batches`, calling `each(label, x, y)` with every watched branch's input stream `x`
        and output `y` (its replacement's, where one is set), in graph order within each batch.

        Example:
            >>> session.watch(batches, lambda label, x, y: print(label, x.shape))  # doctest: +SKIP
        """
        labels = list(labels) if labels is not None else [b.label for b in self.branches]

        def hook_for(label: str) -> Callable[..., None]:
            return lambda _module, args, out: each(label, args[0], out)

        handles = [self._probes[label].register_forward_hook(hook_for(label)) for label in labels]
        try:
            self.run(batches, desc)
        finally:
            for handle in handles:
                handle.remove()

    def post_norm(self, label: str) -> bool:
        """True when the stream after branch `label` is a LayerNorm of the residual sum (post-LN,
        BERT), False when it is the sum itself (pre-LN).

        Example:
            >>> from subfit_fx import capture
            >>> from subfit_fx.zoo import tiny_model
            >>> prepare(capture(tiny_model("bert")), progress=False).post_norm("encoder.layer.0.attention")
            True
        """
        nodes = {n.name: n for n in self._module.graph.nodes}
        return stream_after(self.by_label[label], nodes).target is torch.ops.aten.layer_norm.default

    def stream_map(self, label: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Map the residual sum `x + y` of branch `label` to the stream after it: identity for
        pre-LN models, the graph's own LayerNorm (same weights and eps) for post-LN ones.

        Example:
            >>> from subfit_fx import capture
            >>> from subfit_fx.zoo import tiny_model
            >>> s = prepare(capture(tiny_model("bert")), progress=False)
            >>> with torch.no_grad():
            ...     out = s.stream_map(s.branches[0].label)(torch.randn(1, 3, 64) * 5)
            >>> float(out.std(-1).mean()) < 1.1
            True
        """
        nodes = {n.name: n for n in self._module.graph.nodes}
        node = stream_after(self.by_label[label], nodes)
        if node.target is not torch.ops.aten.layer_norm.default:
            return lambda v: v
        args = [*node.args, None, None, None, None][:5]
        shape, weight, bias = list(args[1]), _attr(self._module, args[2]), _attr(self._module, args[3])
        eps = 1e-5 if args[4] is None else float(args[4])
        return lambda v: torch.nn.functional.layer_norm(v, shape, weight, bias, eps)

    @torch.no_grad()
    def record_streams(self, batches: list[Batch], labels: Iterable[str], desc: str | None = "record streams",
                       *, after_norm: bool = True) -> dict[str, list[torch.Tensor]]:
        """The stream after each branch in `labels`, one (batch, seq, width) tensor per batch
        (`after_norm=False`: the residual sum x + y before a post-LN norm).

        Example:
            >>> streams = session.record_streams(batches, ["model.layers.1.mlp"])  # doctest: +SKIP
        """
        labels = list(labels)
        maps = {label: self.stream_map(label) if after_norm else (lambda v: v) for label in labels}
        kept: dict[str, list[torch.Tensor]] = {label: [] for label in labels}
        self.watch(batches, lambda label, x, y: kept[label].append(maps[label]((x + y).detach())), labels, desc)
        return kept

    def output_sensitivity(self, batches: list[Batch], labels: Iterable[str] | None = None, *, causal: bool,
                           seed: int = 0, desc: str | None = "output sensitivity") -> dict[str, torch.Tensor]:
        """How much the model's output moves when each branch's output moves: per branch in
        `labels` (default: all), the mean over real tokens of g g^T (width x width, float64), g the
        gradient at the branch's output of a probe loss whose expected g g^T is the output metric.

        Causal LMs: the log-likelihood of next tokens sampled from the model's own prediction, so
        E[g g^T] is the Fisher information and d^T F d / 2 the KL a small change d of the branch
        output causes (per token, taking tokens independently). Other models: a random Gaussian
        projection of the output, so E[g g^T] = J^T J and d^T J^T J d is the squared output change
        (the output judge's measures, to second order). Same-depth replacements may be set; each
        batch costs a forward and a backward with no weight gradients.

        Example:
            >>> from subfit_fx import capture
            >>> from subfit_fx.zoo import tiny_model
            >>> s = prepare(capture(tiny_model("llama")), progress=False)
            >>> ids = torch.randint(0, 128, (2, 8)); mask = torch.ones(2, 8, dtype=torch.long)
            >>> f = s.output_sensitivity([(ids, mask)], ["model.layers.0.mlp"], causal=True)
            >>> f["model.layers.0.mlp"].shape
            torch.Size([64, 64])
        """
        self.require_weights("the output sensitivity (a backward pass through the whole model)")
        labels = list(labels) if labels is not None else [b.label for b in self.branches]
        gen = torch.Generator().manual_seed(seed)
        sums: dict[Any, torch.Tensor] = {}
        leaves: dict[str, torch.Tensor] = {}

        def hook_for(label: str) -> Callable[..., torch.Tensor]:
            def hook(_module: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
                leaves[label] = torch.zeros_like(out, requires_grad=True)
                return out + leaves[label]  # d loss / d leaf = d loss / d branch output
            return hook

        handles = [self._probes[label].register_forward_hook(hook_for(label)) for label in labels]
        flags = {p: p.requires_grad for p in self._module.parameters()}
        try:
            for p in flags:
                p.requires_grad_(False)
            bar = tqdm(self.reducer.shard(list(batches)), desc=desc, leave=False, unit="batch",
                       disable=not (self.progress and desc))
            for ids, mask in bar:
                raise_if_interrupted()
                leaves.clear()
                self._context.set_batch(mask)
                with torch.enable_grad():
                    out = self._module(ids, mask)
                    keep = (mask > 0) if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
                    if causal:
                        logp = torch.log_softmax(out[keep].float(), dim=-1)
                        with torch.no_grad():
                            picked = torch.multinomial(logp.exp().cpu(), 1, generator=gen).to(logp.device)
                        loss = logp.gather(-1, picked).sum()
                    else:
                        noise = torch.randn(out[keep].shape, generator=gen, dtype=torch.float32)
                        loss = (out[keep].float() * noise.to(out.device)).sum()
                    grads = torch.autograd.grad(loss, [leaves[label] for label in labels])
                for label, grad in zip(labels, grads, strict=True):
                    g = self.real_tokens(grad).double()
                    sums[label] = sums.get(label, 0) + g.T @ g
                    sums["tokens", label] = sums.get(("tokens", label), 0) + torch.tensor(float(g.shape[0]))
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
        sums = self.reducer.sums(sums)
        return {label: (sums[label] / sums["tokens", label].clamp_min(1)).cpu() for label in labels}

    # -- statistics -----------------------------------------------------------------------

    def reduce_sums(self, sums: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """Combine sums that a policy accumulated itself over `run` passes (hooks, `each=`): in one
        process they are complete already; data-parallel, each process saw its shard, so the
        reducer sums them over processes.

        Example:
            >>> session.reduce_sums({"n": torch.ones(1)})  # doctest: +SKIP
            {'n': tensor([1.])}
        """
        return self.reducer.sums(sums)

    def calibrate(self, batches: Iterable[Batch], labels: Iterable[str] | None = None,
                  inputs: tuple[str, ...] = ("normalized",), desc: str | None = "calibrate",
                  targets: dict[str, Target] | None = None) -> dict[str, BranchStats]:
        """Statistics for `labels` (default: all branches) over `batches`, gathered by the session's
        pipeline. `targets[label](x, y)` replaces a branch's regression target (default: y).

        Raises `CalibrationError` when no token was seen or a statistic is not finite.
        """
        labels = list(labels) if labels is not None else [b.label for b in self.branches]
        return self.pipeline.calibrate(self, list(batches), labels, inputs, desc, targets)

    def observe(self, batches: list[Batch], labels: list[str], inputs: tuple[str, ...] = ("normalized",),
                desc: str | None = None, targets: dict[str, Target] | None = None) -> dict[str, BranchStats]:
        """One pass that accumulates the statistics of `labels` (the basic pipeline's building
        block; the layer-wise one is `observe_layerwise`), summed over processes."""
        probes: dict[str, BranchProbe] = {label: self._probes[label] for label in labels}
        for label, probe in probes.items():
            probe.start_observing(inputs, (targets or {}).get(label))
        try:
            self.run(batches, desc)
        finally:
            stats = {label: probe.stop_observing() for label, probe in probes.items()}
        return self._checked(self.reducer.stats(stats))

    def observe_layerwise(self, batches: list[Batch], groups: list[list[str]],
                          inputs: tuple[str, ...] = ("normalized",), desc: str | None = None,
                          targets: dict[str, Target] | None = None, *,
                          revisable: bool = False) -> Iterator[dict[str, BranchStats]]:
        """Statistics of each group of labels in turn (summed over processes), with every node of
        the graph up to the last group's last probe run once per batch in total.

        The graph is split after each group's last probe (`subfit_fx.passes.segments`); the values
        that cross a cut (the residual stream, masks, rotary tables) are kept for every batch of
        this process's shard between groups (the activation cache). Replacements set before a group
        runs are active in it. With `revisable`, replacements of a group's own branches may change
        while the caller holds its statistics (before asking for the next group): its segment then
        runs again, observers off, so later groups see the new outputs (this keeps the group's
        input values alive one group longer). Groups must follow the graph's order.

        Example:
            >>> for stats in session.observe_layerwise(batches, [["model.layers.0.self_attn"]]):  # doctest: +SKIP
            ...     print(sorted(stats))
            ['model.layers.0.self_attn']
        """
        def start(group: list[str]) -> None:
            for label in group:
                self._probes[label].start_observing(inputs, (targets or {}).get(label))

        def stop(group: list[str]) -> dict[str, BranchStats]:
            return {label: self._probes[label].stop_observing() for label in group}

        with closing(self._layer_sweeps(batches, groups, desc, start, stop, revisable)) as sweeps:
            for stats in sweeps:
                yield self._checked(self.reducer.stats(stats))

    def _layer_sweeps(self, batches: list[Batch], groups: list[list[str]], desc: str | None,
                      start: Callable[[list[str]], None], stop: Callable[[list[str]], dict[str, Any]],
                      revisable: bool = False) -> Iterator[dict[str, Any]]:
        """The layer-wise sweep under `observe_layerwise` and `observe_inner_layerwise`: for each
        group, `start(group)` sets its observers, its segment runs over every batch (its weights
        brought in first when they are offloaded), and `stop(group)` hands back what they saw."""
        order = self.execution_order()
        ends = [max(order.index(label) for label in group) for group in groups]
        starts = [min(order.index(label) for label in group) for group in groups]
        if any(s <= e for s, e in zip(starts[1:], ends, strict=False)):
            raise ValueError("layer-wise groups must follow the graph's order, each after the previous "
                             "group's last branch")
        node_of = self._probe_nodes()
        cuts = [node_of[order[e]] for e in ends]
        # With offloaded weights the stream entering the first group is computed by a segment of
        # its own (observers off): the embedding table, often the largest tensor, is then never
        # resident together with the first layer's weights and statistics.
        head = self.by_label[order[starts[0]]].skip if self.weights is not None and groups else None
        if head is not None and next(n for n in self._module.graph.nodes if n.name == head).op != "call_function":
            head = None
        segments = split_graph(self._module, [head, *cuts] if head is not None else cuts)
        shard = self.reducer.shard(list(batches))
        values = [initial_values(self._module, batch) for batch in shard]
        bar = tqdm(total=len(groups) * len(shard), desc=desc, leave=False, unit="batch",
                   disable=not (self.progress and desc))

        def sweep(segment: Segment, keep_inputs: bool) -> list[dict[str, Any]]:
            before = [dict(v) for v in values] if keep_inputs else []
            for batch, v in zip(shard, values, strict=True):
                raise_if_interrupted()
                self._context.set_batch(batch[1])
                with torch.no_grad():
                    run_segment(segment, v)
            return before

        if head is not None:
            lead, segments = segments[0], segments[1:]
            with self.weights.onloaded(lead.module, lead.params):
                sweep(lead, False)
        try:
            for group, segment in zip(groups, segments, strict=True):
                start(group)
                # offloaded weights: this segment's come in for the group and go after it
                onloaded = self.weights.onloaded(segment.module, segment.params) if self.weights else nullcontext()
                with onloaded:
                    try:
                        before = sweep(segment, revisable)
                    finally:
                        stats = stop(group)
                    bar.update(len(shard))
                    set_before = self.replacements(group)
                    yield stats
                    if self.replacements(group) != set_before:
                        if not revisable:
                            raise ValueError("replacements of an observed group changed before the next group; "
                                             "pass revisable=True")
                        values[:] = before
                        sweep(segment, False)
                del before
        finally:
            bar.close()

    def _checked(self, stats: dict[str, BranchStats]) -> dict[str, BranchStats]:
        for label, s in stats.items():
            if int(s.tokens) == 0:
                raise CalibrationError("calibration saw no tokens (all padding?); pass non-empty sequences")
            if not s.is_finite():
                raise CalibrationError(f"statistics of '{label}' hold NaN or Inf (non-finite activations); "
                                       "check the model in float32 and the calibration text")
        return stats

    @functools.cached_property
    def channel_sites(self) -> dict[str, ChannelSite]:
        """Channel sites (width-pruning structure) of the branches, by label."""
        return find_channel_sites(self.ep.graph, self.branches, param_nodes_of_program(self.ep))

    def _inner_probes(self) -> dict[str, InnerProbe]:
        # only sessions that ask for inner statistics pay for the extra probe calls per forward
        if self._inner is None:
            self._inner = insert_inner_probes(self._module, self.channel_sites, self._context)
            self.graph_version += 1  # segments split before this (ResumableForward) are stale
        return self._inner

    def inner_stats(self, batches: Iterable[Batch], labels: Iterable[str] | None = None, *, gram: bool = True,
                    desc: str | None = "inner statistics") -> dict[str, InnerStats]:
        """Statistics of the inner input h of each branch in `labels` that has a channel site
        (default: all of them), summed over processes; `gram` adds the Gram of [h, 1]
        (channels^2 floats per branch). The pipeline decides how (`Pipeline.inner`: one pass, or
        one layer at a time); a pipeline without `inner` gets one pass.

        Example:
            >>> s = prepare(capture(tiny_model("llama")), progress=False)  # doctest: +SKIP
            >>> s.inner_stats(batches)["model.layers.0.mlp"].variance().shape  # doctest: +SKIP
            torch.Size([128])
        """
        sites = self.channel_sites
        labels = [label for label in (labels if labels is not None else sites) if label in sites]
        strategy = getattr(self.pipeline, "inner", None)
        stats = (strategy(self, list(batches), labels, gram, desc) if strategy is not None
                 else self.observe_inner(list(batches), labels, gram, desc))
        for label, s in stats.items():
            if int(s.tokens) == 0:
                raise CalibrationError("calibration saw no tokens (all padding?); pass non-empty sequences")
            if not s.is_finite():
                raise CalibrationError(f"inner statistics of '{label}' hold NaN or Inf (non-finite activations); "
                                       "check the model in float32 and the calibration text")
        return stats

    def _inner_observers(self, gram: bool) -> tuple[Callable[[list[str]], None],
                                                    Callable[[list[str]], dict[str, InnerStats]]]:
        """(start, stop) of the inner probes of a list of labels (those without a site are skipped)."""
        inner = self._inner_probes()

        def start(labels: list[str]) -> None:
            for label in labels:
                if label in inner:
                    inner[label].stats = InnerStats.empty(self.channel_sites[label].channels, gram)

        def stop(labels: list[str]) -> dict[str, InnerStats]:
            # handed back on the CPU, where the policies' solves expect them
            out = {label: inner[label].stats.to("cpu") for label in labels
                   if label in inner and inner[label].stats is not None}
            for label in labels:
                if label in inner:
                    inner[label].stats = None
            return self._reduce_inner(out)

        return start, stop

    def _reduce_inner(self, stats: dict[str, InnerStats]) -> dict[str, InnerStats]:
        flat = self.reducer.sums({(label, key): t for label, s in stats.items() for key, t in s.tensors().items()})
        for (label, key), t in flat.items():
            setattr(stats[label], key, t)
        return stats

    def observe_inner(self, batches: list[Batch], labels: list[str], gram: bool = True,
                      desc: str | None = None) -> dict[str, InnerStats]:
        """Inner statistics of `labels` in one pass over `batches` (the basic pipeline's way).

        Example:
            >>> session.observe_inner(batches, ["model.layers.0.mlp"])  # doctest: +SKIP
        """
        start, stop = self._inner_observers(gram)
        start(labels)
        try:
            self.run(batches, desc)
        finally:
            stats = stop(labels)
        return stats

    def observe_inner_layerwise(self, batches: list[Batch], groups: list[list[str]], gram: bool = True,
                                desc: str | None = None) -> Iterator[dict[str, InnerStats]]:
        """Inner statistics of each group of labels in turn, one layer-wise sweep (each layer run
        once, as `observe_layerwise`): only one group's accumulators (with `gram`, channels^2
        floats per branch) exist at a time.

        Example:
            >>> for stats in session.observe_inner_layerwise(batches, [["model.layers.0.mlp"]]):  # doctest: +SKIP
            ...     print(sorted(stats))
            ['model.layers.0.mlp']
        """
        start, stop = self._inner_observers(gram)  # inserts the inner probes before the graph is split
        yield from self._layer_sweeps(batches, groups, desc, start, stop)


class ResumableForward:
    """Forwards of a fixed list of batches that restart at a branch instead of at the embedding.

    `forward_all()` runs the whole graph and keeps, per batch, the values that cross the cut
    before every branch (the residual stream; masks and rotary tables are shared, not copied);
    `forward_from(label)` then reruns only from `label`'s branch on, which is all that changes
    when only that branch's (or later branches') replacement changed since. Outputs are bitwise
    those of full forwards. Memory: one stream per branch per batch; where that exceeds
    `max_bytes`, only every k-th restart point is kept (k as small as fits) and `forward_from`
    restarts at the nearest kept point at or before the branch.

    Example:
        >>> run = session.resumable(held)  # doctest: +SKIP
        >>> base = run.forward_all()  # doctest: +SKIP
        >>> session.set_replacement("model.layers.20.mlp", REMOVE)  # doctest: +SKIP
        >>> only_the_tail = run.forward_from("model.layers.20.mlp")  # doctest: +SKIP
    """

    def __init__(self, session: Session, batches: list[Batch], max_bytes: int = 2 << 30) -> None:
        session.require_weights("restartable forwards (the output judge)")
        self.session, self.batches, self.max_bytes = session, list(batches), max_bytes
        self.order = session.execution_order()
        self._split()
        self._saved: list[dict[int, dict[str, Any]]] = []  # per batch: segment index -> the values before it
        self._state: tuple | None = None  # replacements in place at the last forward_all
        self.every = 1  # restart points kept: every k-th branch
        self.peak_bytes = 0  # most bytes of restart points held at once so far

    def _split(self) -> None:
        nodes = self.session._probe_nodes()
        # segment k ends right after branch k's probe; the last one runs to the output
        self._segments = split_graph(self.session._module, [nodes[label] for label in self.order], tail=True)
        self._version = self.session.graph_version

    @torch.no_grad()
    def forward_all(self) -> list[torch.Tensor]:
        """Outputs of every batch under the current replacements, remembering where to restart."""
        if self._version != self.session.graph_version:
            self._split()
        self._saved = []
        outs, seen, total = [], set(), 0
        for b, batch in enumerate(self.batches):
            values, saved = initial_values(self.session._module, batch), {}
            self.session._context.set_batch(batch[1])
            for k, segment in enumerate(self._segments[:len(self.order)]):
                if k % self.every == 0:
                    saved[k] = dict(values)
                    added = 0
                    for t in values.values():  # bytes each point adds (shared tables count once)
                        if isinstance(t, torch.Tensor) and id(t) not in seen:
                            seen.add(id(t))
                            added += t.numel() * t.element_size()
                    total += added
                    if b == 0 and k == 1 and self.every == 1:
                        # the second point holds one stream: project the whole run and thin now,
                        # before the points pile up past the cap
                        projected = added * len(self.order) * len(self.batches)
                        if projected > self.max_bytes:
                            self.every = -(-projected // self.max_bytes)
                            del saved[k]
                            total -= added
                    self.peak_bytes = max(self.peak_bytes, total)
                run_segment(segment, values)
            run_segment(self._segments[-1], values)
            self._saved.append(saved)
            outs.append(graph_output(self.session._module, values))
        if total > self.max_bytes:  # the projection was short (streams of different sizes)
            self.every *= -(-total // self.max_bytes)
            self._saved = [{k: v for k, v in saved.items() if k % self.every == 0} for saved in self._saved]
        self._state = self.session.replacements(self.order)
        return outs

    @torch.no_grad()
    def forward_from(self, label: str) -> list[torch.Tensor]:
        """Outputs of every batch, rerunning only from branch `label` (or the nearest kept restart
        point before it) on; every replacement before that point must be as at the last `forward_all`."""
        start = self.order.index(label) // self.every * self.every
        if (self._state is None or self._version != self.session.graph_version
                or self.session.replacements(self.order[:start]) != self._state[:start]):
            raise ValueError(f"replacements before {label!r} changed since forward_all(); call forward_all() first")
        outs = []
        for batch, saved in zip(self.batches, self._saved, strict=True):
            values = dict(saved[start])
            self.session._context.set_batch(batch[1])
            for segment in self._segments[start:]:
                run_segment(segment, values)
            outs.append(graph_output(self.session._module, values))
        return outs


def prepare(ep: torch.export.ExportedProgram, branches: list[Branch] | None = None, *, skip_first: bool = False,
            progress: bool = True) -> Session:
    """Instrument `ep` with a probe on every branch (observers off until `calibrate`).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> len(prepare(capture(tiny_model("gpt2"))).branches)
        4
    """
    return Session(ep, branches if branches is not None else find_branches(ep), skip_first, progress)


def _attr(module: torch.nn.Module, arg: Any) -> Any:
    """Value of a graph argument that is a `get_attr` node (a parameter), else the argument itself."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return functools.reduce(getattr, str(arg.target).split("."), module)
    return arg
