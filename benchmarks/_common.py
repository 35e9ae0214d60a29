"""Helpers shared by benchmark scripts: result files with the exact command, medians."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def command_line() -> str:
    """The exact command that produced a result, for the results file."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _cpu_model() -> str:
    # timings move with the processor (the sessions' machines differ): name it where Linux says it
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write docs/results/NAME.json and NAME.md (with the command and machine) and return both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": command_line(), "machine": machine(), **data}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(f"{markdown.rstrip()}\n\nCommand: `{data['command']}`  \n"
                       f"Machine: {data['machine']}\n")
    return json_path, md_path


def median(values: list[float]) -> float:
    """Median of a list of timings."""
    return statistics.median(values)


def run_child(argv: list[str]) -> dict[str, Any] | None:
    """Run one measurement in a fresh interpreter (its own peak RSS) and return the JSON of its last line.

    Prints the child's stderr tail and returns None when it fails, so the caller exits non-zero
    without writing a partial result.

    Example: ``run_child([sys.executable, __file__, "--child", "basic"])``
    """
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
