"""The sequential pipeline: calibrate layer by layer, with one layer's statistics alive at a time.

The basic pipeline (`Session.calibrate`) observes every branch in one pass over the data, so the
statistics of all branches are in memory together: (d+1)^2 + (d+1)d float64 values per branch and
bypass-input kind, 17 GB for the 64 branches of a 7B model (d=4096), 172 GB for the 160 of a 70B
(d=8192). The sequential pipeline instead goes one layer (or `layers_per_pass` layers) at a time,
observing only that layer's branches: the probed graph is split after each layer's last probe
(`Session.observe_layerwise`, `subfit_fx.passes.segments`), each layer's segment runs once over
every batch, and the values crossing the cut (the stream, masks, rotary tables) are cached for
the next layer; nothing after the last observed probe runs. After each layer the finished
statistics are handed to `reduce` (compact results: scores, fits; the Gram matrices are
dropped), or offloaded to a scratch directory and memory-mapped back, or kept in memory.
Replacements set before a layer runs are active in it, so the outputs of already-compressed
layers feed the next ones (`on_group` can set them between layers; a layer whose replacements it
changes runs once more, observers off).

Cost: one forward in total (`SequentialResult.forward_cost` counts it, in units of a forward up to
the last probe), plus the reruns `on_group` asks for. With no replacement active the statistics
are bitwise those of the basic pipeline: each probe accumulates the same tokens in the same order.

`LayerByLayer` makes this a session's `calibrate` (a pipeline strategy), so every policy runs on
it unchanged.

Example:
    >>> session = SessionFactory("sequential")(ep)  # doctest: +SKIP
    >>> stats = session.calibrate(batches)  # doctest: +SKIP
    >>> session.pipeline.history[-1]["peak_bytes"] < session.pipeline.history[-1]["all_at_once_bytes"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from subfit_fx.branches import Branch
from subfit_fx.calibrate import Session, Target, register_pipeline
from subfit_fx.data import Batch
from subfit_fx.errors import InputError
from subfit_fx.stats import SCALARS, BranchStats, InnerStats

__all__ = [
    "LayerByLayer",
    "SequentialResult",
    "layer_groups",
    "offload_inner",
    "offload_stats",
    "sequential_calibrate",
    "stats_from_tensors",
    "stats_nbytes",
]



def stats_nbytes(stats: BranchStats | Mapping[str, BranchStats]) -> int:
    """Bytes held by the tensors of one branch's statistics, or of a label -> statistics mapping.

    Example:
        >>> stats_nbytes(BranchStats.empty(64, 64))  # (65*65 + 65*64 + 1 + 6) float64 values
        67136
    """
    if isinstance(stats, BranchStats):
        return sum(t.numel() * t.element_size() for t in stats.tensors().values())
    return sum(stats_nbytes(s) for s in stats.values())


def stats_from_tensors(tensors: Mapping[str, torch.Tensor], width_in: int, width_out: int) -> BranchStats:
    """Inverse of `BranchStats.tensors()`: rebuild statistics from their flat name -> tensor dict.

    Example:
        >>> s = BranchStats.empty(3, 3, ("normalized", "stream"))
        >>> sorted(stats_from_tensors(s.tensors(), 3, 3).gram)
        ['normalized', 'stream']
    """
    out = BranchStats(width_in, width_out, tokens=tensors["tokens"])
    for name, t in tensors.items():
        group, _, key = name.partition(".")
        if group == "gram":
            out.gram[key] = t
        elif group == "cross":
            out.cross[key] = t
        elif group == "scalar":
            out.scalars[key] = t
    missing = set(SCALARS) - set(out.scalars)
    assert not missing, f"statistics lack scalars {sorted(missing)}"
    return out


def _mapped(tensors: Mapping[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """`tensors` written to a file under `directory` and memory-mapped back (the file unlinked)."""
    fd, name = tempfile.mkstemp(dir=directory, suffix=".pt")
    os.close(fd)
    path = Path(name)
    try:
        torch.save({k: t.detach().cpu() for k, t in tensors.items()}, path)
        return torch.load(path, mmap=True, weights_only=True)
    finally:
        # A platform that cannot unlink a mapped file leaves it to the scratch directory's removal.
        with contextlib.suppress(OSError):
            path.unlink()


def offload_inner(stats: InnerStats, directory: str | Path) -> InnerStats:
    """`offload_stats` for the inner statistics of width pruning: written under `directory`,
    returned memory-mapped (the Gram of a wide FFN is channels^2 float64).

    Example:
        >>> s = InnerStats.empty(3, gram=True)
        >>> with tempfile.TemporaryDirectory() as scratch:
        ...     tuple(offload_inner(s, scratch).gram.shape)
        (4, 4)
    """
    mapped = _mapped(stats.tensors(), Path(directory))
    out = InnerStats.empty(stats.channels)
    for key, t in mapped.items():
        setattr(out, key, t)
    return out


def offload_stats(stats: BranchStats, directory: str | Path) -> BranchStats:
    """Write `stats` under `directory` and return them memory-mapped from that file.

    The file is unlinked once mapped (POSIX keeps the data until the mapping goes), so the disk
    space comes back when the returned statistics are dropped and nothing is left behind. Pages
    are read on access and, being clean file pages, the kernel can evict them under pressure:
    the statistics of all branches can exist at once without being resident at once.

    Example:
        >>> s = BranchStats.empty(2, 2); s.tokens += 3
        >>> with tempfile.TemporaryDirectory() as scratch:
        ...     int(offload_stats(s, scratch).tokens)
        3
    """
    return stats_from_tensors(_mapped(stats.tensors(), Path(directory)), stats.width_in, stats.width_out)


@dataclass
class SequentialResult:
    """What a sequential sweep produced, and what it held in memory.

    `stats`: statistics per label when no `reduce` was given (offloaded or in memory);
    `results`: `reduce(label, stats)` per label otherwise. Byte counts are of statistics tensors:
    `peak_bytes` the most held in (anonymous) memory at once, `all_at_once_bytes` what the basic
    pipeline holds for the same labels, `offloaded_bytes` what went to the scratch directory.
    `forward_cost` is the graph work in units of one full forward over the batches.
    """

    stats: dict[str, BranchStats] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    peak_bytes: int = 0
    all_at_once_bytes: int = 0
    offloaded_bytes: int = 0
    resident_bytes: int = 0
    forward_cost: float = 0.0

    def summary(self) -> dict[str, float]:
        """Numbers for reports and logs (no tensors).

        Example:
            >>> SequentialResult().summary()["passes"]
            0
        """
        return {"passes": len(self.groups), "peak_bytes": self.peak_bytes,
                "all_at_once_bytes": self.all_at_once_bytes, "offloaded_bytes": self.offloaded_bytes,
                "forward_cost": round(self.forward_cost, 4)}


def layer_groups(branches: list[Branch], labels: Iterable[str] | None = None,
                 layers_per_pass: int = 1) -> list[list[str]]:
    """Labels grouped by layer, in depth order, `layers_per_pass` layers per group.

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.zoo import tiny_model
        >>> layer_groups(find_branches(capture(tiny_model("gpt2", layers=2))))  # doctest: +SKIP
        [['transformer.h.0.attn', 'transformer.h.0.mlp'], ['transformer.h.1.attn', 'transformer.h.1.mlp']]
    """
    if not isinstance(layers_per_pass, int) or layers_per_pass < 1:
        raise InputError(f"layers_per_pass={layers_per_pass!r} must be a positive integer")
    known = {b.label for b in branches}
    wanted = known if labels is None else set(labels)
    unknown = sorted(wanted - known)
    if unknown:
        raise InputError(f"no branch labelled {unknown[0]!r}; labels come from find_branches() of this model")
    layers: dict[int, list[str]] = {}
    for b in branches:
        if b.label in wanted:
            layers.setdefault(b.layer, []).append(b.label)
    order = sorted(layers)
    return [[label for layer in order[i:i + layers_per_pass] for label in layers[layer]]
            for i in range(0, len(order), layers_per_pass)]


def sequential_calibrate(session: Session, batches: Iterable[Batch], labels: Iterable[str] | None = None, *,
                         inputs: tuple[str, ...] = ("normalized",), targets: dict[str, Target] | None = None,
                         reduce: Callable[[str, BranchStats], Any] | None = None,
                         on_group: Callable[[list[str], dict[str, Any]], None] | None = None,
                         offload: str | Path | None = None, layers_per_pass: int = 1,
                         desc: str | None = "sequential") -> SequentialResult:
    """Calibrate `labels` (default: all branches) one layer at a time.

    Each group of `layers_per_pass` layers runs once over `batches` (`Session.observe_layerwise`:
    data-parallel, sharded and all-reduced one group at a time), from the values cached after the
    previous group to the group's last branch. Its statistics then go to
    `reduce(label, stats)` (the result is kept, the statistics dropped), else to `offload` (a
    scratch directory; memory-mapped back), else stay in memory. `on_group(labels, values)` runs
    after each group (values: the results or statistics of its labels), e.g. to set replacements
    so that the next layers see compressed outputs. `targets` are as in `Session.calibrate`.

    Example:
        >>> from subfit_fx.scores import rotation
        >>> r = sequential_calibrate(session, batches, reduce=lambda label, s: rotation(s))  # doctest: +SKIP
        >>> r.peak_bytes * 8 <= r.all_at_once_bytes  # one layer of 8  # doctest: +SKIP
        True
    """
    groups = layer_groups(session.branches, labels, layers_per_pass)
    order = session.execution_order()
    result = SequentialResult(groups=groups)
    scratch = Path(tempfile.mkdtemp(dir=offload, prefix="subfit-stats-")) if offload is not None else None
    wanted = {label: targets[label] for group in groups for label in group if label in targets} if targets else None
    sweeps = session.observe_layerwise(list(batches), groups, inputs, desc, wanted, revisable=on_group is not None)
    previous_end = -1
    try:
        for group, stats in zip(groups, sweeps, strict=True):
            end = max(order.index(label) for label in group)
            fraction = (end - previous_end) / len(order)  # this group's share of the graph's probes
            previous_end = end
            live = stats_nbytes(stats)
            result.peak_bytes = max(result.peak_bytes, result.resident_bytes + live)
            result.all_at_once_bytes += live
            result.forward_cost += fraction
            values: dict[str, Any] = {}
            for label in group:
                s = stats.pop(label)
                if reduce is not None:
                    values[label] = result.results[label] = reduce(label, s)
                elif scratch is not None:
                    values[label] = result.stats[label] = offload_stats(s, scratch)
                    result.offloaded_bytes += stats_nbytes(s)
                else:
                    values[label] = result.stats[label] = s
                    result.resident_bytes += stats_nbytes(s)
                del s  # the accumulators go now, before the next group allocates its own
            if on_group is not None:
                replaced = session.replacements(group)
                on_group(group, values)
                if session.replacements(group) != replaced:
                    result.forward_cost += fraction  # the group's segment runs again for the next groups
    finally:
        sweeps.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # files were unlinked when mapped
    return result


@dataclass
class LayerByLayer:
    """The sequential pipeline as a `Session` strategy: `Session.calibrate` runs
    `sequential_calibrate`, so every policy runs on it unchanged.

    `offload`: scratch directory for statistics (None: kept in CPU memory). `history` collects
    `SequentialResult.summary()` of every calibrate call.

    Example:
        >>> from subfit_fx import capture, find_branches
        >>> from subfit_fx.calibrate import Session
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("llama"))
        >>> s = Session(ep, find_branches(ep), pipeline=LayerByLayer(), progress=False)
        >>> ids = torch.randint(3, 128, (2, 8))
        >>> _ = s.calibrate([(ids, torch.ones_like(ids))]); s.pipeline.history[-1]["passes"]
        2
    """

    offload: str | Path | None = None
    layers_per_pass: int = 1
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.layers_per_pass, int) or self.layers_per_pass < 1:
            raise InputError(f"layers_per_pass={self.layers_per_pass!r} must be a positive integer")
        if self.offload is not None and not Path(self.offload).is_dir():
            raise InputError(f"offload directory '{self.offload}' does not exist; create it or pass an existing one")

    def calibrate(self, session: Session, batches: list[Batch], labels: list[str], inputs: tuple[str, ...],
                  desc: str | None, targets: dict[str, Target] | None) -> dict[str, BranchStats]:
        """Statistics of `labels`, computed one layer (group) at a time."""
        result = sequential_calibrate(session, batches, labels, inputs=inputs, targets=targets,
                                      offload=self.offload, layers_per_pass=self.layers_per_pass, desc=desc)
        self.history.append(result.summary())
        return result.stats

    def inner(self, session: Session, batches: list[Batch], labels: list[str], gram: bool,
              desc: str | None) -> dict[str, InnerStats]:
        """Inner statistics of `labels`, one layer (group) at a time in one sweep: one group's
        accumulators alive at once, each finished group's offloaded to `offload` when set."""
        groups = layer_groups(session.branches, labels, self.layers_per_pass)
        scratch = Path(tempfile.mkdtemp(dir=self.offload, prefix="subfit-inner-")) if self.offload else None
        out: dict[str, InnerStats] = {}
        try:
            for stats in session.observe_inner_layerwise(batches, groups, gram, desc):
                out.update({label: offload_inner(s, scratch) if scratch else s for label, s in stats.items()})
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)  # files were unlinked when mapped
        return out


register_pipeline("sequential", LayerByLayer)
