"""prepare -> calibrate: instrument a capture with probes and stream batches through it.

Example:
    >>> from subfit_fx import capture
    >>> from subfit_fx.zoo import tiny_model
    >>> session = prepare(capture(tiny_model("llama")))
    >>> stats = session.calibrate([(torch.randint(0, 128, (2, 8)), torch.ones(2, 8, dtype=torch.long))])
    >>> int(stats["model.layers.0.mlp"].tokens)
    16
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from subfit_fx.branches import Branch, find_branches
from subfit_fx.data import Batch
from subfit_fx.errors import CalibrationError
from subfit_fx.fit import Fit
from subfit_fx.passes.probes import BranchProbe, ProbeContext, insert_probes
from subfit_fx.stats import BranchStats

__all__ = ["Session", "prepare"]


class Session:
    """A probed, runnable copy of a capture plus its branches: the workspace of every policy."""

    def __init__(self, ep: torch.export.ExportedProgram, branches: list[Branch], skip_first: bool = False,
                 progress: bool = True) -> None:
        self.ep = ep
        self.branches = branches
        self.by_label = {b.label: b for b in branches}
        self.context = ProbeContext(skip_first=skip_first)
        self.module, self.probes = insert_probes(ep, branches, self.context)
        self.progress = progress

    # -- running --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Run one batch through the probed graph (probes do what they are set to do)."""
        ids, mask = batch
        self.context.set_batch(mask)
        return self.module(ids, mask)

    def run(self, batches: Iterable[Batch], desc: str | None = None,
            each: Callable[[Batch, torch.Tensor], None] | None = None) -> None:
        """Run all batches (with a progress bar when `desc` is given), calling `each(batch, out)`."""
        batches = list(batches)
        bar = tqdm(batches, desc=desc, leave=False, disable=not (self.progress and desc), unit="batch")
        for batch in bar:
            out = self.forward(batch)
            if each is not None:
                each(batch, out)

    # -- replacements ---------------------------------------------------------------------

    def set_replacement(self, label: str, fit: Fit | None, input_kind: str = "normalized") -> None:
        """Make the probe of `label` return fit(z) instead of y (None: back to the original)."""
        probe = self.probes[label]
        if fit is None:
            probe.replacement = None
            return
        stream = input_kind == "stream" or self.by_label[label].normalized is None

        def replacement(x: torch.Tensor, z: torch.Tensor, _fit: Fit = fit) -> torch.Tensor:
            return _fit.apply(x if stream else z)

        probe.replacement = replacement

    def clear_replacements(self) -> None:
        """Restore every branch."""
        for probe in self.probes.values():
            probe.replacement = None

    # -- statistics -----------------------------------------------------------------------

    def reduce_sums(self, sums: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """Combine sums that a policy accumulated itself over `run` passes (hooks, `each=`).

        Here they are complete already; a data-parallel session (`subfit_fx.pipelines`), whose
        `run` streams one rank's shard, sums them over the ranks.

        Example:
            >>> session.reduce_sums({"n": torch.ones(1)})  # doctest: +SKIP
            {'n': tensor([1.])}
        """
        return sums

    def calibrate(self, batches: Iterable[Batch], labels: Iterable[str] | None = None,
                  inputs: tuple[str, ...] = ("normalized",), desc: str | None = "calibrate",
                  targets: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
                  ) -> dict[str, BranchStats]:
        """Accumulate statistics for `labels` (default: all branches) over `batches`.

        Raises `CalibrationError` when no token was seen or a statistic is not finite.
        """
        labels = list(labels) if labels is not None else [b.label for b in self.branches]
        probes: dict[str, BranchProbe] = {label: self.probes[label] for label in labels}
        for label, probe in probes.items():
            probe.start_observing(inputs, (targets or {}).get(label))
        try:
            self.run(batches, desc)
        finally:
            stats = {label: probe.stop_observing() for label, probe in probes.items()}
        for label, s in stats.items():
            if int(s.tokens) == 0:
                raise CalibrationError("calibration saw no tokens (all padding?); pass non-empty sequences")
            if not s.is_finite():
                raise CalibrationError(f"statistics of '{label}' hold NaN or Inf (non-finite activations); "
                                       "check the model in float32 and the calibration text")
        return stats


def prepare(ep: torch.export.ExportedProgram, branches: list[Branch] | None = None, *, skip_first: bool = False,
            progress: bool = True) -> Session:
    """Instrument `ep` with a probe on every branch (observers off until `calibrate`).

    Example:
        >>> from subfit_fx import capture
        >>> from subfit_fx.zoo import tiny_model
        >>> len(prepare(capture(tiny_model("gpt2"))).probes)
        4
    """
    return Session(ep, branches if branches is not None else find_branches(ep), skip_first, progress)
