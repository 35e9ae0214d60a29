"""`subfit-fx demo`: the whole product offline, with no arguments.

1. obtain a small *trained* causal LM: trained for a few minutes on the Python standard
   library's source (present on every machine), cached after the first run;
2. compress it to 25 % with SubFit and with the strongest baseline, same calibration and budget;
3. evaluate each on held-out source files (perplexity, next-token accuracy);
4. export each to ONNX and time prefill and decode in ONNX Runtime;
5. write a report directory and print the results table.

Example:
    >>> run_demo(out=Path("demo-output"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from subfit_fx.errors import InputError

__all__ = ["DEMO_MODEL", "demo_corpus", "ensure_demo_model", "run_demo"]

# A small Llama that learns Python syntax in a few minutes on 2 cores.
DEMO_MODEL: dict[str, Any] = {
    "layers": 6, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 352, "vocab_size": 2048,
    "seq_len": 128, "batch_size": 16, "steps": 300, "lr": 3e-3, "seed": 0,
}
CORPUS_BYTES = 1_500_000  # training text
HELDOUT_BYTES = 200_000  # evaluation text (other files)
CALIB_BYTES = 200_000  # calibration text (yet other files)


def cache_dir() -> Path:
    """Where the demo keeps its trained model (`$SUBFIT_FX_CACHE` or `~/.cache/subfit_fx`).

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    if os.environ.get("SUBFIT_FX_CACHE"):
        return Path(os.environ["SUBFIT_FX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "subfit_fx"


def demo_corpus() -> dict[str, str]:
    """Training, calibration and evaluation text from disjoint standard-library source files.

    Files are taken in sorted order (deterministic on one Python version); training gets the first
    ~1.5 MB, calibration the next ~0.2 MB and evaluation the next ~0.2 MB.

    Example:
        >>> parts = demo_corpus(); sorted(parts)
        ['calibration', 'evaluation', 'train']
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise InputError(f"no Python sources under '{stdlib}'; the demo needs the standard library's .py files")
    parts: dict[str, list[str]] = {"train": [], "calibration": [], "evaluation": []}
    budget = {"train": CORPUS_BYTES, "calibration": CALIB_BYTES, "evaluation": HELDOUT_BYTES}
    order = ["train", "calibration", "evaluation"]
    current, used = 0, 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[order[current]].append(text)
        used += len(text)
        if used >= budget[order[current]]:
            current, used = current + 1, 0
            if current == len(order):
                break
    return {k: "\n".join(v) for k, v in parts.items()}


def ensure_demo_model(progress: bool = True) -> Path:
    """The cached demo model directory; trains it (a few minutes) when missing.

    Example:
        >>> ensure_demo_model()  # doctest: +SKIP
    """
    from subfit_fx.training import is_trained_model_dir, train_causal_lm

    out = cache_dir() / "demo-model"
    if is_trained_model_dir(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = demo_corpus()
    print(f"training the demo model on Python standard-library source ({len(corpus['train']) / 1e6:.1f} MB), "
          f"cached in {out}")
    train_causal_lm(corpus["train"], out, **DEMO_MODEL, progress=progress, source="python stdlib")
    return out


def _bench(paths: dict[str, Path], prompt: int, past: int, repeats: int) -> dict[str, dict[str, float]]:
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.runtime import OnnxCausalLM

    models = {name: OnnxCausalLM(path) for name, path in paths.items()}
    prefill = interleaved({n: prefill_step(m, prompt) for n, m in models.items()}, repeats=repeats)
    decode = interleaved({n: decode_step(m, past) for n, m in models.items()}, repeats=repeats)
    return {n: {"prefill_ms": 1000 * prefill[n], "decode_ms": 1000 * decode[n],
                "kv_bytes_per_token": kv_bytes_per_token(m), "onnx_mb": paths[n].stat().st_size / 2**20}
            for n, m in models.items()}


def _table(rows: dict[str, dict[str, Any]]) -> str:
    dense = rows["dense"]
    head = ("| model | params | sparsity | perplexity | next-token acc | prefill ms (x) | decode ms/token (x) "
            "| KV bytes/token | ONNX MB |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['sparsity']:.1%} | {r['perplexity']:.2f} "
            f"| {r['next_token_accuracy']:.3f} "
            f"| {r['prefill_ms']:.1f} ({dense['prefill_ms'] / r['prefill_ms']:.2f}x) "
            f"| {r['decode_ms']:.2f} ({dense['decode_ms'] / r['decode_ms']:.2f}x) "
            f"| {r['kv_bytes_per_token']:,} | {r['onnx_mb']:.1f} |")
    return "\n".join(lines)


def run_demo(out: Path = Path("demo-output"), sparsity: float = 0.25, baseline: str = "blockpruner",
             force: bool = True, progress: bool = True) -> Path:
    """Train (or reuse) the demo model, compress it with SubFit and `baseline`, evaluate, export,
    benchmark, write `out/` (report.md, results.json, the compressed recipes and ONNX files) and
    return the report path.

    Example:
        >>> run_demo(Path("/tmp/demo"))  # doctest: +SKIP
    """
    import transformers

    import subfit_fx
    from subfit_fx.atomic import atomic_dir
    from subfit_fx.data import text_batches
    from subfit_fx.evaluation import perplexity_and_accuracy
    from subfit_fx.exporters.kv_cache import export_onnx_kv

    start = time.perf_counter()
    model_dir = ensure_demo_model(progress)
    model = subfit_fx.load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    corpus = demo_corpus()
    calib_path = cache_dir() / "demo-calibration.txt"
    calib_path.write_text(corpus["calibration"])
    calib = text_batches(calib_path, tokenizer, samples=32, seq_len=128, batch_size=8)
    eval_ids = torch.tensor(tokenizer(corpus["evaluation"], add_special_tokens=False)["input_ids"])[:12_800]

    with atomic_dir(Path(out), force=force) as tmp:
        candidates: dict[str, Any] = {"dense": None}
        for method in ("subfit", baseline):
            print(f"compressing with {method} to {sparsity:.0%}", flush=True)
            c = subfit_fx.compress(model, calib, sparsity, method, progress=progress)
            c.recipe.base_model = str(model_dir)
            c.save(tmp / method)
            candidates[method] = c
        rows: dict[str, dict[str, Any]] = {}
        paths: dict[str, Path] = {}
        for name, c in candidates.items():
            module = subfit_fx.capture(model).module() if c is None else c.module()
            metrics = perplexity_and_accuracy(module, eval_ids, 128, progress=progress)
            print(f"exporting {name} to ONNX with KV cache", flush=True)
            paths[name] = tmp / f"{name}.onnx"
            export_onnx_kv(model if c is None else c, paths[name])
            rows[name] = {"params": c.report.params_after if c else model.num_parameters(),
                          "sparsity": c.report.sparsity_actual if c else 0.0, **metrics}
        print("timing prefill (128 tokens) and decode (past 256) in ONNX Runtime, interleaved", flush=True)
        for name, timing in _bench(paths, 128, 256, repeats=10).items():
            rows[name].update(timing)
        table = _table(rows)
        report = (f"# subfit_fx demo\n\nModel: {DEMO_MODEL['layers']}-layer Llama (hidden {DEMO_MODEL['hidden']}) "
                  f"trained on Python standard-library source; compressed to {sparsity:.0%} of block parameters; "
                  f"evaluated on held-out standard-library files; ONNX Runtime CPU, medians of interleaved runs.\n\n"
                  f"{table}\n\nTotal time {time.perf_counter() - start:.0f} s.\n")
        (tmp / "report.md").write_text(report)
        (tmp / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + table)
    print(f"\nreport: {Path(out) / 'report.md'}")
    return Path(out) / "report.md"
