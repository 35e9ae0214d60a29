"""Scale: memory and time of calibration for the basic and the layer-wise pipelines on 1B-class models.

The model has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 / 8 heads, FFN 8192, vocabulary
128256, tied embeddings; 1.24B parameters) with random weights in bfloat16 (`--shape 3b`: the
3B shape, 28 layers, hidden 3072, FFN 8192, 24 / 8 heads), built from a config: no download.
Each measurement runs in its own process, so peak memory is its own: the model is built and
captured, then one phase runs while a sampler thread reads the process's resident memory
(VmRSS) every 5 ms:

- `forward`: one plain forward of the calibration batches through the captured graph;
- `basic`: `Session.calibrate` with the basic pipeline (every branch's statistics at once);
- `layerwise`: the same statistics with the layer-wise pipeline (`--pipeline sequential
  --offload DIR`: one segment per layer, each run once, the values crossing each cut cached for
  every batch, each layer's statistics written to DIR and memory-mapped back when done).

Reported per phase: wall time, peak RSS during the phase, and the RSS before it (the resident
model); plus the parts of issue 16's memory bound computed from the model (one layer's weights,
one layer's statistics, the cached activations, the embedding) and whether the layer-wise
statistics equal the basic ones (`equal` phase, on the first two batches, max relative
difference). The weights of every layer stay resident in this version (no weight offload), which
the bound does not allow for: the table says so.

Writes docs/results/scale.{json,md} with the exact command (`--tiny`: a 2-layer hidden-64 smoke
run into a scratch path).

Example:
    .venv/bin/python benchmarks/scale.py                       # 1B shape, ~10 min on 2 cores
    .venv/bin/python benchmarks/scale.py --tiny --out /tmp/scale-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from _common import RESULTS, command_line, machine, run_child  # benchmarks/ is on sys.path when run as a script

SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128},
}
PHASES = ("forward", "basic", "layerwise", "offload", "equal")
# Published shapes for the memory plan (config.json of each checkpoint): d, layers, FFN, heads, kv heads, vocab
PLAN = {"Llama-2-7B": (4096, 32, 11008, 32, 32, 32000), "Llama-3.1-8B": (4096, 32, 14336, 32, 8, 128256),
        "Llama-2-13B": (5120, 40, 13824, 40, 40, 32000), "Llama-3.1-70B": (8192, 80, 28672, 64, 8, 128256)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _model(shape: str, dtype: torch.dtype, device: str = "cpu") -> Any:
    config = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: no float32 detour through the host
        return tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def _setup(shape: str, dtype: torch.dtype, samples: int, seq_len: int,
           empty_from: Path | None = None, device: str = "cpu") -> tuple[Any, list, Any]:
    """The captured model (with `empty_from`: built from that checkpoint's config with no weight
    in memory, and its `OffloadedWeights`) and the calibration batches."""
    from subfit_fx import capture
    from subfit_fx.offload import OffloadedWeights, empty_model

    model = empty_model(empty_from, dtype) if empty_from is not None else _model(shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (samples, seq_len), generator=g).to(device)
    batches = [(ids[i:i + 4], torch.ones_like(ids[i:i + 4])) for i in range(0, samples, 4)]
    ep = capture(model, (batches[0][0], batches[0][1]))
    weights = OffloadedWeights(empty_from, model) if empty_from is not None else None
    del model  # the captured program holds the weights
    return ep, batches, weights


def _float64_gemm_rate(d: int, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of the statistics' update GEMM on this machine: (d+1, 256) @ (256, 2d+1) in float64
    (the Gram of [z, 1] and its cross product with the branch output, one 256-row chunk)."""
    a = torch.randn(d + 1, 256, dtype=torch.float64, device=device)
    b = torch.randn(256, 2 * d + 1, dtype=torch.float64, device=device)
    c = torch.zeros(d + 1, 2 * d + 1, dtype=torch.float64, device=device)
    c.addmm_(a, b)  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        c.addmm_(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * (d + 1) * 256 * (2 * d + 1) / sorted(times)[len(times) // 2]


def _max_relative_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for label, s in a.items():
        for key, t in s.tensors().items():
            other = b[label].tensors()[key]
            worst = max(worst, float((t - other).abs().max() / t.abs().max().clamp_min(1e-300)))
    return worst


def child(phase: str, shape: str, dtype_name: str, samples: int, seq_len: int, weights: Path,
          device: str = "cpu") -> dict[str, Any]:
    """One phase in this process; returns its measurements. `weights`: the model's checkpoint
    directory (written by the `save` phase), read by weight offload. On a GPU `device` the model,
    batches and statistics live there, and the peak of GPU memory allocated is recorded too."""
    from subfit_fx import find_branches
    from subfit_fx.calibrate import Session
    from subfit_fx.pipelines import LayerByLayer, stats_nbytes

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    if phase == "save":
        _model(shape, dtype).save_pretrained(weights)
        return {"phase": phase}
    out: dict[str, Any] = {"phase": phase, "rss_start": _rss()}  # interpreter and libraries, no model yet
    ep, batches, source = _setup(shape, dtype, samples, seq_len, weights if phase == "offload" else None, device)
    branches = find_branches(ep)
    if device != "cpu":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["gpu_before"] = torch.cuda.memory_allocated(device)
    if phase == "forward":
        module = ep.module()
        with torch.no_grad():
            module(*batches[0])  # warm-up outside the measurement, as the sessions' first batch is not
        with PeakRSS() as mem:
            start = time.perf_counter()
            with torch.no_grad():
                for ids, mask in batches:
                    module(ids, mask)
                _sync(device)
            out["seconds"] = time.perf_counter() - start
        out["float64_gemm_flops"] = _float64_gemm_rate(SHAPES[shape]["hidden_size"], device=device)
    elif phase in ("basic", "layerwise", "offload"):
        with tempfile.TemporaryDirectory() as scratch:
            # layer-wise as meant for big models: each layer's statistics offloaded to disk when done;
            # "offload": the weights too, each segment's read from the checkpoint while it runs
            pipeline = LayerByLayer(offload=scratch) if phase != "basic" else None
            session = Session(ep, branches, progress=False, pipeline=pipeline, weights=source)
            with PeakRSS() as mem:
                start = time.perf_counter()
                stats = session.calibrate(batches, desc=None)
                _sync(device)
                out["seconds"] = time.perf_counter() - start
            out["stats_bytes"] = stats_nbytes(stats)
            if source is not None:
                out["weight_bytes_read"] = source.bytes_read
            del stats, session
    else:  # equal: layer-wise (resident and offloaded weights) vs basic statistics on two batches
        few = batches[:2]
        basic = Session(ep, branches, progress=False).calibrate(few, desc=None)
        layerwise = Session(ep, branches, progress=False, pipeline=LayerByLayer()).calibrate(few, desc=None)
        out["max_relative_difference"] = _max_relative_difference(basic, layerwise)
        del layerwise
        if device != "cpu":  # weight offload reads the checkpoint onto the host: measured on the CPU only
            return out
        empty, _, source = _setup(shape, dtype, samples, seq_len, weights)
        offloaded = Session(empty, find_branches(empty), progress=False, pipeline=LayerByLayer(),
                            weights=source).calibrate(few, desc=None)
        out["offload_max_relative_difference"] = _max_relative_difference(basic, offloaded)
        return out
    out["rss_before"], out["rss_peak"] = mem.before, mem.peak
    if device != "cpu":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return out


def bound_parts(shape: str, dtype_name: str, samples: int, seq_len: int) -> dict[str, int]:
    """Bytes of the parts of issue 16's layer-wise memory bound, computed from the shape."""
    from subfit_fx.pipelines import stats_nbytes
    from subfit_fx.stats import BranchStats

    c = SHAPES[shape]
    d, f, h, kv, hd = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                       c["num_key_value_heads"], c["head_dim"])
    item = torch.finfo(getattr(torch, dtype_name)).bits // 8
    layer = (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d) * item
    stats = 2 * stats_nbytes(BranchStats.empty(d, d))
    tokens = samples * seq_len
    # the stream crossing a cut, plus the shared per-batch mask (float, (b, 1, s, s)) and rotary tables
    activations = tokens * d * item + samples * seq_len * seq_len * item + 2 * tokens * hd * item
    return {"layer_weights": layer, "layer_statistics": stats, "cached_activations": activations,
            "embedding": c["vocab_size"] * d * item, "branches": 2 * c["num_hidden_layers"],
            "model_weights": (c["num_hidden_layers"] * layer + c["vocab_size"] * d * item + d * item)}


def memory_plan(samples: int = 64, seq_len: int = 256, batch: int = 8, judge_sequences: int = 4,
                weight_bytes: int = 2) -> list[dict[str, Any]]:
    """Bytes each part of a default `subfit-fx compress` needs, per model in PLAN (bf16 weights,
    float64 statistics, the default calibration and output judge), computed from the shapes."""
    from subfit_fx.pipelines import stats_nbytes
    from subfit_fx.stats import BranchStats

    rows = []
    for name, (d, layers, ffn, heads, kv, vocab) in PLAN.items():
        head_dim = d // heads
        per_layer = 2 * d * d + 2 * d * kv * head_dim + 3 * d * ffn + 2 * d
        params = layers * per_layer + 2 * vocab * d + d  # untied embedding and head
        branch = stats_nbytes(BranchStats.empty(d, d))
        tokens, judged = samples * seq_len, judge_sequences * seq_len
        rows.append({
            "model": name, "params": params, "weights": params * weight_bytes,
            "statistics_one_layer": 2 * branch, "statistics_all": 2 * layers * branch,
            # the stream per calibration token, plus each batch's (b, 1, s, s) mask in the model dtype
            "activation_cache": tokens * d * weight_bytes + (samples // batch) * batch * seq_len**2 * weight_bytes,
            # dense log-probabilities (float32) and the restart points (capped at 2 GiB) of the output judge
            "judge": judged * vocab * 4 + min(2 << 30, 2 * layers * judged * d * weight_bytes),
            # one batch's transient logits (float32 upcast in the loss) and the largest FFN activation
            "transient": batch * seq_len * (vocab * 4 + 2 * ffn * weight_bytes),
        })
    return rows


def plan_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | weights (bf16) | statistics: one layer / all | activation cache | output judge | "
             "transient | layer-wise total | basic total |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        common = r["weights"] + r["activation_cache"] + r["judge"] + r["transient"]
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {_gib(r['weights'])} | "
                     f"{_gib(r['statistics_one_layer'])} / {_gib(r['statistics_all'])} | "
                     f"{_gib(r['activation_cache'])} | {_gib(r['judge'])} | {_gib(r['transient'])} | "
                     f"**{_gib(common + r['statistics_one_layer'])}** | {_gib(common + r['statistics_all'])} |")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def gpu_markdown(result: dict[str, Any]) -> str:
    """The table of a run on a GPU: wall time against one forward, and GPU memory allocated."""
    r, parts = result["phases"], result["bound_parts"]
    fwd = r["forward"]["seconds"]
    d = SHAPES[result["shape"]]["hidden_size"]
    gram_flops = 2 * result["samples"] * result["seq_len"] * (d + 1) * (2 * d + 1) * parts["branches"]
    rate = r["forward"]["float64_gemm_flops"]
    lw = r["layerwise"]
    lines = [
        f"# Scale on a GPU: calibration time and memory ({result['shape']} shape, {result['dtype']}, "
        f"{result['samples']} x {result['seq_len']} tokens, {result['device']}: {result['gpu']})",
        "",
        "Model, batches and float64 statistics on the GPU; wall time synchronized; GPU memory is what torch "
        "allocated (before = the captured model, peak = during the phase). The layer-wise pipeline writes "
        "each layer's statistics to a scratch directory on the host when the layer is done, as on the CPU.",
        "",
        "| phase | wall s | x one forward | GPU before GiB | GPU peak GiB | peak - before GiB | statistics GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("forward", "basic", "layerwise"):
        ph = r[name]
        lines.append(f"| {name} | {ph['seconds']:.2f} | {ph['seconds'] / fwd:.2f} | {_gib(ph['gpu_before'])} | "
                     f"{_gib(ph['gpu_peak'])} | {_gib(ph['gpu_peak'] - ph['gpu_before'])} | "
                     f"{_gib(ph.get('stats_bytes', 0))} |")
    lines += [
        "",
        f"Layer-wise vs basic statistics on the GPU: max relative difference "
        f"{r['equal']['max_relative_difference']:.2e} (target: rtol 1e-10).",
        "",
        f"Time: layer-wise {lw['seconds']:.2f} s = {lw['seconds'] / fwd:.2f} x one forward (issue 16's target "
        f"<= 2.5 x: {'met' if lw['seconds'] <= 2.5 * fwd else 'missed'}); basic {r['basic']['seconds'] / fwd:.2f} x. "
        f"The statistics' float64 GEMMs ({gram_flops / 1e12:.2f} TFLOP) at this GPU's measured float64 GEMM rate "
        f"({rate / 1e12:.1f} TFLOP/s) take {gram_flops / rate:.2f} s = {gram_flops / rate / fwd:.2f} x one forward.",
    ]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    r = result["phases"]
    parts = result["bound_parts"]
    lw, off = r["layerwise"], r["offload"]
    model_peak = off["rss_peak"] - off["rss_start"]
    bound = 1.3 * (parts["layer_weights"] + parts["layer_statistics"] + parts["cached_activations"]) \
        + parts["embedding"]
    fwd = r["forward"]["seconds"]
    lines = [
        f"# Scale: calibration memory and time ({result['shape']} shape, {result['dtype']}, "
        f"{result['samples']} x {result['seq_len']} tokens)",
        "",
        "RSS is measured above the process's start (interpreter and libraries, "
        f"{_gib(lw['rss_start'])} GiB): before = after building and capturing the model, peak = during the phase.",
        "",
        "| phase | wall s | x one forward | RSS before GiB | peak RSS GiB | peak - before GiB | statistics GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"forward": "forward", "basic": "basic", "layerwise": "layerwise",
             "offload": "layerwise + weight offload"}
    for name in ("forward", "basic", "layerwise", "offload"):
        p = r[name]
        lines.append(f"| {names[name]} | {p['seconds']:.1f} | {p['seconds'] / fwd:.2f} | "
                     f"{_gib(p['rss_before'] - p['rss_start'])} | {_gib(p['rss_peak'] - p['rss_start'])} | "
                     f"{_gib(p['rss_peak'] - p['rss_before'])} | {_gib(p.get('stats_bytes', 0))} |")
    met_time = off["seconds"] <= 2.5 * fwd
    d = SHAPES[result["shape"]]["hidden_size"]
    gram_flops = 2 * result["samples"] * result["seq_len"] * (d + 1) * (2 * d + 1) * parts["branches"]
    fwd_rate = r["forward"]["float64_gemm_flops"]
    gram_floor = gram_flops / fwd_rate
    lines += [
        "",
        f"Layer-wise vs basic statistics: max relative difference {r['equal']['max_relative_difference']:.2e}; "
        f"layer-wise with weight offload vs basic: {r['equal']['offload_max_relative_difference']:.2e} "
        "(target: rtol 1e-10).",
        "",
        "Issue 16's bound for the layer-wise peak: 1.3 x (one layer's weights "
        f"{_gib(parts['layer_weights'])} + one layer's statistics {_gib(parts['layer_statistics'])} + cached "
        f"activations {_gib(parts['cached_activations'])}) + the embedding {_gib(parts['embedding'])} = "
        f"**{_gib(bound)} GiB**; measured peak of the layer-wise pipeline with weight offload "
        f"**{_gib(model_peak)} GiB** ({'met' if model_peak <= bound else 'missed'}). The model is built from "
        "its config with no weight in memory (`subfit_fx.offload.empty_model`) and captured; each segment's "
        f"weights are read from the checkpoint while it runs and dropped after it "
        f"({_gib(off.get('weight_bytes_read', 0))} GiB read in all: every weight once, the unused head "
        f"never). Without weight offload all weights ({_gib(parts['model_weights'])} GiB) stay resident: "
        f"layer-wise peak {_gib(lw['rss_peak'] - lw['rss_start'])} GiB, of which the pipeline adds "
        f"{_gib(lw['rss_peak'] - lw['rss_before'])} GiB against "
        f"{_gib(r['basic']['rss_peak'] - r['basic']['rss_before'])} GiB for the basic pipeline.",
        "",
        f"Time: layer-wise with weight offload {off['seconds']:.1f} s = {off['seconds'] / fwd:.2f} x one forward "
        f"(target <= 2.5 x: {'met' if met_time else 'missed'}; without offload {lw['seconds'] / fwd:.2f} x); "
        "the statistics' float64 GEMMs (the Gram of [z, 1] and its cross product with the branch output) are "
        f"{gram_flops / 1e12:.2f} TFLOP for {result['samples'] * result['seq_len']} tokens and "
        f"{parts['branches']} branches, which at this machine's float64 GEMM rate ({fwd_rate / 1e9:.0f} GFLOP/s, "
        f"measured on one update-sized GEMM) take about {gram_floor:.1f} s = {gram_floor / fwd:.2f} x one forward "
        f"by themselves. The basic pipeline is at {r['basic']['seconds'] / fwd:.2f} x (the GEMMs and the "
        "per-token float64 scalars); the layer-wise one adds writing the statistics to the scratch "
        f"directory and one segment per layer ({lw['seconds'] / fwd:.2f} x); weight offload adds reading "
        f"{_gib(off.get('weight_bytes_read', 0))} GiB of weights ({off['seconds'] / fwd:.2f} x). The ratios "
        "depend on the processor (its bfloat16 forward against its float64 GEMMs: the machine line below); "
        "on a GPU: scale_gpu.md.",
        "",
        "## Memory plan for 7B-70B (computed from the shapes, GiB)",
        "",
        "A default `subfit-fx compress` (64 x 256 calibration tokens, batches of 8, output judge on 4 "
        "sequences) in bf16 on one device: weights + statistics (one layer with `--pipeline sequential`, "
        "all branches with the basic pipeline) + the activation cache + the output judge's dense "
        "log-probabilities and restart points + one batch's transient logits and FFN activations. "
        "Data-parallel ranks (torchrun) each hold all of it (the model is replicated, not sharded).",
        "",
        plan_markdown(memory_plan()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("1b", "3b"), default="1b")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model: a smoke run in seconds")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences (default 8; batches of 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: model, batches and statistics on "
                                                   "that GPU (no weight-offload phase; default out scale_gpu)")
    p.add_argument("--out", type=Path, default=None, help="results path prefix (default docs/results/scale)")
    p.add_argument("--child", choices=("save", *PHASES), help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape
    if args.child:
        print(json.dumps(child(args.child, shape, args.dtype, args.samples, args.seq_len, args.weights,
                               args.device)))
        return 0
    gpu = args.device != "cpu"
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU here; run on a GPU machine or drop --device")
    if args.tiny and args.out is None:
        p.error("--tiny writes a smoke result: pass --out PATH")
    phases = {}
    with tempfile.TemporaryDirectory(prefix="subfit-scale-") as checkpoint:
        # save: the random model as a checkpoint, for weight offload (on the CPU only)
        for phase in [ph for ph in ("save", *PHASES) if not (gpu and ph in ("save", "offload"))]:
            cmd = [sys.executable, __file__, "--child", phase, "--dtype", args.dtype, "--samples",
                   str(args.samples), "--seq-len", str(args.seq_len), "--weights", checkpoint, "--device", args.device,
                   *(["--tiny"] if args.tiny else ["--shape", args.shape])]
            measured = run_child(cmd)
            if measured is None:
                return 1
            phases[phase] = measured
            print(phase, phases[phase], flush=True)
    phases.pop("save", None)
    result = {"command": command_line(), "machine": machine(), "shape": shape, "dtype": args.dtype,
              "device": args.device, "gpu": torch.cuda.get_device_name(args.device) if gpu else None,
              "samples": args.samples, "seq_len": args.seq_len, "phases": phases,
              "bound_parts": bound_parts(shape, args.dtype, args.samples, args.seq_len)}
    out = args.out or RESULTS / ("scale_gpu" if gpu else "scale")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(f"{(gpu_markdown if gpu else markdown)(result)}\n\nCommand: `{result['command']}`  \n"
                                 f"Machine: {result['machine']}\n")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
