"""The reference-model trainer: learns, reloads offline, and is reproducible bit for bit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from tests.conftest import example_module

training = example_module("training")
heldout_perplexity, is_trained_model_dir, train_causal_lm = (
    training.heldout_perplexity, training.is_trained_model_dir, training.train_causal_lm)

_TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab_size=320,
             seq_len=32, batch_size=8, steps=20, lr=1e-2, seed=0, threads=1, progress=False)


def _text(n_sentences: int = 120) -> str:
    # Repetitive but not periodic: enough structure that 20 steps visibly lower the loss.
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the robot", "a bird"]
    verbs = ["sees", "likes", "chases", "finds", "paints", "carries"]
    objects = ["the ball", "a red box", "the moon", "some bread", "the river", "a small key"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ."
             for _ in range(n_sentences)]
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_causal_lm(_text(), tmp_path_factory.mktemp("a") / "model", **_TINY)


def test_loss_decreases_and_record_is_written(trained: Path) -> None:
    record = json.loads((trained / "training.json").read_text())
    assert record["steps"] == 20
    assert record["final_train_loss"] < record["initial_loss"] - 0.5
    assert is_trained_model_dir(trained)
    assert not list(trained.parent.glob(".model.tmp-*"))  # the temp dir was renamed away


def test_reloads_offline(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tf.AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = tf.AutoTokenizer.from_pretrained(trained)
    assert isinstance(model, tf.LlamaForCausalLM)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.max_position_embeddings >= 2048
    text = "the cat sees the moon ."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ppl = heldout_perplexity(model, tokenizer, _text(40), seq_len=32)
    assert 1.0 < ppl < model.config.vocab_size


def test_same_seed_gives_identical_weights(trained: Path, tmp_path: Path) -> None:
    again = train_causal_lm(_text(), tmp_path / "model", **_TINY)
    first = load_file(trained / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert (trained / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_overwrites_existing_dir_atomically(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_causal_lm(_text(40), out, **{**_TINY, "steps": 2})
    assert not (out / "stale.txt").exists()
    assert is_trained_model_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_ensure_reference_model_reuses_a_valid_dir(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_train(path: Path, *args: object) -> Path:
        calls.append(path)
        return train_causal_lm(_text(40), path, **{**_TINY, "steps": 2})

    monkeypatch.setattr(training, "_train_reference_unlocked", fake_train)
    monkeypatch.setattr(training, "_reference_files", lambda *a: (Path("t"), Path("e")))
    assert training.ensure_reference_model(trained) == trained
    assert calls == []
    missing = tmp_path / "reference"
    assert training.ensure_reference_model(missing) == missing
    assert calls == [missing] and is_trained_model_dir(missing)
    assert training.ensure_reference_model(missing) == missing
    assert len(calls) == 1
