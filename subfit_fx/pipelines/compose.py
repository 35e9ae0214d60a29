"""Pick a calibration pipeline for `compress`: basic or sequential, one process or data-parallel.

A session composes two strategies: a pipeline (`calibrate.PIPELINES`: "basic" `OnePass`,
"sequential" `LayerByLayer`) and a reducer (`LocalReducer`, or `AllReduce` over a process
group), so policies never know which run. `SessionFactory` builds sessions with `prepare`'s
signature; `compress_distributed` runs `compress` with it and checks that all ranks agree on
the recipe.

Example:
    >>> type(SessionFactory("sequential", distributed=False).pipeline_strategy()).__name__
    'LayerByLayer'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from subfit_fx.branches import Branch, find_branches
from subfit_fx.calibrate import PIPELINES, LocalReducer, Pipeline, Session
from subfit_fx.errors import InputError
from subfit_fx.methods import DEFAULT_METHOD
from subfit_fx.pipelines.distributed import AllReduce, check_same_recipe, rank_and_world
from subfit_fx.pipelines.sequential import LayerByLayer

__all__ = ["PIPELINES", "SessionFactory", "compress_distributed"]


@dataclass
class SessionFactory:
    """Builds sessions like `prepare(ep, branches, skip_first=, progress=)`, for a pipeline.

    `distributed`: None reduces over the process group (`AllReduce`) when one is initialized.
    `offload` and `layers_per_pass` belong to the sequential pipeline. `history` gathers the
    memory summaries of every sequential calibration of the sessions it built.

    Example:
        >>> SessionFactory("basic", offload="/tmp")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: offload and layers_per_pass apply to the sequential pipeline; ...
    """

    pipeline: str = "basic"
    distributed: bool | None = None
    offload: str | Path | None = None
    layers_per_pass: int = 1
    group: Any = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise InputError(f"unknown pipeline {self.pipeline!r}; choose one of {', '.join(PIPELINES)}")
        if self.pipeline != "sequential" and (self.offload is not None or self.layers_per_pass != 1):
            raise InputError("offload and layers_per_pass apply to the sequential pipeline; "
                             "pass pipeline='sequential'")
        self.pipeline_strategy()  # validates its options now, before any long work

    def is_distributed(self) -> bool:
        """Whether the sessions built are data-parallel (`distributed`, or else an initialized group).

        Example:
            >>> SessionFactory(distributed=True).is_distributed()
            True
        """
        return self.distributed if self.distributed is not None else rank_and_world(self.group)[1] > 1

    def pipeline_strategy(self) -> Pipeline:
        """A fresh pipeline strategy for one session (the sequential one reports into `history`).

        Example:
            >>> type(SessionFactory().pipeline_strategy()).__name__
            'OnePass'
        """
        if self.pipeline == "sequential":
            return LayerByLayer(self.offload, self.layers_per_pass, self.history)
        return PIPELINES[self.pipeline]()

    def __call__(self, ep: torch.export.ExportedProgram, branches: list[Branch] | None = None, *,
                 skip_first: bool = False, progress: bool = True) -> Session:
        return Session(ep, branches if branches is not None else find_branches(ep), skip_first, progress,
                       pipeline=self.pipeline_strategy(),
                       reducer=AllReduce(self.group) if self.is_distributed() else LocalReducer())


def compress_distributed(model: Any, calib: Any, sparsity: float = 0.25, method: str = DEFAULT_METHOD, *,
                         factory: SessionFactory | None = None, **kwargs: Any) -> Any:
    """`subfit_fx.compress.compress` on the pipeline of `factory` (default: data-parallel over the
    initialized process group, basic pipeline); every rank returns the same `Compressed`
    (checked), and the caller saves on rank 0 only. In one process it equals `compress`.

    Example:
        >>> from subfit_fx.pipelines import init_distributed
        >>> init_distributed()  # doctest: +SKIP
        >>> c = compress_distributed("builtin:llama", "calib.txt", 0.25,
        ...                          factory=SessionFactory("sequential"))  # doctest: +SKIP
        >>> if rank_and_world()[0] == 0: c.save("out")  # doctest: +SKIP
    """
    factory = factory if factory is not None else SessionFactory()
    from subfit_fx.compress import compress

    compressed = compress(model, calib, sparsity, method, session_factory=factory, **kwargs)
    if factory.is_distributed():
        check_same_recipe(compressed.recipe, factory.group)
    return compressed
