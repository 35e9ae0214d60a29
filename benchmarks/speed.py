"""Speed of a compressed model against its dense original in ONNX Runtime (CPU).

Both go through the same pipeline: KV-cache ONNX export (validated against torch), then ONNX
Runtime fusions (validated). Measured, as medians of interleaved runs (dense, compressed, dense,
...) at batch 1: prefill latency for prompts of 128/512/2048 tokens (from an empty cache), decode
latency per token at past lengths 128/512/2048, KV-cache bytes per token and ONNX file size. Each
speedup stands next to the work reduction it can be read against - dense / compressed FLOPs for
prefill (matmul weights plus the attention score and mix products of the attention layers left),
bytes moved for decode (all matmul weights plus the KV cache read at that past length). These are
reductions, not bounds: per-layer fixed costs (attention ops, norms, kernel launches) are in
neither, and a method that removes whole attention branches saves those too (on SmolLM2 the
decode speedup exceeded the bytes ratio).

Writes <out>.json and <out>.md (default docs/results/speed) with the exact command.

Example:
    .venv/bin/python benchmarks/speed.py --model .cache/reference --compressed out/reference-25
    .venv/bin/python benchmarks/speed.py --quick   # tiny built-in model, seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
import transformers
from _common import command_line, machine  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO.parent / "shared/data/wikitext-2/valid.txt"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="dense model: a Hugging Face directory or builtin:ARCH (default .cache/reference; "
                        "builtin:llama with --quick)")
    p.add_argument("--compressed", type=Path, help="compressed directory (from 'subfit-fx compress'); "
                                                   "default: compress --model here")
    p.add_argument("--sparsity", type=float, default=0.25, help="sparsity when compressing here (0.25)")
    p.add_argument("--calib", type=Path, default=CALIB, help="calibration text when compressing here")
    p.add_argument("--lengths", default=None, help="prompt / past lengths (default 128,512,2048; "
                                                   "16,32,64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved runs (default 10; 3 quick)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--no-optimize", action="store_true", help="skip the ONNX Runtime fusions")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset of the export (default 23)")
    p.add_argument("--work", type=Path, default=REPO / ".cache/speed", help="folder for the ONNX files")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default docs/results/speed; .cache/speed/speed-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny built-in model and short lengths: a smoke run")
    args = p.parse_args(argv)
    args.model = args.model or ("builtin:llama" if args.quick else str(REPO / ".cache/reference"))
    args.lengths = [int(v) for v in (args.lengths or ("16,32,64" if args.quick else "128,512,2048")).split(",")]
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.out = args.out or (args.work / "speed-quick" if args.quick else REPO / "docs/results/speed")
    return args


def _compressed(args: argparse.Namespace, model: torch.nn.Module) -> Any:
    from subfit_fx import compress, load

    if args.compressed is not None:
        return load(args.compressed, model=model)
    if args.model.startswith("builtin:") or not args.calib.is_file():
        # a random built-in model has no tokenizer worth calibrating with: random tokens do
        why = "built-in model" if args.model.startswith("builtin:") else f"no text at {args.calib}"
        print(f"compressing with random calibration tokens ({why})", file=sys.stderr)
        calib = torch.randint(3, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
        return compress(model, calib, sparsity=args.sparsity, method="subfit", progress=False)
    return compress(args.model, args.calib, sparsity=args.sparsity, method="subfit", progress=False)


def _export(name: str, source: Any, args: argparse.Namespace) -> dict[str, Any]:
    from subfit_fx.exporters.kv_cache import export_onnx_kv
    from subfit_fx.exporters.postprocess import optimize_onnx

    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.work / f"{name}.onnx"
    exported = export_onnx_kv(source, raw, force=True, opset=args.opset)
    info = {"export": exported.parity.to_dict(), "raw_file": str(raw), "cache_layers": exported.details}
    final = raw
    if not args.no_optimize:
        fused = optimize_onnx(raw, args.work / f"{name}.opt.onnx", force=True)
        info["optimize"] = {**fused.parity.to_dict(), "fused_ops": fused.details["fused_ops"]}
        final = fused.path
    info["file"] = str(final)
    return info


def _flops(weights: int, attn_layers: int, q_width: int, seq: int) -> float:
    # per token 2 FLOPs per matmul weight; per attention layer QK^T and PV over the full square
    return 2.0 * seq * weights + attn_layers * 4.0 * seq * seq * q_width


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, args.threads))
    from subfit_fx.exporters.artifacts import model_bytes
    from subfit_fx.exporters.bench import (
        decode_step,
        interleaved,
        kv_bytes_per_token,
        matmul_weight_params,
        prefill_step,
    )
    from subfit_fx.models import resolve_model
    from subfit_fx.runtime import OnnxCausalLM

    command = command_line() if argv is None else " ".join(["python", "benchmarks/speed.py", *argv])
    start = time.time()
    dense_model = resolve_model(args.model)
    compressed = _compressed(args, dense_model)
    files = {"dense": _export("dense", dense_model, args), "compressed": _export("compressed", compressed, args)}
    models = {name: OnnxCausalLM(info["file"], threads=args.threads) for name, info in files.items()}

    config = dense_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    weights = {name: matmul_weight_params(info["raw_file"]) for name, info in files.items()}
    weight_uses = {name: matmul_weight_params(info["raw_file"], per_use=True) for name, info in files.items()}
    attn = {name: len(m.layers_with_cache) for name, m in models.items()}
    kvb = {name: kv_bytes_per_token(m) for name, m in models.items()}
    rows = []
    for seq in args.lengths:
        t = interleaved({n: prefill_step(m, seq) for n, m in models.items()}, repeats=args.repeats)
        flops = {n: _flops(weight_uses[n], attn[n], q_width, seq) for n in models}
        rows.append({"stage": "prefill", "tokens": seq, "dense_ms": t["dense"] * 1e3,
                     "compressed_ms": t["compressed"] * 1e3, "speedup": t["dense"] / t["compressed"],
                     "reduction": flops["dense"] / flops["compressed"], "reduction_of": "FLOPs"})
    for past in args.lengths:
        t = interleaved({n: decode_step(m, past) for n, m in models.items()}, repeats=args.repeats)
        moved = {n: 4 * weights[n] + past * kvb[n] for n in models}  # fp32 weights + cache read
        rows.append({"stage": "decode", "tokens": past, "dense_ms": t["dense"] * 1e3,
                     "compressed_ms": t["compressed"] * 1e3, "speedup": t["dense"] / t["compressed"],
                     "reduction": moved["dense"] / moved["compressed"],
                     "reduction_of": "bytes moved"})
    report = compressed.report
    result = {
        "command": command,
        "model": args.model,
        "compressed": str(args.compressed) if args.compressed else f"compressed here, sparsity {args.sparsity}",
        "replaced": [list(r.labels) for r in compressed.recipe.replacements],
        "sparsity_actual": getattr(report, "sparsity_actual", None),
        "threads": args.threads, "repeats": args.repeats, "batch": 1, "opset": args.opset,
        "rows": rows,
        "kv_bytes_per_token": kvb,
        "attention_layers": attn,
        "matmul_weights": weights,
        "matmul_weight_uses": weight_uses,
        "file_bytes": {n: model_bytes(info["file"]) for n, info in files.items()},
        "validation": files,
        "versions": {"transformers": transformers.__version__, "onnxruntime": ort.__version__},
        "machine": machine(), "seconds": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Speed: dense vs compressed (ONNX Runtime CPU)", "",
        f"Command: `{r['command']}`", "",
        f"Model `{r['model']}`; compressed: {r['compressed']}; {len(r['replaced'])} branches replaced"
        + (f", sparsity {r['sparsity_actual']:.1%}" if r.get("sparsity_actual") is not None else "") + ".",
        f"Batch 1, {r['threads']} thread(s), medians of {r['repeats']} interleaved runs; "
        f"both exported with KV cache (opset {r.get('opset', 20)}) and fused by the same pipeline.", "",
        "| stage | tokens | dense ms | compressed ms | speedup | work reduction (not a bound) | of |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        label = "prompt" if row["stage"] == "prefill" else "past"
        lines.append(f"| {row['stage']} | {label} {row['tokens']} | {row['dense_ms']:.2f} | "
                     f"{row['compressed_ms']:.2f} | {row['speedup']:.2f}x | {row['reduction']:.2f}x | "
                     f"{row['reduction_of']} |")
    kv, size, attn = r["kv_bytes_per_token"], r["file_bytes"], r["attention_layers"]
    lines += ["",
              f"KV cache per token: dense {kv['dense']:,} B, compressed {kv['compressed']:,} B "
              f"({attn['dense']} vs {attn['compressed']} attention layers with a cache).",
              f"ONNX file size: dense {size['dense'] / 2**20:.2f} MiB, compressed "
              f"{size['compressed'] / 2**20:.2f} MiB.", "",
              "Prefill reduction: dense / compressed FLOPs (2 per matmul weight use per token - a shared "
              "bypass basis counts once per layer that uses it, the tied lm_head counts - plus 4 x seq^2 x "
              "query width per attention layer). Decode reduction: dense / compressed bytes moved per token "
              "(fp32 matmul weights, each read once, plus the KV cache read at that past length). "
              "Neither is a bound: per-layer fixed costs are in neither.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
