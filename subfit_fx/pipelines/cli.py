"""`subfit-fx compress` on a chosen calibration pipeline, data-parallel under torchrun:

    torchrun --nproc-per-node 2 -m subfit_fx.pipelines compress MODEL --calib TEXT --sparsity 0.25 --out DIR

It is `subfit-fx compress` (the same parser and flags: `--pipeline basic|sequential`, `--offload
DIR`, `--layers-per-pass N`, `--backend gloo|nccl`). Every rank calibrates its shard of the
sequences; rank 0 alone writes DIR and prints. Without torchrun it runs in one process (then
`--pipeline sequential` is the point).

Example:
    >>> main(["compress", "builtin:llama", "--calib", "calib.txt", "--out", "out"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from subfit_fx.cli import main as cli_main
from subfit_fx.cli import run_guarded
from subfit_fx.errors import InputError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline CLI; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Example:
        >>> main(["inspect"])  # only compress runs on a pipeline
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "compress" not in argv[:2]:
        def refuse() -> int:
            raise InputError("only 'compress' runs on a pipeline: torchrun --nproc-per-node N -m subfit_fx.pipelines "
                             "compress MODEL --calib TEXT --out DIR")

        return run_guarded(refuse, argv)
    # this entry point always takes the pipeline path (it joins torchrun's process group, if any)
    return cli_main(argv if "--distributed" in argv else [*argv, "--distributed"])
