"""The evaluation protocol (METHOD.md "Evaluation protocol"): perplexity and next-token accuracy on
non-overlapping windows, a zero-shot continuation-choice task built from the evaluation text, and,
for encoders, agreement of mean-pooled embeddings with the dense model.

`module` is anything callable as `module(input_ids, attention_mask)` returning logits (causal
LMs) or last hidden states (encoders), e.g. `Compressed.module()` or `capture(model).module()`.
Never evaluate on the calibration text.

Example:
    >>> uniform = lambda ids, mask: torch.zeros(*ids.shape, 50)
    >>> round(perplexity_and_accuracy(uniform, torch.arange(40) % 50, seq_len=8, progress=False)["perplexity"], 4)
    50.0
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from subfit_fx.data import Batch, ByteTokenizer, tokenize_text
from subfit_fx.errors import InputError

__all__ = [
    "ChoiceItem",
    "choice_correctness",
    "choice_items",
    "continuation_choice",
    "embedding_agreement",
    "evaluate",
    "passage_batches",
    "perplexity_and_accuracy",
    "split_sentences",
]

Module = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def device_of(module: Module) -> torch.device:
    """Where `module`'s weights are (inputs go there); cpu for a plain function.

    Example:
        >>> device_of(torch.nn.Linear(2, 2)), device_of(lambda ids, mask: ids)
        (device(type='cpu'), device(type='cpu'))
    """
    for tensor in (*getattr(module, "parameters", list)(), *getattr(module, "buffers", list)()):
        return tensor.device
    return torch.device("cpu")


def _windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping full windows (stride = window); a partial tail is dropped, as in
    `heldout_perplexity` of examples/training.py, so every window has the same context length (a text shorter
    than one window is one window)."""
    full = ids.numel() // seq_len
    if full == 0:
        return [ids] if ids.numel() >= 2 else []
    return list(ids[: full * seq_len].view(full, seq_len))


@torch.no_grad()
def next_token_loss(logits: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor | None = None) -> tuple[float, int, int]:
    """(summed next-token NLL in float64, correct top-1 predictions, predicted tokens) of a causal
    LM's `logits` for `ids`; with `mask`, only pairs of real tokens count.

    Example:
        >>> nll, correct, count = next_token_loss(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]))
        >>> round(nll / count, 4), count
        (1.3863, 2)
    """
    logits, targets = logits[:, :-1].float(), ids[:, 1:]
    # per-token cross-entropy: no second (batch, seq, vocab) tensor for large vocabularies
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    hit = (logits.argmax(-1) == targets).flatten()
    if mask is not None:
        valid = ((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).flatten()
        nll, hit = nll[valid], hit[valid]
    return float(nll.double().sum()), int(hit.sum()), int(nll.numel())


def perplexity_and_accuracy(module: Module, token_ids: torch.Tensor, seq_len: int, batch_size: int = 8, *,
                            progress: bool = True) -> dict[str, float]:
    """Perplexity exp(mean NLL over shifted tokens) and next-token top-1 accuracy of a causal LM
    on non-overlapping windows of `seq_len` tokens of one tokenized text (each window starts
    fresh, so its first token is only a context; a partial last window is dropped). NLL is
    summed in float64.

    Returns `perplexity`, `next_token_accuracy`, `tokens` (predicted tokens) and `windows`.

    Example:
        >>> ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
        >>> r = perplexity_and_accuracy(lambda i, m: torch.zeros(*i.shape, 8), ids, 3, progress=False)
        >>> round(r["perplexity"], 4), r["tokens"], r["windows"]
        (8.0, 4, 2)
    """
    if seq_len < 2:
        raise InputError(f"seq_len {seq_len} is too short; use at least 2 tokens")
    ids = torch.as_tensor(token_ids).long().flatten()
    windows = _windows(ids, seq_len)
    if not windows:
        raise InputError(f"the evaluation text has {ids.numel()} tokens; perplexity needs at least 2")
    groups = [torch.stack(c) for c in _chunks(windows, batch_size)]
    nll, correct, count = 0.0, 0, 0
    device = device_of(module)
    for batch in tqdm(groups, desc="perplexity", leave=False, unit="batch", disable=not progress):
        batch = batch.to(device)
        stats = next_token_loss(module(batch, torch.ones_like(batch)), batch)
        nll, correct, count = nll + stats[0], correct + stats[1], count + stats[2]
    return {"perplexity": math.exp(nll / count), "next_token_accuracy": correct / count, "tokens": count,
            "windows": len(windows)}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Sentences of a text (split after . ! ? followed by white space), white space collapsed,
    those shorter than `min_words` words dropped.

    Example:
        >>> split_sentences("One two three. Four five six! Seven? Eight nine ten.")
        ['One two three.', 'Four five six!', 'Eight nine ten.']
    """
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in (s.strip() for s in parts) if len(p.split()) >= min_words]


@dataclass(frozen=True)
class ChoiceItem:
    """One continuation-choice question: a passage, candidate next sentences, the true one's index."""

    context: str
    options: tuple[str, ...]
    answer: int


def choice_items(text: str, n_items: int = 100, seed: int = 0, *, context_sentences: int = 3,
                 distractors: int = 3) -> list[ChoiceItem]:
    """Build up to `n_items` questions from a text, deterministically given `seed`: a passage of
    `context_sentences` consecutive sentences, its true next sentence and `distractors` sentences
    drawn from elsewhere (not within the passage's neighbourhood, not equal to the true one),
    shuffled.

    Raises `InputError` when the text has too few sentences for one question.

    Example:
        >>> text = " ".join(f"Sentence number {i} is here." for i in range(20))
        >>> item = choice_items(text, 1, seed=0)[0]
        >>> len(item.options), item.options[item.answer] in text
        (4, True)
    """
    sents = split_sentences(text)
    window = context_sentences + 1
    if len(sents) < context_sentences + 1 + distractors + window:
        raise InputError(f"the evaluation text has {len(sents)} sentences; the continuation-choice task needs "
                         f"at least {context_sentences + 1 + distractors + window}: use a longer text")
    rng = random.Random(seed)
    positions = rng.sample(range(context_sentences, len(sents)), min(n_items, len(sents) - context_sentences))
    items = []
    for i in positions:
        true = sents[i]
        chosen: list[str] = []
        for _ in range(100 * distractors):  # rejection sampling keeps it O(1) per draw and deterministic
            j = rng.randrange(len(sents))
            if abs(j - i) > context_sentences and sents[j] != true and sents[j] not in chosen:
                chosen.append(sents[j])
                if len(chosen) == distractors:
                    break
        if len(chosen) < distractors:
            continue
        options = [true, *chosen]
        rng.shuffle(options)
        items.append(ChoiceItem(" ".join(sents[i - context_sentences:i]), tuple(options), options.index(true)))
    return items


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer) or not special:
        return tokenize_text(text, tokenizer).tolist()
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _pad(rows: list[list[int]], pad_id: int = 0) -> Batch:
    """Right-padded (ids, mask) batch."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[k, :len(r)] = 1
    return ids, mask


def _choice_rows(tokenizer: Any, item: ChoiceItem, max_len: int | None) -> list[tuple[list[int], int]]:
    """(tokens, continuation start) per option of one item."""
    context = _encode(tokenizer, item.context)
    rows = []
    for option in item.options:
        # Tokenize passage + continuation together and take the continuation as what follows the
        # passage's tokens, so word-boundary merges match how the model reads the text.
        whole = _encode(tokenizer, item.context + " " + option)
        start = next((p for p, (a, b) in enumerate(zip(whole, context)) if a != b), min(len(whole), len(context)))
        start = max(1, min(start, len(whole) - 1))
        if max_len is not None and len(whole) > max_len:  # keep the continuation, cut the passage's start
            cut = min(len(whole) - max_len, start - 1)
            whole, start = whole[cut:][:max_len], start - cut
        rows.append((whole, start))
    return rows


@torch.no_grad()
def _choices_correct(module: Module, tokenizer: Any, items: list[ChoiceItem], max_len: int | None) -> list[bool]:
    """Score the options of several items in one right-padded batch (padding never changes a
    causal model's logits at real positions)."""
    rows = [_choice_rows(tokenizer, item, max_len) for item in items]
    ids, mask = _pad([whole for item_rows in rows for whole, _ in item_rows])
    device = device_of(module)
    logits = module(ids.to(device), mask.to(device)).cpu()
    out, k = [], 0
    for item, item_rows in zip(items, rows):
        scores = []
        for whole, start in item_rows:
            # only the continuation's positions go through log-softmax (vocabularies are large);
            # length-normalized: mean log-probability per continuation token
            logp = torch.log_softmax(logits[k, start - 1:len(whole) - 1].float(), dim=-1)
            scores.append(float(logp.gather(-1, ids[k, start:len(whole), None]).double().mean()))
            k += 1
        out.append(max(range(len(scores)), key=lambda j: (scores[j], -j)) == item.answer)
    return out


def choice_correctness(module: Module, tokenizer: Any, text: str, n_items: int = 100, seed: int = 0, *,
                       max_len: int | None = None, items_per_batch: int = 8, first: int | None = None,
                       progress: bool = True) -> list[bool]:
    """Per-item outcomes of the continuation-choice task (`continuation_choice` is their mean), in
    the order of `choice_items(text, n_items, seed)`: what a paired comparison of two models on the
    same items needs (McNemar's test counts the items only one of them gets right). `first` scores
    only the first items of that list (a spot check of outcomes kept from an earlier run: the
    items of a smaller `n_items` are other items).

    Example:
        >>> choice_correctness(module, tokenizer, text, n_items=3, seed=0)  # doctest: +SKIP
        [True, False, True]
    """
    items = choice_items(text, n_items, seed)[:first]
    if not items:  # every passage lacked distinct distractors (a text of repeated sentences), or n_items 0
        raise InputError("the evaluation text yields no continuation-choice items (its sentences repeat, or "
                         "no items were asked for); use a text with varied sentences")
    out: list[bool] = []
    for chunk in tqdm(_chunks(items, max(1, items_per_batch)), desc="continuation choice", leave=False,
                      unit="batch", disable=not progress):
        out += _choices_correct(module, tokenizer, chunk, max_len)
    return out


def continuation_choice(module: Module, tokenizer: Any, text: str, n_items: int = 100, seed: int = 0, *,
                        max_len: int | None = None, items_per_batch: int = 8, progress: bool = True) -> float:
    """Accuracy of a causal LM on `choice_items(text, n_items, seed)`: each candidate is scored by
    its mean log-probability per token after the passage; the best must be the true sentence.
    Chance is 1 / 4. `max_len` caps the sequence length (the passage is cut from the left).
    `items_per_batch` items (4 options each) share one forward; the result does not depend on it.

    Example:
        >>> continuation_choice(module, tokenizer, text, n_items=100, seed=0)  # doctest: +SKIP
        0.41
    """
    outcomes = choice_correctness(module, tokenizer, text, n_items, seed, max_len=max_len,
                                  items_per_batch=items_per_batch, progress=progress)
    return sum(outcomes) / len(outcomes)


def passage_batches(tokenizer: Any, text: str, *, seq_len: int, n_items: int = 256, sentences: int = 2,
                    batch_size: int = 8) -> list[Batch]:
    """Up to `n_items` passages of `sentences` consecutive sentences (with the tokenizer's special
    tokens, truncated to `seq_len`), right-padded into batches: the texts encoders embed.

    Example:
        >>> from subfit_fx.data import ByteTokenizer
        >>> b = passage_batches(ByteTokenizer(128), "Aa bb cc. Dd ee ff. Gg hh ii.", seq_len=16, sentences=1)
        >>> [tuple(ids.shape) for ids, _ in b]
        [(3, 9)]
    """
    sents = split_sentences(text)
    passages = [" ".join(sents[i:i + sentences]) for i in range(0, len(sents), sentences)][:n_items]
    if not passages:
        raise InputError("the evaluation text has no sentences of 3 or more words; use a longer text")
    rows = [_encode(tokenizer, p, special=True)[:seq_len] for p in passages]
    return [_pad(chunk) for chunk in _chunks(rows, batch_size)]


@torch.no_grad()
def _pooled(module: Module, batches: Sequence[Batch], desc: str, progress: bool) -> torch.Tensor:
    out, device = [], device_of(module)
    for ids, mask in tqdm(batches, desc=desc, leave=False, unit="batch", disable=not progress):
        hidden = module(ids.to(device), mask.to(device)).double().cpu()
        weights = mask[..., None].double()
        out.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1))
    return torch.cat(out)


def embedding_agreement(module: Module, dense_module: Module, batches: Sequence[Batch], *, k: int = 10,
                        progress: bool = True) -> dict[str, float]:
    """How well an encoder keeps its dense model's embeddings: mean cosine between mean-pooled
    embeddings of the same texts, and recall@k of each text's k nearest dense neighbours (by
    cosine, the text itself excluded) among its k nearest compressed neighbours.

    Returns `embedding_cosine_to_dense`, `neighbour_recall_at_{k}` (k is capped at texts - 1 and
    the key keeps the requested k) and `texts`.

    Example:
        >>> f = lambda ids, mask: torch.nn.functional.one_hot(ids, 16).float()
        >>> b = [(torch.randint(0, 16, (12, 5)), torch.ones(12, 5, dtype=torch.long))]
        >>> round(embedding_agreement(f, f, b, progress=False)["embedding_cosine_to_dense"], 9)
        1.0
    """
    ours = _pooled(module, batches, "embeddings", progress)
    dense = _pooled(dense_module, batches, "dense embeddings", progress)
    n = ours.shape[0]
    if n < 2:
        raise InputError("embedding agreement needs at least 2 texts; use a longer evaluation text")
    cosine = torch.nn.functional.cosine_similarity(ours, dense, dim=-1)
    kk = min(k, n - 1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(e, dim=-1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(kk, dim=-1).indices

    mine, ref = neighbours(ours), neighbours(dense)
    hits = sum(len(set(mine[i].tolist()) & set(ref[i].tolist())) for i in range(n))
    return {"embedding_cosine_to_dense": float(cosine.mean()), f"neighbour_recall_at_{k}": hits / (n * kk),
            "texts": n}


def evaluate(module: Module, tokenizer: Any, text: str, *, causal: bool, seq_len: int,
             dense_module: Module | None = None, batch_size: int = 8, max_tokens: int | None = None,
             choice_items_count: int = 100, embedding_texts: int = 256, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Run the whole protocol on one evaluation text and return a JSON-able dict.

    Causal LMs: `perplexity`, `next_token_accuracy` (first `max_tokens` tokens), `choice_accuracy`;
    with `dense_module` also the dense values (`*_dense`), `perplexity_ratio` and
    `choice_retention`. Encoders: `embedding_cosine_to_dense` and `neighbour_recall_at_10`
    against `dense_module` (the module itself when None: the dense model's own row, 1.0).

    Example:
        >>> evaluate(module, tok, text, causal=True, seq_len=256)  # doctest: +SKIP
        {'perplexity': 12.3, 'next_token_accuracy': 0.38, 'choice_accuracy': 0.52, ...}
    """
    result: dict[str, Any] = {"causal": causal, "seq_len": seq_len}
    if not causal:
        batches = passage_batches(tokenizer, text, seq_len=seq_len, n_items=embedding_texts, batch_size=batch_size)
        result.update(embedding_agreement(module, dense_module or module, batches, progress=progress))
        return result
    ids = tokenize_text(text, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]

    def causal_metrics(m: Module) -> dict[str, Any]:
        out = perplexity_and_accuracy(m, ids, seq_len, batch_size, progress=progress)
        out["choice_accuracy"] = continuation_choice(m, tokenizer, text, choice_items_count, seed,
                                                     max_len=seq_len, progress=progress)
        return out

    result.update(causal_metrics(module))
    result["choice_items"] = len(choice_items(text, choice_items_count, seed))
    if dense_module is not None:
        dense = causal_metrics(dense_module)
        for key in ("perplexity", "next_token_accuracy", "choice_accuracy"):
            result[f"{key}_dense"] = dense[key]
        result["perplexity_ratio"] = result["perplexity"] / dense["perplexity"]
        result["choice_retention"] = result["choice_accuracy"] / max(dense["choice_accuracy"], 1e-12)
    return result
