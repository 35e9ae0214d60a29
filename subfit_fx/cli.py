"""The `subfit-fx` command line.

Every user error is one line on stderr naming the problem and the fix, with exit code 2;
`--debug` shows the traceback instead.

Example:
    >>> main(["inspect", "builtin:llama", "--json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from subfit_fx import interrupts as interrupt_flag
from subfit_fx.cli_types import fractions, positive_int
from subfit_fx.errors import InputError, SubfitError


def _quiet_libraries() -> None:
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    # torch logs a traceback for a TypeError in fake-tensor dispatch (how a Ctrl-C inside torch.export
    # surfaces) and re-raises it; the CLI reports the error itself. A filter survives torch's log setup.
    logging.getLogger("torch._subclasses.fake_tensor").addFilter(_drop_record)
    # deprecation chatter from torch/transformers internals is not actionable for CLI users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

def _drop_record(record: object) -> bool:
    return False


__all__ = ["add_model_flags", "build_parser", "main", "method_options_from_args", "model_loading", "print_summary",
           "run_guarded"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad arguments follow the one-line rule, and
    names the nearest valid flag for a misspelt one."""

    flags: ClassVar[set[str]] = set()  # every --flag of every subcommand built so far

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        _Parser.flags.update(o for o in action.option_strings if o.startswith("--"))
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SubfitError(f"{message}{_nearest_flags(message)} (see '{self.prog} --help')")


def _nearest_flags(message: str) -> str:
    """'; did you mean --attention-rank?' for the misspelt flags an argparse message lists."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    hints = []
    for token in message.split(":", 1)[1].split():
        if token.startswith("--"):
            near = difflib.get_close_matches(token.split("=", 1)[0], sorted(_Parser.flags), n=1, cutoff=0.6)
            hints += [f"{token} -> {near[0]}"] if near else []
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from subfit_fx.branches import count_block_params, count_params, find_branches
    from subfit_fx.capture import capture
    from subfit_fx.models import resolve_model

    ep = capture(resolve_model(args.model, **model_loading(args)))
    branches = find_branches(ep)
    block, total = count_block_params(ep, branches), count_params(ep)
    if args.json:
        print(json.dumps({
            "branches": [{"label": b.label, "kind": b.kind, "layer": b.layer, "params": b.params}
                         for b in branches],
            "block_params": block, "total_params": total,
        }, indent=2))
        return 0
    rows = [("layer", "kind", "label", "params", "share")]
    rows += [(str(b.layer), b.kind, b.label, f"{b.params:,}", f"{b.params / block:.1%}") for b in branches]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        cells = (c.rjust(w) if i in (0, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells))
    print(f"{len(branches)} branches; block parameters {block:,}; all parameters {total:,}")
    return 0


def add_model_flags(p: argparse.ArgumentParser, device_default: str = "auto") -> None:
    """`--dtype`, `--device`, `--revision` and `--trust-remote-code`: how a MODEL argument loads.

    Example:
        >>> p = argparse.ArgumentParser(); add_model_flags(p)
        >>> p.parse_args(["--dtype", "bfloat16"]).dtype
        'bfloat16'
    """
    from subfit_fx.devices import DEVICE_HELP, DTYPE_CHOICES

    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="precision the model runs in (default auto: the checkpoint's; built-in and GGUF are float32)")
    p.add_argument("--device", default=device_default, help=f"{DEVICE_HELP} (default {device_default})")
    p.add_argument("--revision", help="Hub ids: branch, tag or commit (default main)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model that ships its own Python code (it runs on this machine)")


def model_loading(args: argparse.Namespace) -> dict[str, Any]:
    """The `resolve_model` / `compress` keywords the model flags set, checked now: a bad device or
    dtype fails in seconds, and a Hub id in `args.model` becomes its local snapshot directory
    (downloaded, or found in the cache offline) before any long work.

    Example:
        >>> model_loading(build_parser().parse_args(["inspect", "builtin:llama", "--device", "cpu"]))["device"]
        'cpu'
    """
    from subfit_fx.devices import check_dtype_on_device, resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if dtype is not None:
        check_dtype_on_device(dtype, device)
    from subfit_fx.models import local_spec

    args.model = local_spec(args.model, args.revision, trust_remote_code=args.trust_remote_code)
    return {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code}


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the compress flags set: every flag named like a registered method's
    option (`--attention-rank` -> attention_rank), unset ones left out; `compress` checks them
    against the chosen method's options class.

    Example:
        >>> args = build_parser().parse_args(["compress", "m", "--calib", "t", "--out", "o", "--rounds", "2"])
        >>> method_options_from_args(args)
        {'rounds': 2}
    """
    from subfit_fx.methods import option_names

    # holdout is a calibration setting (compress(holdout=...)), not a method option
    return {k: v for k in sorted(option_names() - {"holdout"}) if (v := getattr(args, k, None)) is not None}


def _cmd_compress(args: argparse.Namespace) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from subfit_fx.atomic import check_output, claim
    from subfit_fx.compress import CalibrationConfig
    from subfit_fx.data import check_text_file
    from subfit_fx.heal import check_heal
    from subfit_fx.methods import check_offloadable, method_options
    from subfit_fx.selection import check_sparsity

    # Fail in seconds, before any long work, on what can be checked up front.
    target = check_sparsity(args.sparsity)
    config = CalibrationConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                               seed=args.seed, skip_first=args.skip_first, holdout=args.holdout)
    options = method_options_from_args(args)
    typed = method_options(args.method, options, **({"holdout": args.holdout} if args.holdout else {}))
    loading = model_loading(args)
    healing = {"heal": args.heal, **({"heal_lr": args.heal_lr} if args.heal_lr is not None else {})}
    check_heal(**healing)
    if args.heal and (args.distributed or args.pipeline != "basic" or args.offload is not None
                      or args.layers_per_pass != 1 or args.offload_weights):
        raise InputError("--heal trains through the whole model in one process: use the basic pipeline "
                         "(drop --pipeline / --offload / --offload-weights / torchrun) or drop --heal")
    check_text_file(args.calib)
    if args.offload_weights:
        check_offloadable(args.method, typed)
        if args.pipeline != "sequential":
            raise InputError("--offload-weights needs the layer-wise pipeline (the basic one runs whole forwards); "
                             "add --pipeline sequential")
    check_output(Path(args.out), args.force, inputs=[p for p in (args.model, args.calib) if Path(p).exists()])
    # claimed now, not at save: a second run on this --out fails in seconds, not after all the work
    # (under torchrun every rank runs this; rank 0 claims when it saves)
    with nullcontext() if args.distributed else claim(Path(args.out)):
        if args.distributed or args.pipeline != "basic" or args.offload is not None or args.layers_per_pass != 1:
            return _compress_on_pipeline(args, target, config, {**options, **loading})

        from subfit_fx.compress import compress

        print(f"compressing {args.model} with {args.method} to {target:.2%} sparsity", file=sys.stderr)
        compressed = compress(args.model, args.calib, target, args.method, calibration=config, **loading, **healing,
                              **options)
        out = compressed.save(args.out, force=args.force)
        print_summary(compressed.report)
        print(f"wrote {out}")
        return 0


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _compress_on_pipeline(args: argparse.Namespace, target: float, config: Any, options: dict[str, Any]) -> int:
    """compress on the chosen calibration pipeline, data-parallel when torchrun started us: every
    rank calibrates its shard; rank 0 alone saves and prints."""
    # the pipelines (and torch.distributed) only load when asked for
    import torch.distributed as dist

    from subfit_fx.pipelines.compose import SessionFactory, compress_distributed
    from subfit_fx.pipelines.distributed import init_distributed

    factory = SessionFactory(args.pipeline, offload=args.offload, layers_per_pass=args.layers_per_pass)
    started = not (dist.is_available() and dist.is_initialized())
    rank, world = init_distributed(args.backend)
    started = started and world > 1
    try:
        if rank == 0:
            print(f"compressing {args.model} with {args.method} to {target:.2%} sparsity: {args.pipeline} "
                  f"pipeline, {world} process{'es' if world > 1 else ''}", file=sys.stderr)
        compressed = compress_distributed(
            args.model, args.calib, target, args.method, factory=factory, calibration=config,
            offload_weights=args.offload_weights, **options)
        if rank == 0:
            out = compressed.save(args.out, force=args.force)
            print_summary(compressed.report)
            if factory.history:
                first = factory.history[0]
                print(f"sequential pipeline: {first['passes']} passes ({first['forward_cost']:.2f} full forwards); "
                      f"statistics in memory at most {_mib(max(h['peak_bytes'] for h in factory.history))} "
                      f"(all at once: {_mib(first['all_at_once_bytes'])}); "
                      f"offloaded {_mib(first['offloaded_bytes'])}")
            print(f"wrote {out}")
        if world > 1:
            dist.barrier()  # leave together: a rank tearing down while a peer still works can abort it
        return 0
    finally:
        if started:
            dist.destroy_process_group()


def print_summary(report: object) -> None:
    """Print what a compression run did: counts, sparsity, parameters, KV cache, selection map.

    Example:
        >>> print_summary(compressed.report)  # doctest: +SKIP
    """
    r = report
    print(f"replaced {len(r.replaced)} of {len(r.branches)} branches; sparsity {r.sparsity_actual:.2%} of "
          f"block parameters; parameters {r.params_before:,} -> {r.params_after:,}; "
          f"KV cache kept {r.kv_fraction_kept:.0%}")
    print(r.selection_map())


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from subfit_fx.demo import run_demo

    run_demo(Path(args.out), sparsity=float(args.sparsity), baseline=args.baseline)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from subfit_fx.errors import InputError
    from subfit_fx.html_report import write_html_report

    directory = Path(args.dir)
    if not (directory / "report.json").is_file():
        raise InputError(f"'{directory}' holds no report.json; pass a directory written by 'subfit-fx compress'")
    print(f"wrote {write_html_report(directory)}")
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on SmolLM2-135M (from PyPI): compress, evaluate, export, "
                                           "benchmark")
    p.add_argument("--out", default="demo-output", help="report directory (default demo-output, replaced)")
    p.add_argument("--sparsity", default="0.25", help="target sparsity (default 0.25)")
    p.add_argument("--baseline", default="shortgpt", help="baseline to compare with (default shortgpt)")
    p = sub.add_parser("report", help="rebuild report.html of a compressed directory (adds eval.json, lm_eval.json, "
                                      "bench.json)")
    p.add_argument("dir", help="a directory written by 'subfit-fx compress'")


def _add_compress_parser(sub: argparse._SubParsersAction) -> None:
    from subfit_fx.methods import DEFAULT_METHOD, METHODS

    p = sub.add_parser("compress", help="compress a model to a parameter budget")
    p.add_argument("model", help="a local Hugging Face model directory, a Hub id (org/name), a .gguf file or "
                                 "builtin:ARCH")
    add_model_flags(p)
    p.add_argument("--calib", required=True, help="calibration data: a UTF-8 text file, a .jsonl of chat conversations "
                                                  "(rendered with the chat template) or a datasets save_to_disk folder")
    p.add_argument("--sparsity", default="0.25", help="fraction of block parameters to remove, 0 < s < 0.9")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"policy: {', '.join(sorted(METHODS))} (default {DEFAULT_METHOD}: saap where width pruning "
                   "applies, else subfit; docs/width.md)")
    p.add_argument("--samples", type=positive_int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sequence sampling (default 0)")
    p.add_argument("--skip-first", action="store_true", help="leave the first token out of statistics")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of sequences held out for scoring")
    p.add_argument("--heal", type=int, default=0, metavar="EPOCHS",
                   help="after the policy, train only the recipe's tensors (bypasses, refitted output projections of "
                        "slimmed branches) this many passes over the calibration data against the dense "
                        "model's output (default 0: training-free)")
    p.add_argument("--heal-lr", type=float, default=None, help="Adam learning rate of --heal (default 3e-4)")
    p.add_argument("--judge", choices=("output", "statistics"),
                   help="SubFit: judge candidates at the model's output on held-out sequences (output, default) "
                        "or rank them by a statistics-only score in one shot (statistics, fast)")
    p.add_argument("--selection", choices=("knapsack", "greedy"),
                   help="SubFit: how each round chooses from the judged damages: an exact plan of the whole "
                        "remaining budget (knapsack, default) or damage per parameter saved (greedy)")
    p.add_argument("--judge-sequences", type=positive_int,
                   help="SubFit, hybrid: held-out sequences the output judge runs (default 4)")
    p.add_argument("--judge-context", type=float,
                   help="SubFit, hybrid: weight of the context gain lost in the output judge (causal LMs: how much "
                        "better the model predicts a passage's continuation after its own text than after "
                        "another's); 0: KL only")
    p.add_argument("--rounds", type=positive_int,
                   help="SubFit, hybrid: rounds of re-judging on the way to the budget "
                        "(default 8 from 12 layers on, else 4)")
    p.add_argument("--shortlist", type=float,
                   help="SubFit: rounds after the first re-judge this multiple of the branches they need (default 3)")
    p.add_argument("--spans", type=int,
                   help="SubFit, hybrid: judge one linear map over every run of 2..SPANS whole layers (ReplaceMe's "
                        "form) next to the per-branch replacements (default: up to 6 while the statistics fit "
                        "2 GiB; 0: off)")
    p.add_argument("--score", help="SubFit --judge statistics: fit_residual (default), rotation, magnitude, holdout")
    p.add_argument("--bypass-input", choices=("normalized", "stream"), help="bypass input (SubFit)")
    p.add_argument("--attention-rank", type=positive_int, help="rank of attention bypasses (default width/8)")
    p.add_argument("--ffn-basis", type=positive_int, help="size of the shared FFN basis (default width/2)")
    p.add_argument("--ridge", type=float, help="relative ridge strength (default 1e-3)")
    p.add_argument("--rescore-every", type=positive_int, help="re-score after every k choices")
    p.add_argument("--sequential", action="store_true", default=None, help="sequential error-correcting fits")
    p.add_argument("--pipeline", choices=("basic", "sequential"), default="basic",
                   help="calibrate all branches in one pass (basic) or one layer at a time (sequential)")
    p.add_argument("--offload", help="sequential pipeline: scratch directory for statistics (default: CPU memory)")
    p.add_argument("--layers-per-pass", type=positive_int, default=1,
                   help="sequential pipeline: layers per pass (default 1)")
    p.add_argument("--offload-weights", action="store_true",
                   help="sequential pipeline: keep the weights on disk and read each layer's only while it runs "
                        "(models bigger than memory; statistics-only policies, e.g. --judge statistics)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel calibration; launch with torchrun (see docs/distributed.md)")
    p.add_argument("--backend", choices=("gloo", "nccl"),
                   help="torch.distributed backend (default nccl with CUDA, else gloo)")
    p.add_argument("--forms", choices=("fit", "fit-or-remove", "auto"),
                   help="SubFit: the bypass only; or per branch, judged on held-out data, bypass or removal "
                        "(fit-or-remove) or bypass, removal or a full linear map (auto)")
    p.add_argument("--distance-tokens", choices=("last", "all"),
                   help="UIDL/ReplaceMe: tokens of the angular distance (default last)")
    p.add_argument("--block", type=positive_int,
                   help="saap / hybrid / flap: FFN channels per pruning unit (default 64; flap 1)")
    p.add_argument("--grouping", choices=("sorted", "contiguous"),
                   help="saap / hybrid / flap: which channels form a block: runs of channels sorted by their own "
                        "importance (sorted, default) or index ranges (contiguous)")
    p.add_argument("--allocation", choices=("output", "zscore"),
                   help="saap: how the channel blocks are shared out across layers: by their damage in the "
                        "model output's metric, one backward pass (output, default), or by within-layer z-scores "
                        "(zscore; flap's)")
    p.add_argument("--sensitivity-sequences", type=positive_int,
                   help="saap --allocation output: calibration sequences of the backward pass (default 16)")
    p.add_argument("--compounding", choices=("none", "midpoint", "mean"),
                   help="saap --allocation output: measure the output's sensitivity again with a first plan in "
                        "place (half the budget: midpoint; all of it, averaged with the dense one: mean)")
    p.add_argument("--importance", choices=("fused", "vector", "element"),
                   help="saap / hybrid / flap: channel-block importance (default fused; flap element)")
    p.add_argument("--compensation", choices=("refit", "bias", "none"),
                   help="saap / hybrid / flap: how the output projection is compensated (default refit; flap bias)")
    p.add_argument("--no-fluctuation", dest="fluctuation", action="store_false", default=None,
                   help="saap / hybrid: one global ranking, no protection of fluctuating layers")
    p.add_argument("--max-layer-ratio", type=float, help="saap / hybrid: most of a layer's channels to drop (0.75)")
    p.add_argument("--strategy", choices=("joint", "share", "output"),
                   help="hybrid: every option judged at the output and chosen by one knapsack (joint, default), "
                        "every option priced in the output metric, no judge forwards (output), or SubFit first "
                        "for --share of the budget and width pruning for the rest (share)")
    p.add_argument("--levels", type=fractions,
                   help="hybrid --strategy joint: fractions of an FFN's channel blocks each judged slimming drops "
                        "(default 0.25,0.5,0.75; counts in between are interpolated)")
    p.add_argument("--no-replace", dest="replace", action="store_false", default=None,
                   help="hybrid --strategy joint: no SubFit options (bypasses, removal, span maps): width pruning "
                        "only, each FFN's slimming level chosen by the output judge")
    p.add_argument("--no-standardize", dest="standardize", action="store_false", default=None,
                   help="saap / hybrid / flap: one global ranking of raw block scores instead of scores "
                        "standardized within each layer (FLAP's adaptive structure, the default)")
    p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=None,
                   help="saap / hybrid / flap: also prune attention, in whole key/value groups (their KV cache goes "
                        "too); --no-heads: FFN channels only (default: saap with --allocation output prunes "
                        "them, the others do not)")
    p.add_argument("--share", type=float,
                   help="hybrid --strategy share: fraction of the budget SubFit's replacements take (0.5)")
    p.add_argument("--eval-batches", type=positive_int, help="BlockPruner: batches judging each removal (default all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an existing output")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": _cmd_inspect, "compress": _cmd_compress, "demo": _cmd_demo, "report": _cmd_report}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `subfit-fx` (all subcommands).

    Example:
        >>> build_parser().parse_args(["inspect", "--json"]).json
        True
    """
    from subfit_fx.models import BUILTIN_DEFAULT

    parser = _Parser(prog="subfit-fx", description="Submodule-level transformer compression (SubFit).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("inspect", help="list the residual branches of a model")
    p.add_argument("model", nargs="?", default=BUILTIN_DEFAULT,
                   help=f"a local Hugging Face model directory, a Hub id (org/name), a .gguf file or builtin:ARCH "
                        f"(default {BUILTIN_DEFAULT})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_flags(p, device_default="cpu")
    _add_compress_parser(sub)
    _add_demo_parser(sub)
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, COMMANDS)
    return parser


# Modules with `register(subparsers, commands)` that add subcommands (imported lazily).
COMMAND_MODULES: list[str] = ["subfit_fx.exporters.cli_commands", "subfit_fx.eval_cli"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Example:
        >>> main(["inspect", "builtin:gpt2", "--json"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return EXIT_USER_ERROR
        return COMMANDS[args.command](args)

    return run_guarded(run, argv)


def run_guarded(run: Callable[[], int], argv: Sequence[str]) -> int:
    """Run a CLI body: user errors become one line + exit 2, Ctrl-C exit 130 (`--debug`: traceback).

    Example:
        >>> run_guarded(lambda: 0, [])
        0
    """
    debug = "--debug" in argv or os.environ.get("SUBFIT_DEBUG") == "1"
    interrupts = _Interrupts()
    try:
        with interrupts:
            _quiet_libraries()
            code = run()
        # a library swallowed the KeyboardInterrupt; the atomic writers saw the flag and wrote nothing
        return _interrupted() if interrupts.seen else code
    except KeyboardInterrupt:
        return _interrupted()
    except SubfitError as exc:
        if interrupts.seen:  # e.g. CaptureError wrapping torch's TypeError("... KeyboardInterrupt")
            return _interrupted()
        if debug:
            traceback.print_exc()
        print(f"subfit-fx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        if interrupts.seen:
            return _interrupted()
        raise


def _interrupted() -> int:
    print("subfit-fx: interrupted; no output was written", file=sys.stderr)
    return EXIT_INTERRUPTED


class _Interrupts:
    """Notices SIGINT even where a library turns the KeyboardInterrupt into another error (torch's
    argument parser reports it as a TypeError inside torch.export, which capture() wraps)."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: object = None

    def __enter__(self) -> _Interrupts:
        interrupt_flag.clear()
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        interrupt_flag.clear()  # `seen` keeps the answer; library calls after this run start clean
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.seen = True
        interrupt_flag.note()
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
