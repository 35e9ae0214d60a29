"""The package's layering, pinned: no import cycles (module-level or lazy imports), and the
library core never imports application code (the CLI, the demo)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import subfit_fx

PACKAGE = Path(subfit_fx.__file__).parent
APPLICATION = {"subfit_fx.cli", "subfit_fx.cli_types", "subfit_fx.__main__", "subfit_fx.demo", "subfit_fx.eval_cli",
               "subfit_fx.exporters.cli_commands", "subfit_fx.pipelines.cli", "subfit_fx.pipelines.__main__",
               "subfit_fx.integrations.lm_eval_cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `path` imports anywhere (importing a.b.c also runs a.b's __init__)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("subfit_fx"):
            named |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            named |= {a.name for a in node.names if a.name.startswith("subfit_fx")}
    chains = {".".join(m.split(".")[:i]) for m in named for i in range(2, m.count(".") + 2)}
    return chains & modules.keys()


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        # a module's own parent packages are initialized before it anyway: not an arrow
        graph.add_edges_from((name, dep) for dep in _imports(path, modules) - ancestors - {name})
    return graph


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == [], f"import cycles: {[' -> '.join(c) for c in cycles[:5]]}"


def test_core_never_imports_application_code():
    graph = _graph()
    core = set(graph) - APPLICATION
    assert set(graph) >= APPLICATION, APPLICATION - set(graph)  # the list stays true to the tree
    upward = [(a, b) for a, b in graph.edges if a in core and b in APPLICATION]
    assert upward == []


def test_the_check_sees_a_cycle():
    graph = _graph()
    graph.add_edge("subfit_fx.capture", "subfit_fx.rewrite")  # rewrite -> branches -> capture
    assert list(nx.simple_cycles(graph))


def test_policies_ask_the_session_and_never_reach_into_it():
    """Probes, their token context and the probed module belong to the calibration package
    (calibrate.py and the pipelines); a policy uses the Session's requests only."""
    import re

    internals = re.compile(r"\._probes\b|\._context\b|\._module\b|\.probes\b|\.recorded\b|\bProbeContext\b"
                           r"|\bBranchProbe\b|\.context\.(select|token_mask)")
    offenders = [f"{path.name}:{n}" for path in sorted((PACKAGE / "methods").glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if internals.search(line)]
    assert offenders == []
