"""`python -m subfit_fx.integrations.lm_eval_cli ARGS`: lm-eval's own command line, with the model
`subfit` registered (lm-eval 0.4.13 discovers no models from other packages: its
`--include_path` loads tasks only), e.g.

    python -m subfit_fx.integrations.lm_eval_cli --model subfit --model_args path=DIR --tasks arc_easy

Application code (a command line): kept out of the adapter module, which the library may import.

Example:
    >>> main(["--model", "subfit", "--model_args", "path=DIR", "--tasks", "arc_easy"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m subfit_fx.integrations.lm_eval_cli ARGS`: lm-eval's command line with `subfit` registered.

    Example:
        >>> main(["run", "--model", "subfit", "--model_args", "path=DIR", "--tasks", "arc_easy"])  # doctest: +SKIP
        0
    """
    from subfit_fx.cli import run_guarded
    from subfit_fx.integrations.lm_eval import register

    args = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        from lm_eval.__main__ import cli_evaluate

        register()
        saved = sys.argv
        sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
        return 0

    return run_guarded(run, args)



if __name__ == "__main__":
    sys.exit(main())
