"""Pick a calibration pipeline for `compress`: basic or sequential, one process or data-parallel.

A pipeline is a kind of `Session` (its `calibrate` and `run`), so policies never know which one
they run on. `SessionFactory` builds the right one with `prepare`'s signature;
`compress_distributed` runs `compress` with it and checks that all ranks agree on the recipe.

Example:
    >>> SessionFactory("sequential", distributed=False).session_class().__name__
    'SequentialSession'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from subfit_fx.branches import Branch, find_branches
from subfit_fx.calibrate import Session
from subfit_fx.errors import InputError
from subfit_fx.pipelines.distributed import DistributedSession, check_same_recipe, rank_and_world
from subfit_fx.pipelines.sequential import SequentialSession

__all__ = ["PIPELINES", "SequentialDistributedSession", "SessionFactory", "compress_distributed"]

PIPELINES = ("basic", "sequential")


class SequentialDistributedSession(SequentialSession, DistributedSession):
    """Layer by layer, and data-parallel: each layer's sweep is sharded and its statistics are
    summed over ranks as soon as the sweep ends (one layer's statistics in flight at a time).

    Example:
        >>> [c.__name__ for c in SequentialDistributedSession.__mro__[1:4]]
        ['SequentialSession', 'DistributedSession', 'Session']
    """


@dataclass
class SessionFactory:
    """Builds sessions like `prepare(ep, branches, skip_first=, progress=)`, for a pipeline.

    `distributed`: None uses a `DistributedSession` when a process group is initialized.
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
        if not isinstance(self.layers_per_pass, int) or self.layers_per_pass < 1:
            raise InputError(f"layers_per_pass={self.layers_per_pass!r} must be a positive integer")
        if self.offload is not None and not Path(self.offload).is_dir():
            raise InputError(f"offload directory '{self.offload}' does not exist; create it or pass an existing one")

    def session_class(self) -> type[Session]:
        """The Session subclass this factory builds.

        Example:
            >>> SessionFactory(distributed=True).session_class().__name__
            'DistributedSession'
        """
        distributed = self.distributed if self.distributed is not None else rank_and_world(self.group)[1] > 1
        return {("basic", False): Session, ("basic", True): DistributedSession,
                ("sequential", False): SequentialSession,
                ("sequential", True): SequentialDistributedSession}[self.pipeline, bool(distributed)]

    def __call__(self, ep: torch.export.ExportedProgram, branches: list[Branch] | None = None, *,
                 skip_first: bool = False, progress: bool = True) -> Session:
        cls = self.session_class()
        extra: dict[str, Any] = {}
        if issubclass(cls, SequentialSession):
            extra.update(offload=self.offload, layers_per_pass=self.layers_per_pass, history=self.history)
        if issubclass(cls, DistributedSession):
            extra["group"] = self.group
        return cls(ep, branches if branches is not None else find_branches(ep), skip_first, progress, **extra)


def compress_distributed(model: Any, calib: Any, sparsity: float = 0.25, method: str = "subfit", *,
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
    if issubclass(factory.session_class(), DistributedSession):
        check_same_recipe(compressed.recipe, factory.group)
    return compressed
