"""`torchrun --nproc-per-node N -m subfit_fx.pipelines compress MODEL --calib TEXT --out DIR`."""

from __future__ import annotations

import sys

from subfit_fx.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
