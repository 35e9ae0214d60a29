"""Numerical checks of exported ONNX models: ONNX Runtime against torch, or against another ONNX model.

Checks run on fresh random tokens whose batch and length differ from the capture's example, so a
dimension that export silently fixed shows up as an error. The KV-cache check runs prefill from an
empty cache, one decode step and a two-token continuation, and compares each with torch's logits
for the whole sequence computed without a cache.

The criterion scales with the model (a `Tolerance`): the max abs difference is divided by the
reference's scale (its max |value|), because float32 round-off grows with depth and with the
size of the logits - a fixed absolute bound rejects a 30-layer model whose logits reach 30 while
letting a small model's real error through. Next to it: the top-1 agreement of the last axis, and
for logits the KL divergence of the next-token distributions (reference || ONNX), max over
positions. Thresholds per dtype (`tolerance_for`): float32 relative 1e-4 and KL 1e-5 nats;
float16 / bfloat16 relative 2e-2 and KL 1e-3. Round-off of a deep float32 model sits near 1e-6
relative and 1e-10 nats; a wrong weight or a mis-wired cache moves both by orders of magnitude.

Example:
    >>> report = check_plain("model.onnx", reference, vocab_size=128)  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    onnx vs torch: max |diff| 1.2e-06 = 2.1e-07 of scale 5.8 <= 1.0e-04, KL 3.1e-12 <= 1.0e-05, ...
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
    "EXACT",
    "ParityReport",
    "Reference",
    "Tolerance",
    "check_kv",
    "check_plain",
    "compare_onnx",
    "compare_outputs",
    "random_tokens",
    "tolerance_for",
]

# (input_ids, attention_mask) -> logits or last_hidden_state
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tolerance:
    """Bounds a parity check must meet; None leaves a number reported but unchecked.

    `rtol` bounds max |diff| / max |reference|, `max_kl` the largest per-position KL divergence
    (nats) of the softmax over the last axis (logits only), `min_top1` the share of positions whose
    argmax agrees.

    Example:
        >>> Tolerance(rtol=1e-4).max_kl is None
        True
    """

    rtol: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None


# the same function computed another way (export, fusions) in float32
EXACT = Tolerance(rtol=1e-4, max_kl=1e-5)
# Checks run on ONNX Runtime's CPU provider: they test the graph, and the CUDA provider's default
# TF32 matmuls (about 1e-3 relative) would fail a float32 graph that is exact
CHECK_PROVIDERS = ["CPUExecutionProvider"]
_BY_DTYPE = {torch.float32: EXACT, torch.float64: EXACT,
             torch.float16: Tolerance(rtol=2e-2, max_kl=1e-3), torch.bfloat16: Tolerance(rtol=2e-2, max_kl=1e-3)}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The exact-computation tolerance for a model whose weights are `dtype`.

    Example:
        >>> tolerance_for(torch.float16).rtol
        0.02
    """
    return _BY_DTYPE.get(dtype, EXACT)


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one numerical check: the numbers, and the `Tolerance` that decides `passed`.

    `scale` is max |reference|; `kl` is None when the outputs are not logits.
    """

    what: str
    max_abs_diff: float
    top1_agreement: float
    cases: tuple[str, ...]
    scale: float = 1.0
    kl: float | None = None
    tolerance: Tolerance = Tolerance()

    @property
    def relative_diff(self) -> float:
        """max |diff| divided by the reference's scale (max |value|).

        Example:
            >>> ParityReport("x", 2e-4, 1.0, (), scale=20.0).relative_diff
            1e-05
        """
        return self.max_abs_diff / max(self.scale, 1e-30)

    @property
    def passed(self) -> bool:
        """True when every bound holds and the outputs are finite."""
        tol = self.tolerance
        if not np.isfinite(self.max_abs_diff):
            return False
        if tol.rtol is not None and self.relative_diff > tol.rtol:
            return False
        if tol.max_kl is not None and self.kl is not None and not self.kl <= tol.max_kl:
            return False
        return tol.min_top1 is None or self.top1_agreement >= tol.min_top1

    def summary(self) -> str:
        """One line: the numbers next to their bounds.

        Example:
            >>> ParityReport("onnx vs torch", 2e-6, 1.0, ("b 3",), scale=4.0,
            ...              tolerance=Tolerance(rtol=1e-4)).summary()
            'onnx vs torch: max |diff| 2.0e-06 = 5.0e-07 of scale 4 <= 1.0e-04, top-1 agreement 100.0% (b 3)'
        """
        tol = self.tolerance
        diff = f"max |diff| {self.max_abs_diff:.1e} = {self.relative_diff:.1e} of scale {self.scale:.3g}"
        if tol.rtol is not None:
            diff += f" {'<=' if self.relative_diff <= tol.rtol else '>'} {tol.rtol:.1e}"
        parts = [diff]
        if self.kl is not None:
            kl = f"KL {self.kl:.1e}"
            if tol.max_kl is not None:
                kl += f" {'<=' if self.kl <= tol.max_kl else '>'} {tol.max_kl:.1e}"
            parts.append(kl)
        top1 = f"top-1 agreement {self.top1_agreement:.1%}"
        if tol.min_top1 is not None:
            top1 += f" (min {tol.min_top1:.0%})"
        parts.append(top1)
        return f"{self.what}: {', '.join(parts)} ({'; '.join(self.cases)})"

    def to_dict(self) -> dict:
        """JSON-ready fields (for reports and benchmarks).

        Example:
            >>> ParityReport("x", 0.5, 1.0, ("c",), tolerance=EXACT).to_dict()["passed"]
            False
        """
        return {"what": self.what, "max_abs_diff": self.max_abs_diff, "scale": self.scale,
                "relative_diff": self.relative_diff, "kl": self.kl, "top1_agreement": self.top1_agreement,
                "rtol": self.tolerance.rtol, "max_kl": self.tolerance.max_kl, "min_top1": self.tolerance.min_top1,
                "cases": list(self.cases), "passed": self.passed}

    def enforce(self, hint: str = "") -> ParityReport:
        """Return self, or raise `ValidationError` naming the numbers when the check failed.

        Example:
            >>> ParityReport("x", 0.5, 1.0, ("c",), tolerance=Tolerance(rtol=1e-4)).enforce()
            Traceback (most recent call last):
            ...
            subfit_fx.errors.ValidationError: x: max |diff| 5.0e-01 = 5.0e-01 of scale 1 > 1.0e-04, ...
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


def _max_kl(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest KL(softmax(expected) || softmax(actual)) over positions, in nats."""
    a = torch.log_softmax(torch.as_tensor(np.asarray(actual, np.float64)), -1)
    e = torch.log_softmax(torch.as_tensor(np.asarray(expected, np.float64)), -1)
    kl = (e.exp() * (e - a)).sum(-1)
    return float(kl.max()) if kl.numel() else 0.0


def _report(what: str, actual: np.ndarray, expected: np.ndarray, cases: tuple[str, ...], tolerance: Tolerance,
            vocab_size: int | None) -> ParityReport:
    diff, top1 = compare_outputs(actual, expected)
    scale = float(np.abs(np.asarray(expected, np.float64)).max()) if np.size(expected) else 1.0
    logits = vocab_size is not None and np.shape(expected)[-1] == vocab_size
    kl = _max_kl(actual, expected) if logits and np.isfinite(diff) else None
    return ParityReport(what, diff, top1, cases, scale=scale, kl=kl, tolerance=tolerance)


def _torch_out(reference: Reference, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return reference(ids, mask).detach().float().numpy()


def check_plain(path: str | Path, reference: Reference, *, vocab_size: int, tolerance: Tolerance = EXACT,
                batch: int = 3, seq: int = 11, seed: int = 0, threads: int | None = None) -> ParityReport:
    """ONNX Runtime vs `reference` on one random batch through a plain (no-cache) graph.

    Example:
        >>> check_plain("model.onnx", lambda i, m: model(input_ids=i).logits,
        ...             vocab_size=128).enforce()  # doctest: +SKIP
    """
    ids = random_tokens(vocab_size, batch, seq, seed)
    mask = torch.ones_like(ids)
    got = OnnxRunner(path, threads=threads, providers=CHECK_PROVIDERS)(ids.numpy(), mask.numpy())
    return _report("onnx vs torch", got, _torch_out(reference, ids, mask), (f"batch {batch} x seq {seq}",),
                   tolerance, vocab_size)


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


def check_kv(path: str | Path, reference: Reference, *, vocab_size: int, tolerance: Tolerance = EXACT,
             batch: int = 3, prompt: int = 9, seed: int = 0, threads: int | None = None) -> ParityReport:
    """KV-cache graph vs `reference` (a no-cache forward): prefill, one decode step, a 2-token step.

    Example:
        >>> check_kv("model.onnx", reference, vocab_size=128).enforce()  # doctest: +SKIP
    """
    ids = random_tokens(vocab_size, batch, prompt + 3, seed)
    got = _kv_steps(OnnxCausalLM(path, threads=threads, providers=CHECK_PROVIDERS), ids.numpy(), prompt)
    expected = _torch_out(reference, ids, torch.ones_like(ids))
    cases = (f"batch {batch}: prefill {prompt} from past 0", f"decode 1 at past {prompt}",
             f"2 tokens at past {prompt + 1}")
    return _report("onnx kv-cache vs torch", got, expected, cases, tolerance, vocab_size)


def compare_onnx(candidate: str | Path, baseline: str | Path, *, vocab_size: int, kv_cache: bool,
                 tolerance: Tolerance = EXACT, what: str = "", threads: int | None = None) -> ParityReport:
    """ONNX model vs ONNX model (a post-pass's output vs its input) on the same tokens.

    An exact pass (no `min_top1`) is checked on random tokens. A lossy one (quantization, judged by
    top-1 agreement) is checked on text the baseline finds likely: 3 random tokens extended
    greedily by the baseline itself to 32, because on random tokens a real model's next-token
    distribution is flat, and its argmax flips under harmless quantization noise.

    Example:
        >>> compare_onnx("fused.onnx", "model.onnx", vocab_size=128, kv_cache=True,
        ...              tolerance=EXACT).enforce()  # doctest: +SKIP
    """
    lossy = tolerance.min_top1 is not None
    batch, prompt = 3, (29 if lossy else 9)  # lossy: more positions, the agreement is a share
    ids = random_tokens(vocab_size, batch, 3 if lossy else prompt + 3, seed=1).numpy()
    runner = OnnxCausalLM if kv_cache else OnnxRunner
    base = runner(baseline, threads=threads, providers=CHECK_PROVIDERS)

    def logits(model: OnnxCausalLM | OnnxRunner, tokens: np.ndarray) -> np.ndarray:
        return model.forward(tokens, np.ones_like(tokens))[0] if kv_cache else model(tokens)

    while ids.shape[1] < prompt + 3:
        ids = np.concatenate([ids, logits(base, ids)[:, -1:].argmax(-1)], axis=1)
    source = f"3 random + {prompt} greedy (baseline) tokens" if lossy else "random tokens"
    if kv_cache:
        a = _kv_steps(OnnxCausalLM(candidate, threads=threads, providers=CHECK_PROVIDERS), ids, prompt)
        b = _kv_steps(base, ids, prompt)
        cases = (f"batch {batch}, {source}: prefill {prompt}, decode 1, 2 tokens",)
    else:
        a = OnnxRunner(candidate, threads=threads, providers=CHECK_PROVIDERS)(ids)
        b = base(ids)
        cases = (f"batch {batch} x seq {ids.shape[1]}, {source}",)
    return _report(what or f"{Path(candidate).name} vs {Path(baseline).name}", a, b, cases, tolerance, vocab_size)
