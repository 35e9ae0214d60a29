"""Repository-level pytest setup: the optional adapters are collected only where their library is installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("optimum") else ["subfit_fx/integrations/optimum.py"]
if not importlib.util.find_spec("lm_eval"):
    collect_ignore += ["subfit_fx/integrations/lm_eval.py", "subfit_fx/integrations/lm_eval_cli.py"]
