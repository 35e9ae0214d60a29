"""The evaluation protocol: perplexity by hand, the continuation-choice task, encoder agreement, eval CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import subfit_fx
from subfit_fx import cli
from subfit_fx.data import ByteTokenizer, tokenize_text
from subfit_fx.evaluation import (
    choice_correctness,
    choice_items,
    continuation_choice,
    embedding_agreement,
    passage_batches,
    perplexity_and_accuracy,
    split_sentences,
)
from subfit_fx.zoo import tiny_model

WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
         "lagoon", "meadow", "nectar", "onyx", "prairie", "quartz", "reef", "summit", "tundra", "umber", "valley",
         "willow", "xenon", "yarrow", "zephyr")


def _text(sentences: int = 40) -> str:
    """Distinct sentences (every 4-word sequence is unique), joined by single spaces."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(sentences):
        words = [WORDS[int(k)] for k in torch.randint(0, len(WORDS), (6,), generator=gen)]
        out.append(f"Item {i} has {' '.join(words)}.")
    return " ".join(out)


@pytest.fixture(scope="module")
def llama_module():
    return subfit_fx.capture(tiny_model("llama", layers=2)).module()


def test_perplexity_matches_hand_computation(llama_module):
    torch.set_grad_enabled(False)
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(2))
    got = perplexity_and_accuracy(llama_module, ids, seq_len=16, batch_size=2, progress=False)
    nll, correct, count = 0.0, 0, 0
    for start in range(0, 48, 16):  # three full windows; the 2-token tail is dropped
        window = ids[start:start + 16][None]
        logp = torch.log_softmax(llama_module(window, torch.ones_like(window)).double(), -1)[0, :-1]
        targets = window[0, 1:]
        nll -= float(logp[torch.arange(len(targets)), targets].sum())
        correct += int((logp.argmax(-1) == targets).sum())
        count += len(targets)
    assert (got["tokens"], got["windows"]) == (count, 3) == (45, 3)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["next_token_accuracy"] == pytest.approx(correct / count)


def test_perplexity_agrees_with_training_heldout_perplexity():
    """Same protocol as the number the reference-model training prints."""
    from tests.conftest import example_module

    heldout_perplexity = example_module("training").heldout_perplexity

    torch.set_grad_enabled(False)
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(4))
    tokenizer = lambda text, **_: {"input_ids": ids[None]}  # noqa: E731
    ours = perplexity_and_accuracy(subfit_fx.capture(model).module(), ids, 32, 4, progress=False)
    assert ours["perplexity"] == pytest.approx(heldout_perplexity(model, tokenizer, "", seq_len=32, batch_size=4),
                                               rel=1e-5)


def test_uniform_model_has_vocabulary_perplexity():
    uniform = lambda ids, mask: torch.zeros(*ids.shape, 32)  # noqa: E731
    got = perplexity_and_accuracy(uniform, torch.arange(3, 30), seq_len=5, progress=False)
    assert got["perplexity"] == pytest.approx(32.0)


def test_choice_items_are_deterministic_and_well_formed():
    text = _text()
    sents = split_sentences(text)
    a, b = choice_items(text, 12, seed=1), choice_items(text, 12, seed=1)
    assert a == b and len(a) == 12
    assert a != choice_items(text, 12, seed=2)
    for item in a:
        assert len(item.options) == 4 and len(set(item.options)) == 4
        true = item.options[item.answer]
        i = sents.index(true)
        assert item.context == " ".join(sents[i - 3:i])
        for option in item.options:
            if option != true:
                assert abs(sents.index(option) - i) > 3  # drawn from elsewhere in the text
    assert len({item.answer for item in a}) > 1  # the true sentence is not always in one slot


def _oracle(text_ids: list[int], vocab: int = 256):
    """A 'model' that has memorized the text: it predicts the token that follows the longest
    suffix of the input (up to 24 tokens) found in the text."""
    corpus = bytes(text_ids)

    def module(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        for r in range(ids.shape[0]):
            row = bytes(ids[r].tolist())
            for t in range(ids.shape[1]):
                for n in range(min(24, t + 1), 0, -1):
                    at = corpus.find(row[t + 1 - n:t + 1])
                    if at >= 0 and at + n < len(corpus):
                        logits[r, t, corpus[at + n]] = 10.0
                        break
        return logits

    return module


def test_continuation_choice_scores_the_true_continuation():
    """A model that memorized the text always prefers the true next sentence (checks the
    alignment of continuation tokens and their log-probabilities); a uniform one ties and takes
    the first option."""
    text = _text()
    tok = ByteTokenizer(256)
    oracle = _oracle(tokenize_text(text, tok).tolist())
    assert continuation_choice(oracle, tok, text, n_items=6, seed=0, progress=False) == 1.0
    # with a short window the passage is cut from the left; the continuation is still scored
    assert continuation_choice(oracle, tok, text, n_items=6, seed=0, max_len=80, progress=False) == 1.0
    uniform = lambda ids, mask: torch.zeros(*ids.shape, 256)  # noqa: E731
    first = sum(item.answer == 0 for item in choice_items(text, 6, 0)) / 6
    assert continuation_choice(uniform, tok, text, n_items=6, seed=0, progress=False) == first


def test_choice_correctness_is_per_item_in_item_order():
    """The uniform model ties and takes the first option: exactly the items whose answer is 0
    come out right, in `choice_items` order; their mean is `continuation_choice`."""
    text = _text()
    tok = ByteTokenizer(256)
    uniform = lambda ids, mask: torch.zeros(*ids.shape, 256)  # noqa: E731
    outcomes = choice_correctness(uniform, tok, text, n_items=6, seed=0, items_per_batch=4, progress=False)
    assert outcomes == [item.answer == 0 for item in choice_items(text, 6, 0)]
    assert sum(outcomes) / len(outcomes) == continuation_choice(uniform, tok, text, n_items=6, seed=0,
                                                                progress=False)
    # `first` is a prefix of the same items, not the items of a smaller n_items
    assert choice_correctness(uniform, tok, text, n_items=6, seed=0, first=2, progress=False) == outcomes[:2]


def test_continuation_choice_deterministic_in_unit_interval(llama_module):
    torch.set_grad_enabled(False)
    text, tok = _text(), ByteTokenizer(128)
    a = continuation_choice(llama_module, tok, text, n_items=6, seed=3, max_len=64, progress=False)
    b = continuation_choice(llama_module, tok, text, n_items=6, seed=3, max_len=64, progress=False)
    assert a == b and 0.0 <= a <= 1.0


def test_short_text_is_a_clear_error():
    with pytest.raises(subfit_fx.SubfitError, match="sentences"):
        choice_items("Only one sentence here.", 5)


def test_embedding_agreement_self_and_other():
    torch.set_grad_enabled(False)
    bert = subfit_fx.capture(tiny_model("bert", layers=2)).module()
    other = subfit_fx.capture(tiny_model("bert", layers=2, seed=1)).module()
    batches = passage_batches(ByteTokenizer(128), _text(), seq_len=48, n_items=16, sentences=1, batch_size=8)
    same = embedding_agreement(bert, bert, batches, progress=False)
    assert same["texts"] == 16
    assert same["embedding_cosine_to_dense"] == pytest.approx(1.0, abs=1e-9)
    assert same["neighbour_recall_at_10"] == 1.0
    diff = embedding_agreement(other, bert, batches, progress=False)
    assert diff["embedding_cosine_to_dense"] < 0.99 and 0.0 <= diff["neighbour_recall_at_10"] <= 1.0


@pytest.fixture
def eval_main(monkeypatch):
    if "subfit_fx.eval_cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "subfit_fx.eval_cli"])
    return cli.main


def test_eval_cli_json_dense_and_compressed(eval_main, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(_text())
    args = ["--text", str(text), "--seq-len", "32", "--max-tokens", "300", "--choice-items", "4", "--json"]
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    subfit_fx.compress("builtin:llama", calib, 0.25, method="llm-drop", progress=False).save(tmp_path / "c")
    assert eval_main(["eval", str(tmp_path / "c"), *args]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"perplexity", "next_token_accuracy", "choice_accuracy", "perplexity_dense", "perplexity_ratio",
            "choice_retention"} <= set(data)
    assert data["causal"] is True and data["tokens"] == (300 // 32) * 31
    assert data["perplexity_ratio"] == pytest.approx(data["perplexity"] / data["perplexity_dense"])
    assert data["model_kind"] == "compressed (llm-drop)"
    # an encoder on its own is its dense reference
    assert eval_main(["eval", "builtin:bert", *args]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["causal"] is False
    assert data["embedding_cosine_to_dense"] == pytest.approx(1.0) and data["neighbour_recall_at_10"] == 1.0


def test_eval_cli_user_errors_are_one_line(eval_main, tmp_path, capsys):
    assert eval_main(["eval", "builtin:llama", "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    (tmp_path / "t.txt").write_text(_text())
    assert eval_main(["eval", "builtin:llama", "--text", str(tmp_path / "t.txt"), "--seq-len", "4096"]) == 2
    assert "--seq-len" in capsys.readouterr().err


def test_text_without_distinct_distractors_is_a_clear_error_not_a_division_by_zero(llama_module):
    text = " ".join(["The same sentence comes again here."] * 40)  # no distractor differs from the truth
    with pytest.raises(subfit_fx.SubfitError, match="no continuation-choice items"):
        continuation_choice(llama_module, ByteTokenizer(128), text, n_items=5, progress=False)


def test_eval_cli_runs_in_the_asked_dtype_and_device(eval_main, tmp_path, capsys):
    """--dtype / --device: the compressed model and its dense base are loaded, captured and run
    there (bfloat16 on the cpu here); a device this machine lacks is one line and exit 2."""
    text = tmp_path / "eval.txt"
    text.write_text(_text())
    args = ["--text", str(text), "--seq-len", "32", "--max-tokens", "200", "--choice-items", "4", "--json"]
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    subfit_fx.compress("builtin:llama", calib, 0.25, method="llm-drop", progress=False).save(tmp_path / "c")
    assert eval_main(["eval", str(tmp_path / "c"), *args]) == 0
    full = json.loads(capsys.readouterr().out)
    assert eval_main(["eval", str(tmp_path / "c"), *args, "--dtype", "bfloat16", "--device", "cpu"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["perplexity"] != full["perplexity"]  # really ran in bfloat16
    assert half["perplexity"] == pytest.approx(full["perplexity"], rel=0.05)
    assert half["perplexity_dense"] == pytest.approx(full["perplexity_dense"], rel=0.05)
    loaded = subfit_fx.load(tmp_path / "c", dtype="bfloat16")
    assert next(loaded.base_model.parameters()).dtype == torch.bfloat16
    assert loaded.dense_model() is not None and next(loaded.dense_model().parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        assert eval_main(["eval", str(tmp_path / "c"), *args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "cuda" in err and err.count("\n") == 1
