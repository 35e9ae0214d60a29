"""examples/pipeline.py: `--help` is cheap, and `--quick` writes one table with every stage, finite
numbers and compressed files smaller than dense ones (tiny random model, about 30 s)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipeline.py"
VARIANTS = ("fp32", "int8", "int4")
METHODS = ("subfit", "shortgpt")


def _example() -> ModuleType:
    # examples/ is not a package: load the script as a module to call its main() in-process
    spec = importlib.util.spec_from_file_location("pipeline_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_works():
    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, check=True,
                         timeout=60)
    assert "--quick" in out.stdout and "--model" in out.stdout


def test_quick_run_is_never_written_to_docs_results():
    args = _example().parse_args(["--quick"])
    assert not args.out.resolve().is_relative_to(REPO / "docs")
    assert not args.work.resolve().is_relative_to(REPO / "docs")


def test_quick_pipeline_table(tmp_path):
    example = _example()
    assert example.main(["--quick", "--out", str(tmp_path / "pipeline")]) == 0
    data = json.loads((tmp_path / "pipeline.json").read_text())
    table = (tmp_path / "pipeline.md").read_text()
    stages = {s["stage"]: s for s in data["stages"]}
    assert list(stages) == [f"{model} {variant}" for model in ("dense", *METHODS) for variant in VARIANTS]
    for name, s in stages.items():
        for key in ("bytes", "prefill_ms", "decode_ms", "perplexity", "kv_bytes_per_token"):
            assert math.isfinite(s[key]) and s[key] > 0, (name, key, s[key])
        assert 0 <= s["next_token_accuracy"] <= 1 and 0 <= s["top1_agreement"] <= 1
        assert s["parity"]["passed"], s["parity_summary"]
        assert f"| {name} |" in table
        shown = Path(s["file"])  # results show paths relative to the repository
        file = shown if shown.is_absolute() else (REPO / shown).resolve()
        assert file.is_file() and file.is_relative_to(tmp_path.resolve())
    for model in METHODS:
        for variant in VARIANTS:
            assert stages[f"{model} {variant}"]["bytes"] < stages[f"dense {variant}"]["bytes"], (model, variant)
        assert stages[f"{model} int4"]["bytes"] < stages[f"{model} int8"]["bytes"] < stages[f"{model} fp32"]["bytes"]
        assert data["compression"][model]["replaced"]
    # the dense fp32 file computes the torch model's function (validated): it agrees with it almost everywhere
    assert stages["dense fp32"]["top1_agreement"] > 0.99
    assert data["command"] == f"python examples/pipeline.py --quick --out {tmp_path / 'pipeline'}"
    assert data["settings"]["eval_tokens"] > 0
    assert "Command: `python examples/pipeline.py --quick" in table
