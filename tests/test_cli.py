from __future__ import annotations

import json

import pytest

from subfit_fx.cli import main


def test_inspect_json_builtin(capsys):
    assert main(["inspect", "builtin:gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["branches"]) == 8
    assert data["branches"][0] == {"label": "transformer.h.0.attn", "kind": "attention", "layer": 0,
                                   "params": data["branches"][0]["params"]}
    assert data["block_params"] == sum(b["params"] for b in data["branches"])
    assert data["total_params"] > data["block_params"]


def test_inspect_table_default(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp" in out and "8 branches" in out


def test_inspect_saved_model_dir(tmp_path, capsys):
    from subfit_fx.zoo import tiny_model

    tiny_model("bert").save_pretrained(tmp_path / "bert")
    assert main(["inspect", str(tmp_path / "bert"), "--json"]) == 0
    labels = [b["label"] for b in json.loads(capsys.readouterr().out)["branches"]]
    assert labels[1] == "encoder.layer.0.intermediate+output"


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect", "/definitely/missing"], "does not exist"),
    (["inspect", "."], "not a model directory"),
    (["inspect", "builtin:nope"], "unknown built-in model"),
    (["nonsense"], "invalid choice"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--atention-rank", "8"],
     "did you mean --atention-rank -> --attention-rank?"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--method", "shortgtp"],
     "did you mean 'shortgpt'?"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--method", "shortgpt", "--rounds", "2"],
     "option 'rounds' is not one of shortgpt's; it belongs to hybrid, subfit"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--method", "subfit", "--judge-context", "-1"],
     "judge_context=-1.0 must be a number >= 0"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--heal", "-1"],
     "heal=-1 must be a number of epochs >= 0"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--heal", "1", "--heal-lr", "0"],
     "heal_lr=0.0 must be a positive learning rate"),
    (["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--heal", "1", "--pipeline", "sequential"],
     "--heal trains through the whole model in one process"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_subprocess_no_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "subfit_fx", "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("subfit-fx: error:") and "Traceback" not in proc.stderr


def test_every_method_option_has_one_compress_flag():
    """The compress flags and the registry's options classes name the same things."""
    from subfit_fx.cli import build_parser, method_options_from_args
    from subfit_fx.methods import option_names

    args = build_parser().parse_args(["compress", "m", "--calib", "t", "--out", "o"])
    flags = set(vars(args))
    assert option_names() - {"holdout"} <= flags  # holdout is the calibration's --holdout
    assert method_options_from_args(args) == {}  # nothing set, nothing passed


def test_hybrid_levels_are_fractions_or_a_one_line_usage_error(tmp_path, capsys):
    from subfit_fx.cli import build_parser, main

    base = ["compress", "builtin:llama", "--calib", "t", "--method", "hybrid"]
    args = build_parser().parse_args([*base, "--out", "o", "--levels", "0.2,0.4"])
    assert args.levels == (0.2, 0.4)
    for bad in ("0.5,abc", "0.5,1.5", ""):
        assert main([*base, "--out", str(tmp_path / "o"), "--levels", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "--levels" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
