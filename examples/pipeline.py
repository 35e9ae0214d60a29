"""End to end: SubFit 25 % -> ONNX with KV cache -> ONNX Runtime fusions -> int8 and int4, in one table.

    python examples/pipeline.py                      # reference model -> docs/results/pipeline.{json,md}
    python examples/pipeline.py --quick              # tiny random model, short texts: a smoke run
    python examples/pipeline.py --model DIR --calib valid.txt --eval test.txt --out out/pipeline

Every stage is a file that ONNX Runtime runs: dense and SubFit-compressed, each exported with its KV
cache (validated against torch), fused for ONNX Runtime (validated: relative 1e-4, KL 1e-5), and quantized from the
fused file to int8 (dynamic, MatMul weights) and int4 (weight-only `MatMulNBits`, block 32). For
each: file size, prefill latency of a LENGTH-token prompt, decode latency per token at past
LENGTH (medians of interleaved runs over all stages, batch 1, from `subfit_fx.exporters.bench`),
KV-cache bytes per token, and perplexity / next-token accuracy of the ONNX file itself on
held-out text (non-overlapping windows, `subfit_fx.evaluation.perplexity_and_accuracy` over
the ONNX runner).

Defaults: `--model .cache/reference` (the trained 8-layer Llama with its tokenizer), calibration
`../shared/data/wikitext-2/valid.txt`, evaluation the second half of
`../shared/data/wikitext-2/test.txt` (the held-out half, as in benchmarks/quality.py; a file
given with `--eval` is used whole), first 20,000 tokens. `--quick` uses `builtin:llama` (random
weights, byte tokenizer), short texts from Python's standard library, 3 repeats, and writes under
`.cache/pipeline-quick/`, never to docs/results.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "OnnxLogits", "eval_text", "main", "markdown", "parse_args", "run"]

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared/data/wikitext-2"
DEFAULT_OUT = REPO / "docs/results/pipeline"
QUICK_OUT = REPO / ".cache/pipeline-quick/pipeline"
# (stage, model, ONNX file suffix, the stage it is made from); int8/int4 are made from the fused file
STAGES = [
    ("dense fp32", "dense", "onnx", None),
    ("dense fused", "dense", "fused.onnx", "dense fp32"),
    ("dense fused+int8", "dense", "fused.int8.onnx", "dense fused"),
    ("dense fused+int4", "dense", "fused.int4.onnx", "dense fused"),
    ("subfit fp32", "subfit", "onnx", None),
    ("subfit fused", "subfit", "fused.onnx", "subfit fp32"),
    ("subfit fused+int8", "subfit", "fused.int8.onnx", "subfit fused"),
    ("subfit fused+int4", "subfit", "fused.int4.onnx", "subfit fused"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the `--quick` defaults filled in.

    Example:
        >>> parse_args(["--quick"]).model
        'builtin:llama'
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", default=None, help="dense model: a Hugging Face directory or builtin:ARCH "
                                                 "(default .cache/reference; builtin:llama with --quick)")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration text (default ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out evaluation text, used whole (default: second half of "
                        "../shared/data/wikitext-2/test.txt)")
    p.add_argument("--sparsity", type=float, default=0.25, help="SubFit sparsity (0.25)")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (64; 16 quick)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (256; 64 quick)")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens (20000; 2048 quick)")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens (128; 64 quick)")
    p.add_argument("--length", type=int, default=None,
                   help="prefill prompt length and decode past length (128; 32 quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved runs (10; 3 quick)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1)")
    p.add_argument("--no-dense-quant", action="store_true", help="skip the dense int8/int4 stages")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the ONNX files (default .cache/pipeline; OUT-onnx with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix: writes OUT.json and OUT.md (default docs/results/pipeline; "
                        ".cache/pipeline-quick/pipeline with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny built-in model and short texts: a smoke run")
    args = p.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("builtin:llama" if quick else str(REPO / ".cache/reference"))
    args.samples = args.samples or (16 if quick else 64)
    args.seq_len = args.seq_len or (64 if quick else 256)
    args.eval_tokens = args.eval_tokens or (2048 if quick else 20_000)
    args.window = args.window or (64 if quick else 128)
    args.length = args.length or (32 if quick else 128)
    args.repeats = args.repeats or (3 if quick else 10)
    args.out = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    args.work = args.work or (args.out.parent / f"{args.out.name}-onnx" if quick else REPO / ".cache/pipeline")
    return args


def eval_text(path: Path | None) -> tuple[str, str]:
    """The evaluation text and where it came from: `path` whole, else wikitext-2 test.txt's second half.

    The default halves test.txt at a line boundary as benchmarks/quality.py does: its first half
    is the dev split used to choose options, so only the second half is held out.

    Example:
        >>> text, source = eval_text(None)  # doctest: +SKIP
        >>> source  # doctest: +SKIP
        '../shared/data/wikitext-2/test.txt (second half)'
    """
    from subfit_fx.data import read_text

    if path is not None:
        return read_text(path), str(path)
    text = read_text(WIKITEXT / "test.txt")
    cut = text.index("\n", len(text) // 2)
    return text[cut:], "../shared/data/wikitext-2/test.txt (second half)"


def _quick_texts(work: Path) -> tuple[Path, str, str]:
    """Calibration file and evaluation text for --quick: two different standard-library sources
    (always present, offline); the random model makes their content irrelevant beyond being text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib = work / "calib.txt"
    calib.write_text((stdlib / "argparse.py").read_text(encoding="utf-8")[:16_000], encoding="utf-8")
    return calib, (stdlib / "textwrap.py").read_text(encoding="utf-8"), "Python's textwrap.py"


class OnnxLogits:
    """An ONNX KV-cache graph as `module(input_ids, attention_mask) -> logits` (prefill from an empty cache).

    Lets `subfit_fx.evaluation.perplexity_and_accuracy` score the ONNX file itself, so the
    perplexity of each stage includes what fusion and quantization changed.

    Example:
        >>> from subfit_fx.runtime import OnnxCausalLM  # doctest: +SKIP
        >>> logits = OnnxLogits(OnnxCausalLM("model.onnx"))(ids, torch.ones_like(ids))  # doctest: +SKIP
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        logits, _ = self.lm.forward(input_ids.numpy(), attention_mask.numpy())
        return torch.from_numpy(logits)


def _shown(path: Path | str) -> str:
    """`path` relative to the repository (or its parent, for ../shared) so results carry no local prefix."""
    path = Path(path).resolve()
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return f"../{path.relative_to(REPO.parent)}" if path.is_relative_to(REPO.parent) else str(path)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(args: argparse.Namespace, dense: Any, compressed: Any) -> dict[str, dict[str, Any]]:
    """Export, fuse and quantize; each step validates its output (an exception stops the run)."""
    from subfit_fx.exporters import export_onnx_kv, optimize_onnx, quantize_int4, quantize_int8

    steps = {"fused.onnx": optimize_onnx, "fused.int8.onnx": quantize_int8, "fused.int4.onnx": quantize_int4}
    built: dict[str, dict[str, Any]] = {}
    for stage, model, suffix, parent in STAGES:
        if args.no_dense_quant and model == "dense" and "int" in suffix:
            continue
        path = args.work / f"{model}.{suffix}"
        t = time.perf_counter()
        if parent is None:
            result = export_onnx_kv(dense if model == "dense" else compressed, path, force=True)
        else:
            result = steps[suffix](built[parent]["path"], path, force=True)
        built[stage] = {"path": result.path, "bytes": result.bytes, "parity": result.parity.to_dict(),
                        "parity_summary": result.parity.summary(), "from": parent or "torch",
                        "fused_ops": result.details.get("fused_ops", {}), "build_s": time.perf_counter() - t}
        _log(f"{stage:18s} {result.bytes / 2**20:7.2f} MiB  {result.parity.summary()}")
    return built


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compress, build every stage, time and evaluate them all; returns the JSON-able result.

    Example:
        >>> result = run(parse_args(["--quick"]))  # doctest: +SKIP
        >>> [s["stage"] for s in result["stages"]][:2]  # doctest: +SKIP
        ['dense fp32', 'dense fused']
    """
    import torch
    import transformers

    import subfit_fx
    from subfit_fx.data import load_tokenizer, tokenize_text
    from subfit_fx.evaluation import perplexity_and_accuracy
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.models import resolve_model
    from subfit_fx.runtime import OnnxCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, args.threads))
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.quick and args.calib is None and args.eval is None:
        calib, text, text_source = _quick_texts(args.work)
    else:
        calib = args.calib or WIKITEXT / "valid.txt"
        text, text_source = eval_text(args.eval)

    dense = resolve_model(args.model)
    model_dir = None if args.model.startswith("builtin:") else args.model
    tokenizer = load_tokenizer(dense, model_dir)
    _log(f"compressing {args.model} to {args.sparsity:.0%} with SubFit on {calib}")
    t = time.perf_counter()
    compressed = subfit_fx.compress(dense, calib, sparsity=args.sparsity, samples=args.samples,
                                    seq_len=args.seq_len, tokenizer=tokenizer, progress=False)
    compress_s = time.perf_counter() - t
    built = _build(args, dense, compressed)
    runners = {stage: OnnxCausalLM(info["path"], threads=args.threads) for stage, info in built.items()}

    _log(f"timing {len(runners)} stages: prefill {args.length} tokens, decode at past {args.length}, "
         f"{args.repeats} interleaved repeats")
    prefill = interleaved({s: prefill_step(m, args.length) for s, m in runners.items()}, repeats=args.repeats)
    decode = interleaved({s: decode_step(m, args.length) for s, m in runners.items()}, repeats=args.repeats)

    ids = tokenize_text(text, tokenizer)[: args.eval_tokens]
    stages = []
    for stage, info in built.items():
        quality = perplexity_and_accuracy(OnnxLogits(runners[stage]), ids, args.window, progress=False)
        stages.append({
            "stage": stage, "model": stage.split()[0], "file": _shown(info["path"]), "bytes": info["bytes"],
            "prefill_ms": prefill[stage] * 1e3, "decode_ms": decode[stage] * 1e3,
            "kv_bytes_per_token": kv_bytes_per_token(runners[stage]),
            "cache_layers": runners[stage].layers_with_cache,
            "perplexity": quality["perplexity"], "next_token_accuracy": quality["next_token_accuracy"],
            "validated_against": info["from"], "parity": info["parity"], "parity_summary": info["parity_summary"],
            "fused_ops": info["fused_ops"], "build_s": round(info["build_s"], 2),
        })
        _log(f"{stage:18s} prefill {stages[-1]['prefill_ms']:.2f} ms, decode {stages[-1]['decode_ms']:.3f} ms, "
             f"ppl {quality['perplexity']:.3f}")
    report = compressed.report
    return {
        "model": _shown(args.model) if Path(args.model).exists() else args.model, "quick": args.quick,
        "calibration": _shown(calib), "evaluation": text_source,
        "settings": {"sparsity": args.sparsity, "samples": args.samples, "seq_len": args.seq_len,
                     "eval_tokens": int(ids.numel()), "window": args.window, "length": args.length,
                     "repeats": args.repeats, "threads": args.threads, "batch": 1},
        "compression": {"method": report.method, "sparsity_actual": report.sparsity_actual,
                        "replaced": report.replaced, "kv_fraction_kept": report.kv_fraction_kept,
                        "params_before": report.params_before, "params_after": report.params_after,
                        "compress_s": round(compress_s, 1)},
        "stages": stages,
        "seconds": round(time.time() - start, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    """The results table (sizes, latencies and perplexity also as ratios to dense fp32).

    Example:
        >>> row = {"stage": "dense fp32", "bytes": 2**20, "prefill_ms": 2.0, "decode_ms": 1.0,
        ...        "kv_bytes_per_token": 64, "perplexity": 10.0, "next_token_accuracy": 0.5, "parity_summary": "ok"}
        >>> r = {"model": "m", "evaluation": "t", "settings": {"length": 128, "window": 128, "eval_tokens": 100,
        ...      "repeats": 3, "threads": 1}, "compression": {"sparsity_actual": 0.25, "replaced": ["a"],
        ...      "kv_fraction_kept": 0.5}, "stages": [row]}
        >>> "| dense fp32 | 1.00 | 1.00x |" in markdown(r)
        True
    """
    s, c = result["settings"], result["compression"]
    base = next(r for r in result["stages"] if r["stage"] == "dense fp32")
    lines = [
        "# Pipeline: SubFit -> ONNX (KV cache) -> ONNX Runtime fusions -> int8 / int4", "",
        f"Model `{result['model']}`; SubFit at {c['sparsity_actual']:.1%} of block parameters "
        f"({len(c['replaced'])} branches replaced, {c['kv_fraction_kept']:.0%} of the KV cache kept). "
        "int8 and int4 are made from the fused file. Batch 1, "
        f"{s['threads']} ONNX Runtime thread(s), medians of {s['repeats']} interleaved runs over all stages; "
        f"perplexity of each ONNX file on {s['eval_tokens']:,} tokens of {result['evaluation']} in "
        f"non-overlapping windows of {s['window']}.", "",
        f"| stage | size MiB | size / dense | prefill {s['length']} ms | decode ms/token (past {s['length']}) "
        "| prefill speedup | decode speedup | KV B/token | perplexity | ppl / dense | next-token acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| {r['stage']} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base['bytes']:.2f}x | {r['prefill_ms']:.2f} | "
            f"{r['decode_ms']:.3f} | {base['prefill_ms'] / r['prefill_ms']:.2f}x | "
            f"{base['decode_ms'] / r['decode_ms']:.2f}x | {r['kv_bytes_per_token']:,} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] / base['perplexity']:.3f}x | {r['next_token_accuracy']:.3f} |")
    lines += ["", "Each file was checked against the one it was made from (fp32 against torch):", ""]
    lines += [f"- {r['stage']}: {r['parity_summary']}" for r in result["stages"]]
    return "\n".join(lines) + "\n"


def _write(result: dict[str, Any], out: Path, command: str | None) -> tuple[Path, Path]:
    """Write OUT.json / OUT.md through benchmarks/_common.write_results (command and machine added)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    results_dir = _common.RESULTS
    # write_results writes under its module-level RESULTS (docs/results); point it at --out's folder
    _common.RESULTS = out.parent
    try:
        data = {"command": command, **result} if command else result
        return _common.write_results(out.name, data, markdown(result))
    finally:
        _common.RESULTS = results_dir


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline and write OUT.json and OUT.md; returns the exit code.

    Example:
        >>> main(["--quick", "--out", "/tmp/pipeline"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    result = run(args)
    # Called from Python (tests), sys.argv is the caller's: record the arguments given instead.
    command = None if argv is None else " ".join(["python", "examples/pipeline.py", *argv])
    json_path, md_path = _write(result, args.out, command)
    print(markdown(result))
    _log(f"wrote {json_path} and {md_path}")
    bad = [r["stage"] for r in result["stages"]
           if not all(math.isfinite(r[k]) for k in ("prefill_ms", "decode_ms", "perplexity"))]
    if bad:
        _log(f"non-finite numbers for {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
