from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import subfit_fx
from subfit_fx.cli import main
from subfit_fx.zoo import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "c"
    subfit_fx.compress(tiny_model("llama", layers=4), torch.randint(3, 128, (8, 16)), 0.25, progress=False).save(out)
    return out


def test_report_html_is_self_contained(saved):
    page = (saved / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 1
    for section in ("Redundancy heatmap", "Selection map", "Accounting", "Fit errors of replaced branches"):
        assert section in page
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened offline
    for label in json.loads((saved / "report.json").read_text())["replaced"]:
        assert label in page


def test_report_command_adds_eval_and_bench_tables(saved, capsys):
    """eval.json and bench.json as `subfit-fx eval --json` and `subfit-fx bench --json` write them."""
    (saved / "eval.json").write_text(json.dumps({"perplexity": 12.5, "next_token_accuracy": 0.4, "seq_len": 128}))
    row = {"stage": "prefill", "seq": 128, "dense_ms": 2.0, "compressed_ms": 1.2, "speedup": 1.7}
    (saved / "bench.json").write_text(json.dumps({"rows": [row], "bytes": {"dense": 9, "compressed": 7},
                                                  "repeats": 10, "threads": None}))
    assert main(["report", str(saved)]) == 0
    page = (saved / "report.html").read_text()
    assert "Evaluation" in page and "perplexity" in page and "rows.0.speedup" in page
    assert main(["report", str(saved.parent)]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(saved, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "render_report.sh"
    proc = subprocess.run([str(script), str(saved / "report.html"), str(tmp_path / "shot.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 10_000


def test_slimmed_branches_show_how_much_is_kept():
    from subfit_fx.html_report import render_html

    branches = [{"label": "l.0.attn", "kind": "attention", "layer": 0, "params": 10, "replaced": True,
                 "form": "slim", "kept_ratio": 2 / 3, "fit": {}},
                {"label": "l.0.ffn", "kind": "ffn", "layer": 0, "params": 10, "replaced": False}]
    page = render_html({"method": "saap", "sparsity_target": 0.25, "branches": branches})
    assert "slimmed to 67%" in page and "kept" in page
