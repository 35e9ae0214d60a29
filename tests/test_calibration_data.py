"""Calibration data users have: chat JSONL rendered with the chat template, `datasets` directories,
and one-line errors (exit 2) for what cannot work."""

from __future__ import annotations

import json
import sys

import pytest

from subfit_fx.cli import main
from subfit_fx.data import read_calibration_text, text_batches, tokenize_text
from subfit_fx.errors import CalibrationError, InputError
from tests.tiny_tokenizer import save_tiny_llama, tiny_tokenizer

CHATS = [
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "fine thanks"}]},
    [{"role": "system", "content": "the answer is yes"}, {"role": "user", "content": "what colour is the sky ?"},
     {"role": "assistant", "content": "blue"}],
]
RENDERED = ("<s><user> hello world</s><assistant> fine thanks</s>\n"
            "<s><system> the answer is yes</s><user> what colour is the sky ?</s><assistant> blue</s>")


def _jsonl(path, rows, blank_line=True):
    lines = [json.dumps(r) for r in rows]
    if blank_line:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_jsonl_renders_with_the_template(tmp_path):
    tok = tiny_tokenizer()
    path = _jsonl(tmp_path / "chat.jsonl", CHATS)
    assert read_calibration_text(path, tok) == RENDERED
    ids = tokenize_text(RENDERED, tok)
    # role markers are special tokens of the template, not text: they must reach the model as their ids
    assert ids[:2].tolist() == [tok.bos_token_id, tok.convert_tokens_to_ids("<user>")]
    assert tok.unk_token_id not in ids.tolist()
    assert len(ids) == 27
    batches = text_batches(path, tok, samples=3, seq_len=8, batch_size=3)
    assert [tuple(b.shape) for b, _ in batches] == [(3, 8)]
    assert batches[0][0].flatten().tolist() == ids[:24].tolist()


@pytest.mark.parametrize(("line", "problem"), [
    ('{"messages": [{"role": "user", "content": "hi"}', "is not valid JSON"),
    ('{"text": "plain text"}', "is not a conversation"),
    ('[{"role": "user"}]', 'message 1 needs "role" and "content" strings; fix or remove that line'),
])
def test_malformed_chat_line_names_line_and_fix(tmp_path, line, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n" + line + "\n")
    with pytest.raises(CalibrationError, match="line 2 of") as info:
        read_calibration_text(path, tiny_tokenizer())
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_template_that_rejects_a_conversation_names_its_line(tmp_path):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    with pytest.raises(CalibrationError, match=r"line 3 of .*no system.*fix or remove that line"):
        read_calibration_text(_jsonl(tmp_path / "c.jsonl", CHATS), tiny_tokenizer(strict))


def _error_line(err: str) -> str:
    """The one error line of a failed command (progress lines may precede it; nothing follows it)."""
    lines = err.splitlines()
    assert "Traceback" not in err and [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("subfit-fx: error: ")
    return lines[-1]


def test_cli_malformed_jsonl_and_missing_template_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n\n{not json}\n")
    argv = ["compress", "builtin:llama", "--samples", "2", "--seq-len", "8", "--out", str(tmp_path / "o")]
    assert main([*argv, "--calib", str(bad)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "line 3 of" in err and "not valid JSON" in err
    # a built-in model has a byte tokenizer: no chat template, so chats cannot be rendered
    good = _jsonl(tmp_path / "good.jsonl", CHATS)
    assert main([*argv, "--calib", str(good)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "no chat template" in err and "calibrate on a text file" in err
    assert not (tmp_path / "o").exists()


def test_cli_compresses_a_model_calibrated_on_chats(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "m")
    chats = _jsonl(tmp_path / "chat.jsonl", CHATS * 4)  # 4 x 25 tokens: 6 sequences of 16
    out = tmp_path / "c"
    assert main(["compress", str(model), "--calib", str(chats), "--method", "llm-drop", "--sparsity", "0.25",
                 "--samples", "4", "--seq-len", "16", "--batch-size", "2", "--out", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["replacements"] and recipe["options"]["samples"] == 4


def test_datasets_directory_text_and_messages_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer()
    datasets.Dataset.from_dict({"text": ["the cat", "", "a dog"]}).save_to_disk(tmp_path / "text")
    assert read_calibration_text(tmp_path / "text", tok) == "the cat\n\na dog"
    messages = [c["messages"] if isinstance(c, dict) else c for c in CHATS]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": messages, "text": ["x", "y"]})}) \
        .save_to_disk(tmp_path / "chat")
    assert read_calibration_text(tmp_path / "chat", tok) == RENDERED  # messages win over text
    datasets.Dataset.from_dict({"body": ["the cat"]}).save_to_disk(tmp_path / "other")
    with pytest.raises(InputError, match="neither 'text' nor 'messages'; rename one"):
        read_calibration_text(tmp_path / "other", tok)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="is not readable as a dataset"):
        read_calibration_text(tmp_path / "plain", tok)


def test_datasets_data_files_text_and_messages_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer()
    datasets.Dataset.from_dict({"text": ["the cat", "a dog"]}).to_parquet(str(tmp_path / "text.parquet"))
    assert read_calibration_text(tmp_path / "text.parquet", tok) == "the cat\n\na dog"
    datasets.Dataset.from_dict({"text": ["the cat", "a dog"]}).to_csv(str(tmp_path / "text.csv"), index=False)
    assert read_calibration_text(tmp_path / "text.csv", tok) == "the cat\n\na dog"
    messages = [c["messages"] if isinstance(c, dict) else c for c in CHATS]
    datasets.Dataset.from_dict({"messages": messages}).to_parquet(str(tmp_path / "chat.parquet"))
    assert read_calibration_text(tmp_path / "chat.parquet", tok) == RENDERED
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="is not readable as a dataset"):
        read_calibration_text(tmp_path / "broken.parquet", tok)


def test_datasets_directory_without_datasets_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` sees where it is not installed
    with pytest.raises(InputError, match="pip install datasets") as info:
        read_calibration_text(tmp_path / "d", tiny_tokenizer())
    assert "\n" not in str(info.value)
