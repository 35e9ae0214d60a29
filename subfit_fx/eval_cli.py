"""`subfit-fx eval MODEL_OR_DIR --text FILE`: the evaluation protocol from the command line.

MODEL_OR_DIR is a Hugging Face model directory, `builtin:ARCH`, or a compressed directory (one
holding recipe.json), which is evaluated against its dense base model.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers(); commands = {}
    >>> register(sub, commands); sorted(commands)
    ['eval']
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from subfit_fx.cli_types import positive_int
from subfit_fx.errors import InputError
from subfit_fx.schema import dumps

__all__ = ["DEFAULT_MAX_SEQ_LEN", "register", "run_eval"]

# The protocol uses the model's context as the window; long-context models are capped so that a
# CPU evaluation stays feasible (override with --seq-len).
DEFAULT_MAX_SEQ_LEN = 2048


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `subfit-fx eval`: load, evaluate, print a table or JSON; returns the exit code.

    Example:
        >>> from subfit_fx.cli import build_parser
        >>> run_eval(build_parser().parse_args(["eval", "builtin:llama", "--text", "t.txt"]))  # doctest: +SKIP
        0
    """
    import torch

    from subfit_fx.capture import capture, is_causal_lm, max_positions
    from subfit_fx.compress import load
    from subfit_fx.data import load_tokenizer, read_text
    from subfit_fx.evaluation import evaluate
    from subfit_fx.models import resolve_model

    for name in ("batch_size", "choice_items", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value} must be at least 1")
    text = read_text(args.text)
    path = Path(args.model)
    dense = None
    compressed = load(path) if path.is_dir() and (path / "recipe.json").is_file() else None
    base = compressed.base_model if compressed is not None else resolve_model(args.model)
    limit = max_positions(base)
    seq_len = args.seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        raise InputError(f"--seq-len {seq_len} is out of range; use 2 to {limit or 'any'} (the model's context)")
    if compressed is not None:
        module, source = compressed.module(), compressed.recipe.base_model
        kind = f"compressed ({compressed.recipe.method})"
        if not args.no_dense:
            dense = capture(base).module()
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


def register(subparsers: argparse._SubParsersAction,
             commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the `eval` subcommand to `subfit-fx` (listed in `subfit_fx.cli.COMMAND_MODULES`).

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers(); commands = {}
        >>> register(sub, commands); commands["eval"].__name__
        'run_eval'
    """
    p = subparsers.add_parser("eval", help="evaluate a dense or compressed model on a text (METHOD.md protocol)")
    p.add_argument("model", help="a Hugging Face model directory, builtin:ARCH, or a compressed directory")
    p.add_argument("--text", required=True, help="evaluation text file (UTF-8); never the calibration text")
    p.add_argument("--seq-len", type=positive_int, help=f"window length (default: the model's context, at most "
                                               f"{DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens for perplexity")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    p.add_argument("--choice-items", type=positive_int, default=100, help="continuation-choice questions (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the continuation-choice questions (default 0)")
    p.add_argument("--no-dense", action="store_true", help="compressed DIR: skip evaluating the dense base model")
    p.add_argument("--json", action="store_true", help="print JSON (no progress bars)")
    commands["eval"] = run_eval

