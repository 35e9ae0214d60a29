"""lm-evaluation-harness: a local task (YAML + JSONL written here) on a tiny compressed model through
`subfit-fx eval --tasks`, through lm-eval's own command line (`python -m subfit_fx.integrations.lm_eval_cli`),
and SubfitLM's scores against lm-eval's reference `hf` model on the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import subfit_fx
from subfit_fx import cli
from tests.tiny_tokenizer import save_tiny_llama

ITEMS = [("what colour is the sky ?", ["blue", "red", "green", "small"], 0),
         ("what colour is the grass ?", ["red", "green", "blue", "large"], 1),
         ("the cat is", ["small", "fast", "slow", "red"], 0),
         ("one two three", ["five", "four", "six", "ten"], 1),
         ("the fish is in the", ["tree", "cloud", "river", "stone"], 2),
         ("the bird is on the", ["sea", "stone", "river", "tree"], 3)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama with a real tokenizer, its compressed directory, and a folder holding a local
    4-choice task `tiny_mc` (multiple_choice over a JSONL file)."""
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("lm_eval")
    base = save_tiny_llama(root / "base")
    calib = torch.randint(7, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    subfit_fx.compress(str(base), calib, 0.25, method="llm-drop", progress=False).save(root / "c")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'items.jsonl'}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def test_eval_tasks_on_compressed_dir_reports_retention_and_writes_json(workdir, capsys):
    compressed = workdir / "c"
    argv = ["eval", str(compressed), "--tasks", "tiny_mc", "--include-path", str(workdir / "tasks"), "--limit", "4"]
    assert cli.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    score = result["score"]["tiny_mc"]
    assert math.isfinite(score) and 0.0 <= score <= 1.0
    acc = result["results"]["tiny_mc"]["metrics"]["acc"]
    assert acc["compressed"] == score and 0.0 <= acc["dense"] <= 1.0
    assert result["results"]["tiny_mc"]["samples"] == 4
    assert result["retention"]["tiny_mc"] == (score / acc["dense"] if acc["dense"] else None)
    assert result["model_kind"] == "compressed (llm-drop)"
    assert json.loads((compressed / "lm_eval.json").read_text()) == result
    assert f"wrote {compressed / 'lm_eval.json'}" in captured.err
    # the table view, and report.html picks the results up
    assert cli.main([*argv, "--no-dense", "--output", str(workdir / "t.json")]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "compressed" in table and "retention" not in table
    assert "dense" not in json.loads((workdir / "t.json").read_text())["results"]["tiny_mc"]["metrics"]["acc"]
    assert cli.main(["report", str(compressed)]) == 0
    assert "lm-evaluation-harness" in (compressed / "report.html").read_text()


def test_subfit_lm_scores_like_lm_eval_hf_model(workdir):
    """SubfitLM on a captured dense model against lm-eval's own HFLM on the same directory: the same
    log-likelihoods, rolling log-likelihoods (more tokens than one window) and greedy generations."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from subfit_fx.integrations.lm_eval import SubfitLM

    ours = SubfitLM(path=str(workdir / "base"), batch_size=2, progress=False)
    ref = HFLM(pretrained=str(workdir / "base"), device="cpu", batch_size=2)
    assert ours.max_length == ref.max_length == 128 and ours.prefix_token_id == ref.prefix_token_id

    def requests(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    pairs = [("what colour is the sky ?", " blue"), ("what colour is the sky ?", " red green"),
             ("", "the cat is small"), ("one", " two")]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests("loglikelihood", pairs)),
                                            ref.loglikelihood(requests("loglikelihood", pairs))):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    docs = [("the cat is on the tree . the dog is in the river . " * 15,), ("hello world",)]
    rolling = ours.loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    assert rolling == pytest.approx(ref.loglikelihood_rolling(requests("loglikelihood_rolling", docs)), abs=1e-3)
    gens = [("the cat is", {"until": ["."], "max_gen_toks": 6, "do_sample": False}),
            ("what colour", {"until": ["?"], "max_gen_toks": 4})]
    assert ours.generate_until(requests("generate_until", gens)) == \
        ref.generate_until(requests("generate_until", gens))


def test_lm_eval_command_line_runs_the_subfit_model(workdir):
    """`lm_eval --model subfit` needs the registering import; `python -m subfit_fx.integrations.lm_eval_cli`
    does it and hands every argument to lm-eval's own CLI (in a fresh interpreter: no import from here)."""
    out = workdir / "cli-results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "subfit_fx.integrations.lm_eval_cli", "--model", "subfit",
         "--model_args", f"path={workdir / 'c'},max_length=64", "--batch_size", "4", "--tasks", "tiny_mc",
         "--include_path", str(workdir / "tasks"), "--limit", "2", "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [results] = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert data["config"]["model"] == "subfit" and data["config"]["max_length"] == 64  # SubfitLM.get_model_info
    assert "tiny_mc" in proc.stdout  # lm-eval's own results table


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "tiny_mc", "--text", "t.txt"], "run them one at a time"),
    ([], "pass --text FILE"),
    (["--tasks", " , "], "--tasks is empty"),
])
def test_eval_argument_errors_are_one_line(argv, message, capsys):
    assert cli.main(["eval", "builtin:llama", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_eval_tasks_user_errors_are_one_line(workdir, capsys):
    tasks = ["--tasks", "tiny_mc", "--include-path", str(workdir / "tasks")]
    assert cli.main(["eval", "builtin:bert", *tasks]) == 2
    assert "is an encoder" in capsys.readouterr().err
    assert cli.main(["eval", "builtin:llama", "--tasks", "tiny_mc", "--include-path", str(workdir / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["eval", "builtin:llama", *tasks, "--output", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "is a directory; name a file" in err and err.count("\n") == 1


def test_eval_tasks_without_lm_eval_names_the_extra(monkeypatch, capsys):
    # what importing lm-eval does where it is not installed, even after earlier tests imported it
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] or ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "subfit_fx.integrations.lm_eval", raising=False)
    assert cli.main(["eval", "builtin:llama", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'subfit-fx[eval]'" in err and err.count("\n") == 1
