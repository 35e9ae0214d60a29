"""Quality against speed: every method's SmolLM2 at one sparsity, through ONNX Runtime on CPU.

Each method compresses SmolLM2-135M-Instruct exactly as benchmarks/quality.py does (same
calibration batches, same budget), is exported with KV cache and validated against torch
(`subfit_fx.exporters.validate`: relative max |diff| and KL), and is timed against the dense export
in one interleaved run (dense, subfit, shortgpt, ..., dense, ...; medians) at batch 1: prefill of a
512-token prompt from an empty cache, and one decode step at past 512. Quality comes from
docs/results/quality.json (the same compressions, evaluated there), so run quality.py first.

Two phases, so the slow, untimed part can share the machine and the timed part need not:
`--phase prepare` compresses and exports (cached under $SUBFIT_FX_CACHE/quality_speed; a rerun
reuses the files), `--phase measure` times them; the default runs both.

    python benchmarks/quality_speed.py [--methods subfit shortgpt ...] [--sparsity 0.25] [--recipes DIR]

Writes docs/results/quality_speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from quality import compressed, one_sparsity_parser, setup

from subfit_fx.exporters.artifacts import model_bytes
from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, matmul_weight_params, prefill_step
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.gguf import cache_root
from subfit_fx.runtime import OnnxCausalLM

parser = one_sparsity_parser(__doc__.splitlines()[0])
parser.add_argument("--prompt", type=int, default=512, help="prefill length")
parser.add_argument("--past", type=int, default=512, help="past length of the timed decode step")
parser.add_argument("--repeats", type=int, default=7, help="timed interleaved runs")
parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
parser.add_argument("--phase", choices=("all", "prepare", "measure"), default="all")
parser.add_argument("--quality", type=Path, default=RESULTS / "quality.json", help="quality results to join")
parser.add_argument("--name", default="quality_speed", help="results file stem under docs/results")
parser.add_argument("--recipes", type=Path, default=None,
                    help="load a method's compressed model from DIR/<spec> where an earlier run (this script, "
                         "quality.py or choice_paired.py --recipes) saved one, same calibration, instead of "
                         "compressing it again; new ones are saved there")


def _slug(spec: str, sparsity: float) -> str:
    return f"{spec.replace(':', '_').replace('=', '-').replace(',', '_')}-{round(1000 * sparsity)}"


def prepare(args: argparse.Namespace, work: Path) -> None:
    """Compress each method and export dense and compressed models with KV cache (skips finished ones)."""
    args.split = "test"
    _, model, _, _, calib, _ = setup(args, "test")
    dense_info = work / "dense.json"
    if not dense_info.is_file():
        result = export_onnx_kv(model, work / "dense.onnx", force=True)
        dense_info.write_text(json.dumps({"method": "dense", "file": str(result.path),
                                          "parity": result.parity.to_dict(), "sparsity_actual": 0.0}))
    for spec in args.methods:
        info_path = work / f"{_slug(spec, args.sparsity)}.json"
        if info_path.is_file():
            continue
        c, compress_s = compressed(args.recipes, spec, model, calib, args.sparsity)
        onnx_path = work / f"{_slug(spec, args.sparsity)}.onnx"
        t = time.perf_counter()
        result = export_onnx_kv(c, onnx_path, force=True)
        info = {"method": spec, "file": str(result.path), "parity": result.parity.to_dict(),
                "sparsity_actual": c.report.sparsity_actual, "replaced": c.report.replaced,
                "compress_s": compress_s, "export_s": time.perf_counter() - t}
        info_path.write_text(json.dumps(info))
        print(f"{spec}: exported, {result.parity.summary()}", flush=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Time every prepared model against the dense one in one interleaved run."""
    infos = {"dense": json.loads((work / "dense.json").read_text())}
    for spec in args.methods:
        infos[spec] = json.loads((work / f"{_slug(spec, args.sparsity)}.json").read_text())
    models = {name: OnnxCausalLM(info["file"], threads=args.threads) for name, info in infos.items()}
    prefill = interleaved({n: prefill_step(m, args.prompt) for n, m in models.items()}, repeats=args.repeats)
    decode = interleaved({n: decode_step(m, args.past) for n, m in models.items()}, repeats=args.repeats)
    quality = {}
    if args.quality.is_file():
        q = json.loads(args.quality.read_text())
        quality = {r["method"]: r | {"dense": q["dense"]} for r in q["rows"] if r["sparsity_target"] == args.sparsity}
    weights = {name: matmul_weight_params(info["file"]) for name, info in infos.items()}
    uses = {name: matmul_weight_params(info["file"], per_use=True) for name, info in infos.items()}
    kvb = {name: kv_bytes_per_token(m) for name, m in models.items()}
    rows = []
    for name, info in infos.items():
        # reductions the timings can be read against (not bounds: per-layer fixed costs are not in them)
        bytes_ratio = (4 * weights["dense"] + args.past * kvb["dense"]) / (4 * weights[name] + args.past * kvb[name])
        row = {"method": name, "sparsity_actual": info["sparsity_actual"],
               "matmul_weights": weights[name], "weight_flops_ratio": uses["dense"] / uses[name],
               "decode_bytes_ratio": bytes_ratio,
               "prefill_ms": 1e3 * prefill[name], "decode_ms": 1e3 * decode[name],
               "prefill_speedup": prefill["dense"] / prefill[name], "decode_speedup": decode["dense"] / decode[name],
               "kv_bytes_per_token": kvb[name], "file_bytes": model_bytes(info["file"]),
               "parity": info["parity"]}
        qrow = quality.get(name)
        if qrow is not None:
            same = sorted(qrow["replaced"]) == sorted(info.get("replaced", []))
            row |= {"perplexity_ratio": qrow["perplexity"] / qrow["dense"]["perplexity"],
                    "choice_accuracy": qrow["choice_accuracy"], "same_selection_as_quality_run": same}
        rows.append(row)
    return {"rows": rows, "prompt": args.prompt, "past": args.past, "repeats": args.repeats,
            "threads": args.threads, "sparsity_target": args.sparsity,
            "versions": {"transformers": transformers.__version__, "onnxruntime": ort.__version__}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for r in rows:
        if "perplexity_ratio" not in r:
            continue
        ax.scatter(r["decode_speedup"], r["perplexity_ratio"], s=60 if r["method"] == "subfit" else 30)
        ax.annotate(r["method"], (r["decode_speedup"], r["perplexity_ratio"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("decode speedup at past 512 (ONNX Runtime CPU, 1 thread)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("SmolLM2-135M-Instruct at 25 %: quality against speed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict[str, Any], png: str) -> str:
    lines = [
        f"# Quality against speed at {100 * result['sparsity_target']:g} % (SmolLM2-135M-Instruct, ONNX Runtime CPU)",
        "",
        f"Every model exported with KV cache (opset 23, no fusion pass) and validated against torch; timed at "
        f"batch 1, {result['threads']} thread(s), medians of {result['repeats']} interleaved runs of all models "
        f"in one process (so each speedup is a ratio within one run). Prefill: {result['prompt']}-token prompt "
        f"from an empty cache. Decode: one token at past {result['past']}. Quality from "
        "[quality.md](quality.md) (same compressions; wikitext-2 test half).", "",
        "| method | actual sparsity | perplexity / dense | choice acc. | prefill speedup (matmul FLOPs ratio) "
        "| decode speedup (bytes ratio) | KV bytes / token | file MiB | export parity (relative diff, KL) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        p = r["parity"]
        dense = "1.00x" if r["method"] == "dense" else ""
        ppl = f"{r['perplexity_ratio']:.2f}x" if "perplexity_ratio" in r else dense
        choice = f"{r['choice_accuracy']:.3f}" if "choice_accuracy" in r else ""
        lines.append(f"| {r['method']} | {100 * r['sparsity_actual']:.1f} % | {ppl} | {choice} | "
                     f"{r['prefill_speedup']:.2f}x ({r['weight_flops_ratio']:.2f}x; {r['prefill_ms']:.0f} ms) | "
                     f"{r['decode_speedup']:.2f}x ({r['decode_bytes_ratio']:.2f}x; {r['decode_ms']:.1f} ms) | "
                     f"{r['kv_bytes_per_token']:,} | "
                     f"{r['file_bytes'] / 2**20:.0f} | {p['relative_diff']:.1e}, {p['kl'] or 0:.1e} "
                     f"({'pass' if p['passed'] else 'FAIL'}) |")
    mismatched = [r["method"] for r in result["rows"] if r.get("same_selection_as_quality_run") is False]
    if mismatched:
        lines += ["", f"Note: {', '.join(mismatched)} selected other branches here than in the quality run."]
    lines += ["", "In brackets: the reduction the timing can be read against, not a bound - matmul weight "
              "FLOPs per token (dense / compressed; attention score products left out) for prefill, and "
              "bytes read per decode step (float32 matmul weights once, plus the KV cache at that past "
              "length) for decode. Per-layer fixed costs (kernel launches, attention ops, norms) are in "
              "neither, so removing whole attention branches or layers can beat them.", "",
              f"![perplexity ratio against decode speedup]({png})", ""]
    return "\n".join(lines)


def main() -> None:
    args = parser.parse_args()
    work = cache_root() / "quality_speed"
    work.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(work).free < 6 * 2**30:
        sys.exit(f"error: less than 6 GiB free under {work}; the ONNX files need about 0.5 GiB per method")
    if args.phase in ("all", "prepare"):
        prepare(args, work)
    if args.phase in ("all", "measure"):
        torch.set_num_threads(max(1, args.threads))
        result = measure(args, work)
        png = RESULTS / f"{args.name}.png"
        plot(result["rows"], png)
        md = markdown(result, png.name)
        write_results(args.name, result, md)
        print(md)


if __name__ == "__main__":
    main()
