"""Hub ids as MODEL, against a local Hugging Face cache built here (never the network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subfit_fx.cli import main
from subfit_fx.errors import ModelLoadError
from subfit_fx.models import resolve_model
from tests.tiny_tokenizer import WORDS, save_tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def fake_snapshot(cache: Path, repo: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """The cache layout huggingface_hub reads offline: models--org--name/snapshots/<commit>/ + refs/<ref>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny_llama(fake_snapshot(cache, "acme/tiny-llama"))
    return cache


def test_hub_id_resolves_from_the_local_cache(hub_cache):
    model = resolve_model("acme/tiny-llama")
    local = resolve_model(str(hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT))
    assert model.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))


def test_revision_picks_another_snapshot(hub_cache):
    save_tiny_llama(fake_snapshot(hub_cache, "acme/tiny-llama", OTHER, ref="v2"), layers=3)
    assert resolve_model("acme/tiny-llama").config.num_hidden_layers == 2
    assert resolve_model("acme/tiny-llama", revision="v2").config.num_hidden_layers == 3
    assert resolve_model("acme/tiny-llama", revision=OTHER).config.num_hidden_layers == 3


def test_compress_a_hub_id(hub_cache, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(WORDS * 40))
    out = tmp_path / "out"
    assert main(["compress", "acme/tiny-llama", "--calib", str(calib), "--out", str(out), "--samples", "4",
                 "--seq-len", "16", "--method", "subfit", "--judge", "statistics", "--sparsity", "0.25",
                 "--device", "cpu"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["base_model"].endswith(f"snapshots/{COMMIT}") and recipe["options"]["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file()  # copied from the snapshot


def test_unknown_hub_id_offline_is_one_line(hub_cache, tmp_path, capsys):
    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat is on the tree")
    assert main(["compress", "acme/missing", "--calib", str(calib), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "acme/missing" in err and err.count("\n") == 1
    assert not out.exists()


def test_snapshot_without_safetensors_names_what_is_missing(hub_cache):
    snapshot = fake_snapshot(hub_cache, "acme/pickled")
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"lacks \*\.safetensors weights"):
        resolve_model("acme/pickled")


def test_remote_code_needs_the_flag(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "custom")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="acme_llama", auto_map={"AutoConfig": "modeling_acme.AcmeConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["inspect", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and err.count("\n") == 1


def test_revision_only_for_hub_ids(capsys):
    assert main(["inspect", "builtin:llama", "--revision", "v1"]) == 2
    assert "--revision applies to Hub ids" in capsys.readouterr().err


def test_remote_code_loads_with_the_flag(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "custom")
    (model_dir / "modeling_acme.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class AcmeConfig(LlamaConfig):\n    model_type = 'acme_llama'\n\n\n"
        "class AcmeForCausalLM(LlamaForCausalLM):\n    config_class = AcmeConfig\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="acme_llama", architectures=["AcmeForCausalLM"],
                  auto_map={"AutoConfig": "modeling_acme.AcmeConfig",
                            "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(model_dir), "--json", "--trust-remote-code"]) == 0
    assert len(json.loads(capsys.readouterr().out)["branches"]) == 4
