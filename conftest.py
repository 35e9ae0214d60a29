"""Repository-level pytest setup: the optional optimum adapter is collected only where optimum is installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("optimum") else ["subfit_fx/integrations/optimum.py"]
