"""GPU: compress a 1B-class random-init Llama on CUDA, export it to ONNX, time it on ONNX Runtime's CUDA provider.

The model has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 / 8 heads, FFN 8192, vocabulary
128256, tied embeddings; 1.24B parameters), built from a config with random weights: no download.
It runs in bfloat16 (or --dtype float16) on the GPU for calibration (16 sequences of 512 random
tokens by default) and SubFit's output judge; statistics and fits are float64. Dense and
compressed models are then exported as KV-cache ONNX graphs (float32: the exporter upcasts a
low-precision model exactly, docs/deploy.md "Precision") and timed interleaved on
CUDAExecutionProvider: prefill at each length from an empty cache (the logits of every position
come back to the host, as the runner returns them) and one decode step at that past length (the
cache stays on the GPU), medians of --repeats runs. Before the export, prefill is also timed in
torch on the GPU (the Hugging Face model vs the compressed program, in the model's dtype). Also
recorded: calibration wall time and peak GPU memory, the recipe, file sizes and KV-cache bytes
per token.

Fails at once, with one line and exit code 2, when there is no CUDA GPU or when ONNX Runtime has
no CUDA provider (pip install onnxruntime-gpu). `--device cpu --tiny` runs the same steps on a
2-layer, hidden-64 model on the CPU in seconds (the smoke check the test suite runs).

Writes <out>.json and <out>.md (default docs/results/gpu; with --tiny a scratch path) with the
exact command.

Example:
    .venv/bin/python benchmarks/gpu.py                                      # on a GPU machine
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from _common import RESULTS, command_line, machine  # benchmarks/ is on sys.path when run as a script

from subfit_fx.devices import dtype_name, resolve_device, resolve_dtype
from subfit_fx.errors import SubfitError
from subfit_fx.methods import DEFAULT_METHOD

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 4096,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="precision of the model in torch (default bfloat16)")
    p.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 model: a smoke run in seconds")
    p.add_argument("--sparsity", type=float, default=0.25, help="target sparsity (default 0.25)")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"compression method (default {DEFAULT_METHOD}, the "
                                                             "library's default)")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (512; tiny 32)")
    p.add_argument("--lengths", default=None, help="prefill / past lengths (default 128,512,2048; tiny 16)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed runs (default 10; tiny 2)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default=None,
                   help="ONNX Runtime provider (default: cuda for a cuda --device, else cpu)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory for the ONNX files (default: temporary)")
    p.add_argument("--out", type=Path, default=None, help="results path prefix (default docs/results/gpu; tiny: "
                                                          "inside --work)")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    args.lengths = [int(v) for v in (args.lengths or ("16" if args.tiny else "128,512,2048")).split(",")]
    args.repeats = args.repeats or (2 if args.tiny else 10)
    return args


def _fail(message: str) -> int:
    print(f"benchmarks/gpu.py: error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str]]:
    """Everything that can fail in seconds, before the model is built."""
    from subfit_fx.runtime import providers_for

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SubfitError(f"--device {args.device}: no CUDA GPU here (torch {torch.__version__}, "
                          f"cuda {torch.version.cuda}); run on a GPU machine, or pass --device cpu --tiny for a "
                          "smoke run")
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.tiny:
        raise SubfitError("a 1B-parameter model on the CPU takes hours; pass --tiny with --device cpu, or run on a GPU")
    providers = providers_for(args.provider or ("cuda" if device.type == "cuda" else "cpu"))
    return device, resolve_dtype(args.dtype), providers


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = tf.LlamaConfig(**(TINY if args.tiny else LLAMA_1B), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: no 5 GB float32 detour through the host
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(paths: dict[str, Path], providers: list[str], lengths: list[int], repeats: int) -> dict[str, Any]:
    from subfit_fx.exporters.artifacts import model_bytes
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.runtime import OnnxCausalLM

    models = {name: OnnxCausalLM(p, providers=providers) for name, p in paths.items()}
    rows = []
    for n in lengths:
        stages = (("prefill", lambda m, s=n: prefill_step(m, s)), ("decode", lambda m, s=n: decode_step(m, s)))
        for stage, make in stages:
            times = interleaved({name: make(m) for name, m in models.items()}, repeats=repeats)
            rows.append({"stage": stage, "seq": n, "dense_ms": times["dense"] * 1e3,
                         "compressed_ms": times["compressed"] * 1e3, "speedup": times["dense"] / times["compressed"]})
            print(f"onnx {stage} {n}: dense {rows[-1]['dense_ms']:.2f} ms, compressed {rows[-1]['compressed_ms']:.2f} "
                  f"ms, {rows[-1]['speedup']:.2f}x", file=sys.stderr)
    return {"provider": models["dense"].session.get_providers()[0], "rows": rows,
            "bytes": {name: model_bytes(p) for name, p in paths.items()},
            "kv_bytes_per_token": {name: kv_bytes_per_token(m) for name, m in models.items()}}


def _torch_bench(model: torch.nn.Module, compressed: torch.nn.Module, device: torch.device, lengths: list[int],
                 repeats: int) -> list[dict[str, Any]]:
    """Prefill forwards in torch where the model runs (its dtype, no KV cache): the Hugging Face
    model, the dense captured program and the compressed program, interleaved medians, each timed
    call synchronized. The speedup is dense program / compressed program: both run through the same
    graph-module wrapper, which on a GPU at these sizes costs more than the Hugging Face model's eager
    forward (launch-bound: session 20 measured 12.2 ms vs 10.0 ms at 128 tokens on an H200)."""
    from subfit_fx import capture
    from subfit_fx.exporters.bench import interleaved

    example = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    dense = capture(model, (example, torch.ones_like(example))).module()

    def timed(fn: Any) -> Any:
        def step() -> None:
            with torch.no_grad():
                fn()
            _sync(device)
        return step

    rows = []
    for n in lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        mask = torch.ones_like(ids)
        fns = {"hf": lambda i=ids, m=mask: model(input_ids=i, attention_mask=m, use_cache=False),
               "dense": lambda i=ids, m=mask: dense(i, m), "compressed": lambda i=ids, m=mask: compressed(i, m)}
        times = interleaved({name: timed(fn) for name, fn in fns.items()}, repeats=repeats)
        rows.append({"stage": "prefill", "seq": n, "hf_ms": times["hf"] * 1e3, "dense_ms": times["dense"] * 1e3,
                     "compressed_ms": times["compressed"] * 1e3, "speedup": times["dense"] / times["compressed"]})
    return rows


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, providers: list[str],
        work: Path) -> dict[str, Any]:
    """Build, compress, export and time; returns the results (without the command and machine)."""
    from subfit_fx.compress import compress
    from subfit_fx.exporters import export_onnx_kv

    model = _model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    c = compress(model, calib, args.sparsity, args.method, progress=False, batch_size=4)
    _sync(device)
    compress_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(f"compressed in {compress_s:.1f} s: {c.report.sparsity_actual:.2%} of block parameters, "
          f"{len(c.report.replaced)} branches replaced", file=sys.stderr)
    torch_rows = _torch_bench(model, c.module(), device, args.lengths, args.repeats)
    print("torch prefill speedups: " + ", ".join(f"{r['seq']}: {r['speedup']:.2f}x" for r in torch_rows),
          file=sys.stderr)
    paths = {"dense": work / "dense.onnx", "compressed": work / "compressed.onnx"}
    start = time.perf_counter()
    export_onnx_kv(model, paths["dense"], force=True)
    export_onnx_kv(c, paths["compressed"], force=True)
    export_s = time.perf_counter() - start
    print(f"exported both KV-cache graphs in {export_s:.0f} s", file=sys.stderr)
    del model, c.base_model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # ONNX Runtime allocates its own GPU memory next
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"model": {"shape": "tiny" if args.tiny else "Llama-3.2-1B", "params": params, "dtype": dtype_name(dtype),
                      "device": str(device), "gpu": gpu},
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "method": args.method,
                            "ran": c.recipe.method, "notes": list(c.report.notes),
                            "seconds": compress_s, "peak_gpu_bytes": peak},
            "compressed": {"sparsity_target": args.sparsity, "sparsity_actual": c.report.sparsity_actual,
                           "replaced": list(c.report.replaced), "params_before": c.report.params_before,
                           "slimmed": [b["label"] for b in c.report.branches if b.get("form") == "slim"],
                           "params_after": c.report.params_after, "kv_fraction_kept": c.report.kv_fraction_kept},
            "torch_rows": torch_rows, "export_seconds": export_s, "onnx_dtype": "float32",
            **_bench(paths, providers, args.lengths, args.repeats)}


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    m, cal, comp = result["model"], result["calibration"], result["compressed"]
    peak = f"{cal['peak_gpu_bytes'] / 2**30:.1f} GiB" if cal["peak_gpu_bytes"] else "n/a (CPU)"
    slim = comp.get("slimmed", [])
    ran = f" (ran `{cal['ran']}`)" if cal.get("ran", cal["method"]) != cal["method"] else ""
    lines = [
        f"# GPU: {m['shape']} ({m['params']:,} parameters, random init), {m['dtype']} on {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else ""), "",
        f"Method `{cal['method']}`{ran} at {comp['sparsity_target']:.0%}: {comp['sparsity_actual']:.2%} of block "
        f"parameters removed ({len(comp['replaced']) - len(slim)} branches replaced, {len(slim)} slimmed), "
        f"parameters {comp['params_before']:,} -> "
        f"{comp['params_after']:,}, KV cache kept {comp['kv_fraction_kept']:.0%}.", "",
        f"Calibration and judging: {cal['samples']} sequences of {cal['seq_len']} tokens, {cal['seconds']:.1f} s, "
        f"peak GPU memory {peak}. Export of both KV-cache graphs ({result['onnx_dtype']}): "
        f"{result['export_seconds']:.0f} s.", "",
        f"ONNX Runtime on {result['provider']}, batch 1, medians of interleaved runs:", "",
        "| stage | tokens | dense ms | compressed ms | speedup |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['stage']} | {r['seq']} | {r['dense_ms']:.2f} | {r['compressed_ms']:.2f} | {r['speedup']:.2f}x |"
              for r in result["rows"]]
    lines += ["", f"PyTorch {m['dtype']} on {m['device']}, prefill without a cache, medians of interleaved runs "
              "(speedup: dense captured program / compressed program; the Hugging Face model's eager forward "
              "for reference):", "",
              "| tokens | Hugging Face ms | dense program ms | compressed ms | speedup |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['seq']} | {_ms(r.get('hf_ms'))} | {r['dense_ms']:.2f} | {r['compressed_ms']:.2f} | "
              f"{r['speedup']:.2f}x |" for r in result["torch_rows"]]
    size, kv = result["bytes"], result["kv_bytes_per_token"]
    lines += ["", f"File size: dense {size['dense'] / 2**20:,.0f} MiB, compressed "
              f"{size['compressed'] / 2**20:,.0f} MiB. KV cache per token: dense {kv['dense']:,} B, "
              f"compressed {kv['compressed']:,} B."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 (one line) when this machine cannot run it."""
    args = _parse(argv)
    try:
        device, dtype, providers = _check(args)
    except SubfitError as exc:
        return _fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="subfit-gpu-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, device, dtype, providers, work)
        out = args.out or (work / "gpu-smoke" if args.tiny else RESULTS / "gpu")
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"command": command_line(), "machine": machine(), **result}
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(f"{markdown(result)}\n\nCommand: `{data['command']}`  \n"
                                          f"Machine: {data['machine']}\n")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
