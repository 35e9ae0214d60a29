"""`subfit-fx export | generate | bench` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from subfit_fx import cli
from subfit_fx.cli import main

MODULE = "subfit_fx.exporters.cli_commands"


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """The CLI lists this module in COMMAND_MODULES (added here until cli.py names it)."""
    if MODULE not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, MODULE])


def test_export_generate_bench(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "builtin:llama", "--out", str(out), "--kv-cache"]) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert "onnx kv-cache vs torch" in err
    assert main(["export", "builtin:llama", "--out", str(out), "--kv-cache"]) == 2
    assert "--force" in capsys.readouterr().err

    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Hello")

    assert main(["bench", str(out), str(out), "--seq", "8", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in result["rows"]] == ["prefill", "decode"]
    assert result["kv_bytes_per_token"]["dense"] == 4 * 2 * 2 * 16 * 4  # layers x k,v x heads x dim x fp32


def test_generate_needs_a_tokenizer_for_unknown_sources(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none.onnx"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
