"""Timing and cost accounting of exported models in ONNX Runtime (for `subfit-fx bench` and benchmarks/).

Models are timed interleaved (A, B, A, B, ...) so that drift in machine load hits both alike,
and each number is a median. Decode is timed as single steps from one fixed cache of the given
past length, so every timed step does the same work.

Example:
    >>> times = interleaved({"a": lambda: None, "b": lambda: None}, repeats=3)
    >>> sorted(times)
    ['a', 'b']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from subfit_fx.errors import InputError
from subfit_fx.exporters.validate import random_tokens
from subfit_fx.runtime import VOCAB_KEY, OnnxCausalLM, OnnxRunner, model_metadata

__all__ = [
    "decode_step",
    "interleaved",
    "kv_bytes_per_token",
    "matmul_weight_params",
    "prefill_step",
]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable over `repeats` interleaved rounds (after `warmup` rounds).

    Example:
        >>> interleaved({"noop": lambda: None}, repeats=2, warmup=0)["noop"] >= 0
        True
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def prefill_step(model: OnnxCausalLM | OnnxRunner, seq: int, batch: int = 1,
                 seed: int = 0) -> Callable[[], object]:
    """A callable running one forward over `seq` fresh tokens (prefill from an empty cache).

    Example:
        >>> fn = prefill_step(OnnxCausalLM("model.onnx"), seq=128)  # doctest: +SKIP
        >>> fn()  # doctest: +SKIP
    """
    vocab = _vocab(model)
    ids = random_tokens(vocab, batch, seq, seed).numpy()
    mask = np.ones_like(ids)
    if isinstance(model, OnnxRunner):
        return lambda: model(ids, mask)
    return lambda: model.forward(ids, mask)


def decode_step(model: OnnxCausalLM, past: int, batch: int = 1, seed: int = 0) -> Callable[[], object]:
    """A callable running one decode step at past length `past` (the cache is built once, untimed).

    A graph without cache inputs (every attention removed) decodes from the new token alone; a
    plain graph (no KV cache) would re-run the whole sequence and is refused.

    Example:
        >>> fn = decode_step(OnnxCausalLM("model.onnx"), past=512)  # doctest: +SKIP
    """
    if not model.has_cache_graph:
        raise InputError(f"'{model.path}' is not a KV-cache graph; export with --kv-cache to time decoding")
    vocab = _vocab(model)
    ids = random_tokens(vocab, batch, past + 1, seed).numpy()
    mask = np.ones_like(ids)
    _, cache = model.forward(ids[:, :past], mask[:, :past])
    step_ids, step_mask = ids[:, past:], mask
    return lambda: model.forward(step_ids, step_mask, cache)


def _vocab(model: OnnxCausalLM | OnnxRunner) -> int:
    return int(model_metadata(model.session).get(VOCAB_KEY, 100))


def kv_bytes_per_token(model: OnnxCausalLM) -> int:
    """Bytes the KV cache grows by per token of one sequence (all cached layers, keys and values).

    Example:
        >>> kv_bytes_per_token(OnnxCausalLM("model.onnx"))  # doctest: +SKIP
        4096
    """
    return int(sum(heads * head_dim * np.dtype(dtype).itemsize
                   for _, (heads, head_dim), dtype in model.cache.values()))


def matmul_weight_params(path: str | Path, *, per_use: bool = False) -> int:
    """Weights read by MatMul/Gemm (and quantized MatMul) nodes.

    A weight counts when it is an initializer or one reached through `Transpose`/`Cast`/`Identity`
    (a tied `lm_head` multiplies by the transposed embedding; ONNX Runtime folds such nodes at load).
    By default each weight counts once (bytes a step reads); with `per_use` once per node that
    multiplies by it (a shared bypass basis used by three layers costs three times the FLOPs), so
    the FLOPs per token are 2x the `per_use` count.

    Example:
        >>> matmul_weight_params("model.onnx")  # doctest: +SKIP
        6553600
    """
    proto = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}

    def source(name: str) -> str | None:
        while name not in sizes:
            node = producers.get(name)
            if node is None or node.op_type not in ("Transpose", "Cast", "Identity"):
                return None
            name = node.input[0]
        return name

    ops = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"}
    total, seen = 0, set()
    for node in proto.graph.node:
        if node.op_type in ops and len(node.input) > 1:
            weight = source(node.input[1])
            if weight is not None and (per_use or weight not in seen):
                seen.add(weight)
                total += sizes[weight]
        elif node.op_type == "MatMulNBits":
            k = next(a.i for a in node.attribute if a.name == "K")
            n = next(a.i for a in node.attribute if a.name == "N")
            if per_use or node.input[1] not in seen:
                seen.add(node.input[1])
                total += k * n
    return total
