"""The `subfit-fx` command line.

Every user error is one line on stderr naming the problem and the fix, with exit code 2;
`--debug` shows the traceback instead.

Example:
    >>> main(["inspect", "builtin:llama", "--json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from subfit_fx.errors import SubfitError


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad arguments follow the one-line rule."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SubfitError(f"{message} (see '{self.prog} --help')")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from subfit_fx.branches import count_block_params, count_params, find_branches
    from subfit_fx.capture import capture
    from subfit_fx.models import resolve_model

    ep = capture(resolve_model(args.model))
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"inspect": _cmd_inspect}


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
                   help=f"a local Hugging Face model directory or builtin:ARCH (default {BUILTIN_DEFAULT})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for register in _EXTRA_PARSERS:
        register(sub)
    return parser


# Other modules add their subcommands here (keeps this file free of their imports).
_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Example:
        >>> main(["inspect", "builtin:gpt2", "--json"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SUBFIT_DEBUG") == "1"
    try:
        _quiet_libraries()
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return EXIT_USER_ERROR
        return COMMANDS[args.command](args)
    except SubfitError as exc:
        if debug:
            traceback.print_exc()
        print(f"subfit-fx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("subfit-fx: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
