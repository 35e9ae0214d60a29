"""`subfit-fx eval MODEL_OR_DIR --text FILE`: the evaluation protocol from the command line;
`subfit-fx eval MODEL_OR_DIR --tasks T1,T2 [--limit N]`: lm-evaluation-harness tasks instead
(`pip install subfit-fx[eval]`; see `subfit_fx.integrations.lm_eval`).

MODEL_OR_DIR is a Hugging Face model directory, `builtin:ARCH`, or a compressed directory (one
holding recipe.json), which is evaluated against its dense base model. lm-eval results of a
compressed directory are also written to DIR/lm_eval.json (`--output` elsewhere), which
`subfit-fx report DIR` adds to report.html.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers(); commands = {}
    >>> register(sub, commands); sorted(commands)
    ['eval']
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from subfit_fx.cli_types import positive_int
from subfit_fx.errors import InputError
from subfit_fx.schema import dumps

__all__ = ["DEFAULT_MAX_SEQ_LEN", "LM_EVAL_FILE", "register", "run_eval", "run_lm_eval"]

# The protocol uses the model's context as the window; long-context models are capped so that a
# CPU evaluation stays feasible (override with --seq-len).
DEFAULT_MAX_SEQ_LEN = 2048
# lm-eval results of a compressed DIR land in DIR/LM_EVAL_FILE unless --output says otherwise.
LM_EVAL_FILE = "lm_eval.json"


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `subfit-fx eval`: load, evaluate, print a table or JSON; returns the exit code.

    Example:
        >>> from subfit_fx.cli import build_parser
        >>> run_eval(build_parser().parse_args(["eval", "builtin:llama", "--text", "t.txt"]))  # doctest: +SKIP
        0
    """
    import torch

    from subfit_fx.capture import capture, is_causal_lm, max_positions
    from subfit_fx.cli import model_loading
    from subfit_fx.compress import load
    from subfit_fx.data import load_tokenizer, read_text
    from subfit_fx.evaluation import evaluate
    from subfit_fx.models import resolve_model

    if args.tasks is not None:
        if args.text is not None:
            raise InputError("--text and --tasks run different evaluations (our protocol, lm-eval); run them one "
                             "at a time")
        return run_lm_eval(args, model_loading(args))
    if args.text is None:
        raise InputError("nothing to evaluate on; pass --text FILE (perplexity and choice accuracy) or --tasks "
                         "T1,T2 (lm-evaluation-harness tasks)")
    for name in ("batch_size", "choice_items", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value} must be at least 1")
    text = read_text(args.text)
    loading = model_loading(args)  # a bad --device / --dtype fails before anything loads
    path = Path(args.model)
    dense = None
    compressed = load(path, dtype=loading["dtype"], device=loading["device"]) \
        if path.is_dir() and (path / "recipe.json").is_file() else None
    base = compressed.base_model if compressed is not None else resolve_model(args.model, **loading)
    limit = max_positions(base)
    seq_len = args.seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        raise InputError(f"--seq-len {seq_len} is out of range; use 2 to {limit or 'any'} (the model's context)")
    if compressed is not None:
        # a self-contained directory carries its tokenizer; an older one names its base
        source = str(path) if any(path.glob("tokenizer*")) else compressed.recipe.base_model
        module = compressed.module()
        kind = f"compressed ({compressed.recipe.method})"
        dense_model = None if args.no_dense else compressed.dense_model()
        if dense_model is not None:
            dense = capture(dense_model).module()
        elif not args.no_dense:
            print(f"note: {compressed.dense_gone()}; evaluating the compressed model alone", file=sys.stderr)
    else:
        module, source, kind = capture(base).module(), args.model, "dense"
    causal = is_causal_lm(base)
    tokenizer = load_tokenizer(base, source)
    with torch.no_grad():
        result: dict[str, Any] = evaluate(
            module, tokenizer, text, causal=causal, seq_len=seq_len, dense_module=dense,
            batch_size=args.batch_size, max_tokens=args.max_tokens, choice_items_count=args.choice_items,
            seed=args.seed, progress=not args.json)
    result = {"model": args.model, "model_kind": kind, "text": str(args.text), **result}
    text = dumps(result, "evaluation result")  # a NaN perplexity is an error in either output form
    if args.json:
        print(text, end="")
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def run_lm_eval(args: argparse.Namespace, loading: dict[str, Any] | None = None) -> int:
    """`subfit-fx eval MODEL_OR_DIR --tasks T1,T2`: lm-eval tasks on the model (and its dense base);
    prints a table or JSON and writes the JSON (DIR/lm_eval.json for a compressed DIR, or --output).

    Example:
        >>> from subfit_fx.cli import build_parser
        >>> run_lm_eval(build_parser().parse_args(["eval", "out/llama-25", "--tasks", "arc_easy"]))  # doctest: +SKIP
        0
    """
    from subfit_fx.atomic import atomic_file, check_output

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    path = Path(args.model)
    if not tasks:
        raise InputError("--tasks is empty; name lm-eval tasks, e.g. --tasks arc_easy,hellaswag")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot {args.num_fewshot} must be 0 or more")
    try:
        from subfit_fx.integrations.lm_eval import evaluate_tasks
    except ImportError as exc:  # the adapter's message names the extra to install
        raise InputError(f"--tasks runs lm-evaluation-harness: {exc}") from exc
    out = Path(args.output) if args.output else (
        path / LM_EVAL_FILE if path.is_dir() and (path / "recipe.json").is_file() else None)
    if out is not None:
        if out.is_dir():
            raise InputError(f"--output '{out}' is a directory; name a file, e.g. {out / LM_EVAL_FILE}")
        if out.resolve() == path.resolve():
            raise InputError(f"--output '{out}' is the model itself; name another file")
        check_output(out, force=True)  # results are replaced; the folder must exist and be writable
    result = evaluate_tasks(args.model, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                            include_path=args.include_path, dense=not args.no_dense, batch_size=args.batch_size,
                            max_length=args.seq_len, progress=not args.json,
                            dtype=(loading or {}).get("dtype"), device=(loading or {}).get("device"))
    if out is not None:
        with atomic_file(out, force=True) as tmp:
            tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _print_tasks(result)
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _print_tasks(result: dict[str, Any]) -> None:
    runs = [r for r in ("compressed", "dense") if any(r in row for t in result["results"].values()
                                                      for row in t["metrics"].values())]
    header = ["task", "metric", *runs, *(["retention"] if len(runs) == 2 else [])]
    rows = [header]
    for task, entry in result["results"].items():
        for metric, row in entry["metrics"].items():
            cells = [row.get(k) for k in header[2:]]
            rows.append([task, metric, *("-" if v is None else f"{v:.4f}" for v in cells)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"{result['model']}: {result['model_kind']}, lm-eval {result['lm_eval_version']}"
          + (f", limit {result['limit']}" if result["limit"] else ""))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def register(subparsers: argparse._SubParsersAction,
             commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the `eval` subcommand to `subfit-fx` (listed in `subfit_fx.cli.COMMAND_MODULES`).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers(); commands = {}
        >>> register(sub, commands); commands["eval"].__name__
        'run_eval'
    """
    from subfit_fx.cli import add_model_flags

    p = subparsers.add_parser("eval", help="evaluate a dense or compressed model on a text (METHOD.md protocol) "
                                           "or on lm-evaluation-harness tasks (--tasks)")
    p.add_argument("model", help="a Hugging Face model directory, a Hub id, a .gguf file, builtin:ARCH, or a "
                                 "compressed directory")
    add_model_flags(p)
    p.add_argument("--text", help="evaluation text file (UTF-8); never the calibration text")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag), instead of --text; "
                                   "needs pip install subfit-fx[eval]")
    p.add_argument("--limit", type=positive_int, help="--tasks: at most N examples per task")
    p.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples (default: each task's own)")
    p.add_argument("--include-path", action="append", help="--tasks: a folder of task YAML files of your own "
                                                           "(repeatable)")
    p.add_argument("--output", help=f"--tasks: write the JSON here (default for a compressed DIR: DIR/{LM_EVAL_FILE})")
    p.add_argument("--seq-len", type=positive_int, help=f"window length; with --tasks the longest context scored "
                                                        f"(default: the model's context, at most "
                                                        f"{DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens for perplexity")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    p.add_argument("--choice-items", type=positive_int, default=100, help="continuation-choice questions (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the continuation-choice questions (default 0)")
    p.add_argument("--no-dense", action="store_true", help="compressed DIR: skip evaluating the dense base model")
    p.add_argument("--json", action="store_true", help="print JSON (no progress bars)")
    commands["eval"] = run_eval

