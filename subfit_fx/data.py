"""Calibration and evaluation data: token batches from text files or tensors.

Example:
    >>> batches = token_batches(torch.randint(0, 100, (5, 16)), batch_size=2)
    >>> [tuple(ids.shape) for ids, _ in batches]
    [(2, 16), (2, 16), (1, 16)]
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from subfit_fx.errors import CalibrationError, InputError

__all__ = [
    "Batch",
    "ByteTokenizer",
    "check_text_file",
    "load_tokenizer",
    "read_text",
    "split_batches",
    "text_batches",
    "token_batches",
    "tokenize_text",
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
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    return ByteTokenizer(vocab)


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
    """Chunk a text file into `samples` non-overlapping sequences of `seq_len` tokens (chosen at
    random with `seed` when the text holds more), batched.

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
    ids = tokenize_text(read_text(path), tokenizer)
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
