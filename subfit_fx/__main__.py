"""`python -m subfit_fx` runs the CLI."""

import os
import sys

from subfit_fx.cli import EXIT_INTERRUPTED, main

code = main()
if code == EXIT_INTERRUPTED:
    # A SIGINT that lands while C code runs Python (a lazy import inside torch.export, for example)
    # can leave CPython's "unhandled KeyboardInterrupt" flag set although main() handled it; under
    # `python -m` the interpreter then kills itself with SIGINT at exit (status -2) instead of
    # returning 130. Flush and leave with the status we chose.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
