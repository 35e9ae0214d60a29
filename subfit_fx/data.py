"""Calibration and evaluation data: token batches from text files, chat conversations, `datasets`
directories or tensors.

A calibration path is read by `read_calibration_text`: a `.jsonl` file holds chat conversations
(rendered with the tokenizer's chat template, so an instruct model is calibrated on what it sees),
a directory is a `datasets` dataset saved with `save_to_disk` (a `messages` or a `text` column;
needs `pip install datasets`), anything else is a UTF-8 text file.

Example:
    >>> batches = token_batches(torch.randint(0, 100, (5, 16)), batch_size=2)
    >>> [tuple(ids.shape) for ids, _ in batches]
    [(2, 16), (2, 16), (1, 16)]
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from subfit_fx.errors import CalibrationError, InputError

__all__ = [
    "Batch",
    "ByteTokenizer",
    "check_text_file",
    "load_tokenizer",
    "read_calibration_text",
    "read_chat_jsonl",
    "read_text",
    "render_chats",
    "split_batches",
    "text_batches",
    "token_batches",
    "tokenize_text",
    "tokenizer_from_dir",
]

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), both (batch, seq)


class ByteTokenizer:
    """Bytes as token ids (mod vocab): lets built-in random models calibrate on any text offline.

    Example:
        >>> ByteTokenizer(300)("hi")["input_ids"]
        [104, 105]
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [b % self.vocab_size for b in text.encode("utf-8")]}

    def decode(self, ids: Iterable[int], **_: Any) -> str:
        """Text of token ids (ids that are no byte are dropped).

        Example:
            >>> ByteTokenizer(300).decode([104, 105])
            'hi'
        """
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(model: torch.nn.Module, path: str | Path | None = None) -> Any:
    """The tokenizer saved with a model directory, else a `ByteTokenizer` over its vocabulary.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> type(load_tokenizer(tiny_model("llama"))).__name__
        'ByteTokenizer'
    """
    from subfit_fx.gguf import gguf_directory, is_gguf

    if path is not None and is_gguf(path):
        path = gguf_directory(path)
    if path is not None and Path(path).is_dir() and any(Path(path).glob("tokenizer*")):
        return tokenizer_from_dir(path)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    return ByteTokenizer(vocab)


def tokenizer_from_dir(path: str | Path) -> Any:
    """The tokenizer of a model directory, never running code from it: a compressed directory's
    config names its modeling code (`trust_remote_code=False` makes transformers read the
    tokenizer without it instead of asking).

    Example:
        >>> tokenizer_from_dir("models/llama")  # doctest: +SKIP
    """
    import logging

    from transformers import AutoTokenizer

    # transformers warns that the config's model_type (subfit_llama) is not the base config's
    log = logging.getLogger("transformers.configuration_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    finally:
        log.setLevel(level)


def check_text_file(path: str | Path) -> Path:
    """`path` if it is an existing, regular, readable file (a FIFO would block the read forever,
    a directory fail in it); else an `InputError` saying which it is.

    Example:
        >>> check_text_file("/")
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: text file '/' is not a regular file (a directory); pass a UTF-8 text file
    """
    path = Path(path)
    if not path.exists():
        problem = "does not exist"
    elif not path.is_file():
        mode = path.stat().st_mode
        kind = "a directory" if path.is_dir() else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        problem = f"is not a regular file ({kind})"
    elif not os.access(path, os.R_OK):
        problem = "is not readable (permission denied)"
    else:
        return path
    raise InputError(f"text file '{path}' {problem}; pass a UTF-8 text file")


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file with clear errors for missing or empty files.

    Example:
        >>> read_text("missing.txt")  # doctest: +SKIP
    """
    path = check_text_file(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"text file '{path}' is empty; pass a file with at least one sequence of text")
    return text


CHAT_LINE_HELP = 'one conversation per line: {"messages": [{"role": "user", "content": "..."}, ...]} or a bare list'


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _conversation(value: Any, where: str, unit: str = "line") -> list[dict[str, str]]:
    """`value` checked as one chat: a non-empty list of {"role": str, "content": str} (or that list
    under "messages"); `where` names the line or row in the error."""
    messages = value.get("messages") if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f"{where} is not a conversation; write {CHAT_LINE_HELP}")
    for k, message in enumerate(messages, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise CalibrationError(f'{where}: message {k} needs "role" and "content" strings; fix or remove '
                                   f"that {unit}")
    return messages


def read_chat_jsonl(path: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """The conversations of a chat JSONL file as (line number, messages); blank lines are skipped.

    Each line is `{"messages": [{"role": ..., "content": ...}, ...]}` or a bare list of messages.
    A malformed line raises `CalibrationError` naming its line number.

    Example:
        >>> read_chat_jsonl("chats.jsonl")[0]  # doctest: +SKIP
        (1, [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}])
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"chat file '{path}' does not exist; pass a JSONL file with {CHAT_LINE_HELP}")
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"line {number} of '{path}' is not valid JSON ({exc.msg} at column "
                                       f"{exc.colno}); write {CHAT_LINE_HELP}") from exc
            out.append((number, _conversation(value, f"line {number} of '{path}'")))
    if not out:
        raise CalibrationError(f"chat file '{path}' is empty; write {CHAT_LINE_HELP}")
    return out


def render_chats(conversations: Sequence[tuple[int, list[dict[str, str]]]], tokenizer: Any,
                 source: str | Path, unit: str = "line") -> str:
    """The conversations rendered with the tokenizer's chat template, one after another.

    `source` and `unit` ("line" of a file, "row" of a dataset) name a failing conversation.

    Example:
        >>> render_chats([(1, [{"role": "user", "content": "hi"}])], ByteTokenizer(9), "c.jsonl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.CalibrationError: 'c.jsonl' holds chat conversations but the model's tokenizer has no ...
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"'{source}' holds chat conversations but the model's tokenizer has no chat "
                               "template; calibrate on a text file instead, or use a model directory whose "
                               "tokenizer sets chat_template (tokenizer_config.json or chat_template.jinja)")
    texts = []
    for number, messages in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as exc:  # jinja raises its own types (a template's raise_exception, say)
            raise CalibrationError(f"{unit} {number} of '{source}': the chat template rejects the conversation "
                                   f"({_first_line(exc)}); fix or remove that {unit}") from exc
    # Conversations are separate documents: a newline keeps one's end from merging into the next's start.
    return "\n".join(texts)


# data files `datasets.load_dataset` reads by their builder (a `.jsonl` file is chat conversations)
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


def _dataset_text(path: Path, tokenizer: Any) -> str:
    what = "a directory, read as a dataset saved by datasets' save_to_disk" if path.is_dir() else \
        f"a {path.suffix} data file, read with datasets"
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"calibration path '{path}' is {what}, which needs the datasets package: "
                         "pip install datasets") from exc
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()], data_files=str(path),
                                         split="train")
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ... for a non-dataset input
        raise InputError(f"'{path}' is not readable as a dataset ({_first_line(exc)}); pass a text file, a chat "
                         ".jsonl file, a .parquet / .csv / .json data file or a save_to_disk directory") from exc
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" not in splits and len(splits) != 1:
            raise InputError(f"dataset '{path}' has splits {', '.join(splits)} and none is 'train'; save the one "
                             "to calibrate on by itself: dataset['NAME'].save_to_disk(DIR)")
        data = data["train" if "train" in splits else splits[0]]
    columns = data.column_names
    if "messages" in columns:  # an instruct model is calibrated on what it sees: prefer the chats
        chats = [(row, _conversation(value, f"row {row} of '{path}'", "row"))
                 for row, value in enumerate(data["messages"], 1)]
        return render_chats(chats, tokenizer, path, unit="row")
    if "text" in columns:
        texts = [t for t in data["text"] if isinstance(t, str) and t.strip()]
        if not texts:
            raise CalibrationError(f"the 'text' column of dataset '{path}' is empty; pass a dataset with text")
        return "\n\n".join(texts)
    raise InputError(f"dataset '{path}' has columns {', '.join(columns)} but neither 'text' nor 'messages'; "
                     "rename one: dataset.rename_column('NAME', 'text').save_to_disk(DIR)")


def read_calibration_text(path: str | Path, tokenizer: Any) -> str:
    """The calibration text at `path`: a `.jsonl` file of chat conversations (rendered with the
    tokenizer's chat template), a `datasets` save_to_disk directory or a .parquet / .csv / .json
    data file (`messages` or `text` column), else a UTF-8 text file.

    Example:
        >>> read_calibration_text("chats.jsonl", tokenizer)[:24]  # doctest: +SKIP
        '<|im_start|>user\\nHi<|im_'
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in DATA_FILE_BUILDERS:
        return _dataset_text(path, tokenizer)
    if path.suffix.lower() == ".jsonl":
        return render_chats(read_chat_jsonl(path), tokenizer, path)
    return read_text(path)


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens) into a 1-D id tensor.

    Example:
        >>> tokenize_text("abc", ByteTokenizer(256)).tolist()
        [97, 98, 99]
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if not isinstance(tokenizer, ByteTokenizer) \
        else tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_batches(path: str | Path, tokenizer: Any, *, samples: int = 64, seq_len: int = 256,
                 batch_size: int = 8, seed: int = 0, max_len: int | None = None) -> list[Batch]:
    """Chunk a calibration file (see `read_calibration_text`: text, chat .jsonl or a `datasets`
    directory) into `samples` non-overlapping sequences of `seq_len` tokens (chosen at random with
    `seed` when the text holds more), batched.

    Example:
        >>> text_batches("calib.txt", tok, samples=32, seq_len=128)  # doctest: +SKIP
    """
    if seq_len < 2:
        raise InputError(f"--seq-len {seq_len} is too short; use at least 2 tokens")
    if max_len is not None and seq_len > max_len:
        raise InputError(f"--seq-len {seq_len} exceeds the model's maximum of {max_len} positions; "
                         f"use --seq-len {max_len} or less")
    if samples < 1:
        raise InputError(f"--samples {samples} must be at least 1")
    ids = tokenize_text(read_calibration_text(path, tokenizer), tokenizer)
    chunks = ids.numel() // seq_len
    if chunks == 0:
        raise CalibrationError(f"text '{path}' has {ids.numel()} tokens, fewer than one sequence of "
                               f"{seq_len}; use a longer text or a smaller --seq-len")
    table = ids[: chunks * seq_len].view(chunks, seq_len)
    if chunks > samples:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(chunks, generator=gen)[:samples].sort().values
        table = table[pick]
    return token_batches(table, batch_size)


def token_batches(tokens: torch.Tensor | Sequence[Batch], batch_size: int = 8) -> list[Batch]:
    """Normalize calibration input: an (N, L) id tensor, or a list of (ids, mask) batches.

    Example:
        >>> len(token_batches(torch.zeros(4, 3, dtype=torch.long), 4))
        1
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise InputError(f"token tensor must be (sequences, length >= 2), got {tuple(tokens.shape)}")
        tokens = tokens.long()
        return [(c, torch.ones_like(c)) for c in tokens.split(batch_size)]
    batches = [(ids, mask if mask is not None else torch.ones_like(ids)) for ids, mask in tokens]
    if not batches:
        raise CalibrationError("no calibration batches; pass token ids or a text file")
    return batches


def split_batches(batches: list[Batch], holdout: float) -> tuple[list[Batch], list[Batch]]:
    """Split sequences into (fit, held-out) parts; held-out gets `holdout` of the sequences
    (at least one when holdout > 0 and there are two or more).

    Example:
        >>> fit, held = split_batches(token_batches(torch.zeros(10, 4, dtype=torch.long), 5), 0.2)
        >>> sum(len(i) for i, _ in fit), sum(len(i) for i, _ in held)
        (8, 2)
    """
    if holdout <= 0:
        return batches, []
    ids = torch.cat([i for i, _ in batches])
    mask = torch.cat([m for _, m in batches])
    n_hold = max(1, round(holdout * ids.shape[0])) if ids.shape[0] > 1 else 0
    size = batches[0][0].shape[0]
    cut = ids.shape[0] - n_hold
    fit = [(i, m) for i, m in zip(ids[:cut].split(size), mask[:cut].split(size))]
    held = [(i, m) for i, m in zip(ids[cut:].split(size), mask[cut:].split(size))]
    return fit, held
