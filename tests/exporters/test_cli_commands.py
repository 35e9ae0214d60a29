"""`subfit-fx export | generate | bench` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from subfit_fx import cli
from subfit_fx.cli import main
from subfit_fx.schema import check_bench

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

    assert main(["bench", str(out), str(out), "--seq", "8", "--repeats", "2", "--json", "--provider", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in result["rows"]] == ["prefill", "decode"]
    assert result["provider"] == "CPUExecutionProvider"
    assert result["kv_bytes_per_token"]["dense"] == 4 * 2 * 2 * 16 * 4  # layers x k,v x heads x dim x fp32
    check_bench(result, tmp_path / "bench.json")  # what `report` reads back


def test_cuda_provider_without_onnxruntime_gpu_is_one_line(tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    assert main(["bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDAExecutionProvider" in err and "onnxruntime-gpu" in err and err.count("\n") == 1


def test_generate_needs_a_tokenizer_for_unknown_sources(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none.onnx"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["17", "24"])
def test_export_refuses_an_opset_it_cannot_write(tmp_path, capsys, opset):
    out = tmp_path / "m.onnx"
    assert main(["export", "builtin:llama", "--out", str(out), "--opset", opset]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "opset must be an integer from 18 to 23" in err
    assert not out.exists()


def test_export_at_an_older_opset_decomposes_attention(tmp_path, capsys):
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", "builtin:llama", "--out", str(out), "--kv-cache", "--opset", "20"]) == 0
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 20
    assert "Attention" not in {node.op_type for node in model.graph.node}
