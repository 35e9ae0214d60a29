"""Numerical checks of exported ONNX models: ONNX Runtime against torch, or against another ONNX model.

Checks run on fresh random tokens whose batch and length differ from the capture's example, so a
dimension that export silently fixed shows up as an error. The KV-cache check runs prefill from an
empty cache, one decode step and a two-token continuation, and compares each with torch's logits
for the whole sequence computed without a cache.

Example:
    >>> report = check_plain("model.onnx", reference, vocab_size=128)  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    onnx vs torch: max |diff| 1.2e-06 <= 1e-04, top-1 agreement 100.0% (batch 3 x seq 11)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subfit_fx.errors import ValidationError
from subfit_fx.runtime import OnnxCausalLM, OnnxRunner

__all__ = [
    "ParityReport",
    "Reference",
    "check_kv",
    "check_plain",
    "compare_onnx",
    "compare_outputs",
    "random_tokens",
]

# (input_ids, attention_mask) -> logits or last_hidden_state
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one numerical check.

    `atol` is the bound on the max abs difference that decides `passed` (None: reported only);
    `min_top1` likewise bounds the top-1 agreement of the last axis.
    """

    what: str
    max_abs_diff: float
    top1_agreement: float
    cases: tuple[str, ...]
    atol: float | None = None
    min_top1: float | None = None

    @property
    def passed(self) -> bool:
        """True when every bound holds and the outputs are finite."""
        if not np.isfinite(self.max_abs_diff):
            return False
        if self.atol is not None and self.max_abs_diff > self.atol:
            return False
        return self.min_top1 is None or self.top1_agreement >= self.min_top1

    def summary(self) -> str:
        """One line: the numbers next to their bounds.

        Example:
            >>> ParityReport("onnx vs torch", 2e-6, 1.0, ("batch 3 x seq 11",), atol=1e-4).summary()
            'onnx vs torch: max |diff| 2.0e-06 <= 1.0e-04, top-1 agreement 100.0% (batch 3 x seq 11)'
        """
        diff = f"max |diff| {self.max_abs_diff:.1e}"
        if self.atol is not None:
            diff += f" {'<=' if self.max_abs_diff <= self.atol else '>'} {self.atol:.1e}"
        top1 = f"top-1 agreement {self.top1_agreement:.1%}"
        if self.min_top1 is not None:
            top1 += f" (min {self.min_top1:.0%})"
        return f"{self.what}: {diff}, {top1} ({'; '.join(self.cases)})"

    def to_dict(self) -> dict:
        """JSON-ready fields (for reports and benchmarks).

        Example:
            >>> ParityReport("x", 0.5, 1.0, ("c",), atol=1e-4).to_dict()["passed"]
            False
        """
        return {"what": self.what, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "atol": self.atol, "min_top1": self.min_top1,
                "cases": list(self.cases), "passed": self.passed}

    def enforce(self, hint: str = "") -> ParityReport:
        """Return self, or raise `ValidationError` naming the numbers when the check failed.

        Example:
            >>> ParityReport("x", 0.5, 1.0, ("c",), atol=1e-4).enforce()
            Traceback (most recent call last):
            ...
            subfit_fx.errors.ValidationError: x: max |diff| 5.0e-01 > 1.0e-04, top-1 agreement 100.0% (c)
        """
        if not self.passed:
            raise ValidationError(self.summary() + (f"; {hint}" if hint else ""))
        return self


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Reproducible random token ids shaped (batch, seq), avoiding the first 3 (special) ids.

    Example:
        >>> tuple(random_tokens(128, 3, 5).shape)
        (3, 5)
    """
    gen = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (batch, seq), generator=gen)


def compare_outputs(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max abs difference, share of positions whose argmax over the last axis agrees).

    Example:
        >>> compare_outputs(np.array([[0.0, 1.0]]), np.array([[0.0, 1.5]]))
        (0.5, 1.0)
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValidationError(f"output shape {actual.shape} differs from the reference's {expected.shape}")
    diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
    if not np.isfinite(actual).all():
        diff = float("inf")
    top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean()) if actual.size else 1.0
    return diff, top1


def _torch_out(reference: Reference, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return reference(ids, mask).detach().float().numpy()


def check_plain(path: str | Path, reference: Reference, *, vocab_size: int, atol: float = 1e-4,
                batch: int = 3, seq: int = 11, seed: int = 0, threads: int | None = None) -> ParityReport:
    """ONNX Runtime vs `reference` on one random batch through a plain (no-cache) graph.

    Example:
        >>> check_plain("model.onnx", lambda i, m: model(input_ids=i).logits,
        ...             vocab_size=128).enforce()  # doctest: +SKIP
    """
    ids = random_tokens(vocab_size, batch, seq, seed)
    mask = torch.ones_like(ids)
    got = OnnxRunner(path, threads=threads)(ids.numpy(), mask.numpy())
    diff, top1 = compare_outputs(got, _torch_out(reference, ids, mask))
    return ParityReport("onnx vs torch", diff, top1, (f"batch {batch} x seq {seq}",), atol=atol)


def _kv_steps(lm: OnnxCausalLM, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits for positions prompt-1.. of `ids`: prefill `prompt` tokens, one decode, then the rest."""
    mask = np.ones_like(ids)
    logits, cache = lm.forward(ids[:, :prompt], mask[:, :prompt])
    outs = [logits]
    for lo, hi in ((prompt, prompt + 1), (prompt + 1, ids.shape[1])):
        if hi <= lo:
            continue
        step_ids = ids[:, lo:hi] if lm.has_cache_graph else ids[:, :hi]
        logits, cache = lm.forward(step_ids, mask[:, :hi], cache if lm.has_cache_graph else None)
        outs.append(logits[:, -(hi - lo):])
    return np.concatenate(outs, axis=1)


def check_kv(path: str | Path, reference: Reference, *, vocab_size: int, atol: float = 1e-4,
             batch: int = 3, prompt: int = 9, seed: int = 0, threads: int | None = None) -> ParityReport:
    """KV-cache graph vs `reference` (a no-cache forward): prefill, one decode step, a 2-token step.

    Example:
        >>> check_kv("model.onnx", reference, vocab_size=128).enforce()  # doctest: +SKIP
    """
    ids = random_tokens(vocab_size, batch, prompt + 3, seed)
    got = _kv_steps(OnnxCausalLM(path, threads=threads), ids.numpy(), prompt)
    expected = _torch_out(reference, ids, torch.ones_like(ids))
    diff, top1 = compare_outputs(got, expected)
    cases = (f"batch {batch}: prefill {prompt} from past 0", f"decode 1 at past {prompt}",
             f"2 tokens at past {prompt + 1}")
    return ParityReport("onnx kv-cache vs torch", diff, top1, cases, atol=atol)


def compare_onnx(candidate: str | Path, baseline: str | Path, *, vocab_size: int, kv_cache: bool,
                 atol: float | None = None, min_top1: float | None = None, what: str = "",
                 threads: int | None = None) -> ParityReport:
    """ONNX model vs ONNX model (a post-pass's output vs its input) on the same random tokens.

    Example:
        >>> compare_onnx("fused.onnx", "model.onnx", vocab_size=128, kv_cache=True,
        ...              atol=1e-4).enforce()  # doctest: +SKIP
    """
    batch, prompt = 3, 9
    ids = random_tokens(vocab_size, batch, prompt + 3, seed=1).numpy()
    if kv_cache:
        a = _kv_steps(OnnxCausalLM(candidate, threads=threads), ids, prompt)
        b = _kv_steps(OnnxCausalLM(baseline, threads=threads), ids, prompt)
        cases = (f"batch {batch}: prefill {prompt}, decode 1, 2 tokens",)
    else:
        a = OnnxRunner(candidate, threads=threads)(ids)
        b = OnnxRunner(baseline, threads=threads)(ids)
        cases = (f"batch {batch} x seq {ids.shape[1]}",)
    diff, top1 = compare_outputs(a, b)
    return ParityReport(what or f"{Path(candidate).name} vs {Path(baseline).name}", diff, top1, cases,
                        atol=atol, min_top1=min_top1)
