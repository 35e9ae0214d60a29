"""Optional adapters to other libraries' graph-transformation interfaces.

Each adapter lives in its own submodule and imports its library there, so `import subfit_fx` (and
this package) never needs them. Import the adapter you want explicitly:

- `subfit_fx.integrations.optimum` (`pip install subfit-fx[optimum]`): `SubfitTransformation`, an
  optimum `Transformation` that applies a recipe.
- `subfit_fx.integrations.lm_eval` (`pip install subfit-fx[eval]`): `SubfitLM`, lm-evaluation-harness's
  model `subfit`, and `evaluate_tasks` (`subfit-fx eval DIR --tasks ...`).

Example:
    >>> import subfit_fx.integrations
    >>> subfit_fx.integrations.__all__
    []
"""

from __future__ import annotations

# Nothing is re-exported: importing an adapter here would make its library a hard dependency.
__all__: list[str] = []
