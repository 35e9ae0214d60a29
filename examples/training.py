"""Train small causal language models from scratch, offline, on CPU.

The quality benchmarks need a model whose weights carry real structure (a random-init model has
no redundancy worth compressing), and no hub is reachable. This module trains one: a byte-level
BPE tokenizer plus a Llama-architecture decoder, saved as an ordinary Hugging Face directory.
It is generic so a demo can train a tiny model on any text in a few minutes.

Example:
    >>> from pathlib import Path
    >>> from training import train_causal_lm  # examples/ on sys.path
    >>> out = train_causal_lm("the cat sat on the mat. " * 200, Path("/tmp/tiny"), layers=2,
    ...                       hidden=32, heads=4, kv_heads=2, intermediate=64, vocab_size=300,
    ...                       seq_len=32, batch_size=4, steps=10, lr=3e-3, seed=0,
    ...                       progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from subfit_fx.atomic import atomic_dir

__all__ = [
    "REFERENCE_DEFAULTS",
    "SPECIAL_TOKEN",
    "default_data_dir",
    "default_reference_dir",
    "ensure_reference_model",
    "heldout_perplexity",
    "is_trained_model_dir",
    "train_causal_lm",
    "train_reference_model",
    "train_tokenizer",
]

SPECIAL_TOKEN = "<|endoftext|>"

# Sized so one CPU thread trains it in about 40-45 minutes (measured ~2.1 s/step for batch 16 x 256
# tokens, 6.85M parameters). Changing these changes every benchmark baseline.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "layers": 8,
    "hidden": 256,
    "heads": 8,
    "kv_heads": 4,
    "intermediate": 688,
    "vocab_size": 4096,
    "seq_len": 256,
    "batch_size": 16,
    "steps": 1100,
    "lr": 2e-3,
    "seed": 0,
}
REFERENCE_TRAIN_FILE = "wikitext-2/valid.txt"
REFERENCE_EVAL_FILE = "wikitext-2/test.txt"  # held out: never trained on
# Benchmarks score the head of test.txt; overfitting is watched on its tail so the two never meet.
_MONITOR_CHARS = 100_000

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")


def default_data_dir() -> Path:
    """Return the shared data directory that sits next to the repository checkout.

    Example:
        >>> default_data_dir().name
        'data'
    """
    return Path(__file__).resolve().parents[1].parent / "shared/data"


def default_reference_dir() -> Path:
    """Return where the reference model is cached (``SUBFIT_FX_REFERENCE`` overrides it).

    Example:
        >>> default_reference_dir().name  # doctest: +SKIP
        'reference'
    """
    env = os.environ.get("SUBFIT_FX_REFERENCE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".cache/reference"


def train_tokenizer(texts: list[str], vocab_size: int) -> tf.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``save_pretrained``.

    Byte-level means any string round-trips, so held-out text never hits an unknown token.
    The single special token ``<|endoftext|>`` serves as bos, eos, pad and unk.

    Example:
        >>> tok = train_tokenizer(["hello world"] * 10, vocab_size=300)
        >>> tok.decode(tok("hello world")["input_ids"])
        'hello world'
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        # All 256 byte symbols up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=1 << 20,
    )


def _lr_at(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _encode(tokenizer: tf.PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    # One whole-text encode, exactly as heldout_perplexity tokenizes, so train and eval agree.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Norm gains and biases are not decayed; decaying them only hurts small models.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_causal_lm(
    text: str,
    out_dir: Path,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    steps: int,
    lr: float,
    seed: int,
    threads: int | None = None,
    progress: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    source: str | None = None,
    eval_text: str | None = None,
    eval_every: int = 0,
    eval_tokens: int = 20_000,
) -> Path:
    """Train a tokenizer and a random-init Llama on ``text``; save both to ``out_dir``.

    Windows of ``seq_len`` tokens are drawn at random from the tokenized text with a seeded
    generator, so a run is bitwise reproducible for a given seed and thread count. The result
    is written to a temporary sibling directory and renamed into place, so ``out_dir`` never
    holds a half-written model. ``threads`` caps torch's intra-op threads for the run only.
    With ``eval_text`` and ``eval_every``, perplexity on that text is logged every
    ``eval_every`` steps to watch for overfitting; it never influences the weights.

    Example:
        >>> from pathlib import Path
        >>> out = train_causal_lm("a b c. " * 500, Path("/tmp/m"), layers=1, hidden=32,
        ...                       heads=4, kv_heads=2, intermediate=64, vocab_size=280,
        ...                       seq_len=16, batch_size=2, steps=5, lr=1e-3, seed=0,
        ...                       progress=False)  # doctest: +SKIP
        >>> (out / "training.json").exists()  # doctest: +SKIP
        True
    """
    out_dir = Path(out_dir)
    if steps < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need steps >= 1, seq_len >= 2, batch_size >= 1; got {steps=}, "
                         f"{seq_len=}, {batch_size=}")
    prev_threads, prev_grad = torch.get_num_threads(), torch.is_grad_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(True)  # training needs autograd whatever the caller switched off
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(text.splitlines(keepends=True), vocab_size)
        ids = _encode(tokenizer, text)
        if ids.numel() <= seq_len + 1:
            raise ValueError(f"text has {ids.numel()} tokens, need more than seq_len={seq_len}")
        special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)

        config = tf.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max(2048, seq_len),
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=special_id,
            eos_token_id=special_id,
            pad_token_id=special_id,
        )
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(config).float()
        model.train()

        optimizer = torch.optim.AdamW(
            _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8
        )
        warmup = warmup if warmup is not None else max(1, steps // 20)
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len)
        losses: list[float] = []
        eval_curve: list[tuple[int, float]] = []
        # In a log file (nohup) every refresh appends a line, so refresh rarely there.
        interactive = sys.stderr.isatty()
        bar = tqdm(range(steps), disable=not progress, desc="train", dynamic_ncols=interactive,
                   mininterval=0.1 if interactive else 30.0)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, warmup, lr)
            starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=gen)
            batch = ids[starts[:, None] + offsets]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if eval_text and eval_every > 0 and ((step + 1) % eval_every == 0 or step + 1 == steps):
                ppl = heldout_perplexity(model, tokenizer, eval_text, max_tokens=eval_tokens,
                                         seq_len=seq_len, batch_size=batch_size)
                eval_curve.append((step + 1, round(ppl, 3)))
                bar.write(f"step {step + 1}: train loss {losses[-1]:.4f}, eval ppl {ppl:.2f}")
            # refresh=False lets mininterval throttle the bar instead of redrawing every step.
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            refresh=False)
        bar.close()
        model.eval()

        tail = losses[-max(1, steps // 20):]
        record = {
            "config": {
                "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                "intermediate": intermediate, "vocab_size": vocab_size, "seq_len": seq_len,
                "batch_size": batch_size, "steps": steps, "lr": lr, "seed": seed,
                "warmup": warmup, "weight_decay": weight_decay, "grad_clip": grad_clip,
                "threads": torch.get_num_threads(),
            },
            "steps": steps,
            "train_tokens": int(ids.numel()),
            "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            # Mean over the last 5% of steps: one batch's loss is too noisy to compare runs.
            "final_train_loss": sum(tail) / len(tail) if losses else None,
            "loss_curve": losses[:: max(1, steps // 100)],
            "eval_curve": eval_curve,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "text_source": source,
            "text_chars": len(text),
        }

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir, force=True) as tmp:  # a retrained model replaces the cached one
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return out_dir
    finally:
        torch.set_num_threads(prev_threads)
        torch.set_grad_enabled(prev_grad)


@torch.no_grad()
def heldout_perplexity(
    model: tf.PreTrainedModel,
    tokenizer: tf.PreTrainedTokenizerBase,
    text: str,
    *,
    max_tokens: int = 50_000,
    seq_len: int = 256,
    batch_size: int = 8,
) -> float:
    """Perplexity on the first ``max_tokens`` tokens of ``text``, in non-overlapping windows.

    Each window is scored on its own (no carried context), and a trailing partial window is
    dropped, so the number is comparable across models with the same tokenizer.

    Example:
        >>> ppl = heldout_perplexity(model, tokenizer, test_text)  # doctest: +SKIP
    """
    from subfit_fx.evaluation import perplexity_and_accuracy

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:max_tokens]
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    was_training = model.training
    model.eval()
    try:
        return perplexity_and_accuracy(lambda i, m: model(input_ids=i).logits, ids, seq_len, batch_size,
                                       progress=False)["perplexity"]
    finally:
        model.train(was_training)


def is_trained_model_dir(path: Path) -> bool:
    """True when ``path`` holds a complete model written by :func:`train_causal_lm`.

    Example:
        >>> is_trained_model_dir(Path("/nonexistent"))
        False
    """
    path = Path(path)
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        record = json.loads((path / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("final_train_loss") is not None


def _reference_files(train_file: Path | None, eval_file: Path | None) -> tuple[Path, Path]:
    train_file = Path(train_file or default_data_dir() / REFERENCE_TRAIN_FILE)
    eval_file = Path(eval_file or default_data_dir() / REFERENCE_EVAL_FILE)
    if not train_file.is_file():
        raise FileNotFoundError(f"reference training text not found: {train_file}")
    if train_file.resolve() == eval_file.resolve():
        raise ValueError(f"{train_file} is the held-out evaluation text; train on another file")
    return train_file, eval_file


@contextlib.contextmanager
def _training_lock(out_dir: Path) -> Iterator[None]:
    # Two benchmarks starting at once must not both spend 45 minutes training the same model:
    # the second waits here, then finds the first one's result. (Not the output's own lock,
    # `.NAME.lock`, which subfit_fx.atomic takes while writing it: that one refuses, this one waits.)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.training.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_reference_model(
    out_dir: Path | None = None,
    *,
    train_file: Path | None = None,
    eval_file: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    monitor_every: int = 0,
    **overrides: Any,
) -> Path:
    """Train the benchmark reference model (``REFERENCE_DEFAULTS``) on wikitext-2 valid.

    ``monitor_every > 0`` logs perplexity on the tail of ``eval_file`` (wikitext-2 test.txt)
    during training, to watch overfitting only; benchmarks evaluate on its head.

    Example:
        >>> train_reference_model(threads=1)  # doctest: +SKIP
    """
    train_file, eval_file = _reference_files(train_file, eval_file)
    eval_text = None
    if monitor_every > 0 and eval_file.is_file():
        eval_text = eval_file.read_text(encoding="utf-8")[-_MONITOR_CHARS:]
    out_dir = Path(out_dir or default_reference_dir())
    with _training_lock(out_dir):
        return _train_reference_unlocked(
            out_dir, train_file, eval_text, threads, progress, monitor_every, overrides
        )


def _train_reference_unlocked(
    out_dir: Path,
    train_file: Path,
    eval_text: str | None,
    threads: int | None,
    progress: bool,
    monitor_every: int,
    overrides: dict[str, Any],
) -> Path:
    return train_causal_lm(
        train_file.read_text(encoding="utf-8"),
        out_dir,
        threads=threads,
        progress=progress,
        source=str(train_file),
        eval_text=eval_text,
        eval_every=monitor_every,
        **{**REFERENCE_DEFAULTS, **overrides},
    )


def ensure_reference_model(path: Path | None = None) -> Path:
    """Return the cached reference model directory, training it first if it is missing.

    Training takes about 45 minutes on one CPU thread; benchmarks call this so the cost is
    paid once per checkout.

    Example:
        >>> model_dir = ensure_reference_model()  # doctest: +SKIP
        >>> model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # doctest: +SKIP
    """
    path = Path(path) if path is not None else default_reference_dir()
    if is_trained_model_dir(path):
        return path
    train_file, _ = _reference_files(None, None)
    with _training_lock(path):
        # Another process may have finished training while this one waited for the lock.
        if is_trained_model_dir(path):
            return path
        return _train_reference_unlocked(path, train_file, None, None, True, 0, {})
