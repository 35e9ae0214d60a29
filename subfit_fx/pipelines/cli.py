"""`subfit-fx compress` on a chosen calibration pipeline, data-parallel under torchrun:

    torchrun --nproc-per-node 2 -m subfit_fx.pipelines compress MODEL --calib TEXT --sparsity 0.25 --out DIR

It takes every argument of `subfit-fx compress` (the same parser) plus `--pipeline
basic|sequential`, `--offload DIR`, `--layers-per-pass N` and `--backend gloo|nccl`. Every rank
calibrates its shard of the sequences; rank 0 alone writes DIR and prints. Without torchrun it runs
in one process (then `--pipeline sequential` is the point).

Example:
    >>> main(["compress", "builtin:llama", "--calib", "calib.txt", "--out", "out"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from subfit_fx.errors import InputError

if TYPE_CHECKING:
    from subfit_fx.compress import Compressed
    from subfit_fx.pipelines.compose import SessionFactory

__all__ = ["build_pipeline_parser", "main", "run_compress"]



def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def build_pipeline_parser() -> argparse.ArgumentParser:
    """`subfit_fx.cli.build_parser()` with the pipeline flags added to its compress command
    (where that command does not have them already).

    Example:
        >>> args = build_pipeline_parser().parse_args(["compress", "builtin:gpt2", "--calib", "t.txt",
        ...                                            "--out", "o", "--pipeline", "sequential"])
        >>> args.pipeline, args.layers_per_pass
        ('sequential', 1)
    """
    from subfit_fx.cli import build_parser
    from subfit_fx.pipelines.compose import PIPELINES

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices["compress"]
    known = {option for action in p._actions for option in action.option_strings}
    flags = {
        "--pipeline": dict(choices=PIPELINES, default="basic",
                           help="calibrate all branches in one pass (basic) or one layer at a time (sequential)"),
        "--offload": dict(help="sequential pipeline: scratch directory for statistics (default: CPU memory)"),
        "--layers-per-pass": dict(type=int, default=1, help="sequential pipeline: layers per pass (default 1)"),
        "--backend": dict(choices=("gloo", "nccl"), help="torch.distributed backend (default nccl with CUDA, "
                                                         "else gloo)"),
    }
    for flag, spec in flags.items():
        if flag not in known:
            p.add_argument(flag, **spec)  # type: ignore[arg-type]
    return parser


def run_compress(args: argparse.Namespace) -> int:
    """The compress command for parsed `args` (with the pipeline flags): joins torchrun's process
    group if there is one, compresses on the chosen pipeline, and saves and prints on rank 0.

    Example:
        >>> run_compress(build_pipeline_parser().parse_args(["compress", "builtin:llama", "--calib", "t.txt",
        ...                                                   "--out", "o"]))  # doctest: +SKIP
        0
    """
    import torch.distributed as dist

    from subfit_fx.atomic import check_output
    from subfit_fx.methods import SubfitOptions
    from subfit_fx.pipelines.compose import SessionFactory, compress_distributed
    from subfit_fx.pipelines.distributed import init_distributed
    from subfit_fx.selection import check_sparsity

    target = check_sparsity(args.sparsity)
    check_output(Path(args.out), args.force)
    factory = SessionFactory(args.pipeline, offload=args.offload, layers_per_pass=args.layers_per_pass)
    started = not (dist.is_available() and dist.is_initialized())
    rank, world = init_distributed(args.backend)
    started = started and world > 1
    try:
        # The method options are the compress command's flags named like SubfitOptions fields.
        options = {k: v for k, v in vars(args).items()
                   if k in SubfitOptions.__dataclass_fields__ and k != "holdout" and v not in (None, False)}
        if rank == 0:
            print(f"compressing {args.model} with {args.method} to {target:.2%} sparsity: {args.pipeline} "
                  f"pipeline, {world} process{'es' if world > 1 else ''}", file=sys.stderr)
        compressed = compress_distributed(
            args.model, args.calib, target, args.method, factory=factory, samples=args.samples,
            seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, skip_first=args.skip_first,
            holdout=args.holdout, **options)
        if rank == 0:
            _save_and_print(args, compressed, factory)
        if world > 1:
            dist.barrier()  # leave together: a rank tearing down while a peer still works can abort it
        return 0
    finally:
        if started:
            dist.destroy_process_group()


def _save_and_print(args: argparse.Namespace, compressed: Compressed, factory: SessionFactory) -> None:
    from subfit_fx.cli import print_summary

    out = compressed.save(args.out, force=args.force)
    print_summary(compressed.report)
    if factory.history:
        first = factory.history[0]
        print(f"sequential pipeline: {first['passes']} passes ({first['forward_cost']:.2f} full forwards); "
              f"statistics in memory at most {_mib(max(h['peak_bytes'] for h in factory.history))} "
              f"(all at once: {_mib(first['all_at_once_bytes'])}); offloaded {_mib(first['offloaded_bytes'])}")
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline CLI; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Example:
        >>> main(["inspect"])  # only compress runs on a pipeline
        2
    """
    from subfit_fx.cli import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        args = build_pipeline_parser().parse_args(argv)
        if args.command != "compress":
            raise InputError("only 'compress' runs on a pipeline: torchrun --nproc-per-node N -m subfit_fx.pipelines "
                             "compress MODEL --calib TEXT --out DIR")
        return run_compress(args)

    return run_guarded(run, argv)
