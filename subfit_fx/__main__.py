"""`python -m subfit_fx` runs the CLI."""

import sys

from subfit_fx.cli import main

sys.exit(main())
