"""Width pruning's memory: the default method (auto -> saap) on a 1B-shaped model, with its inner
Grams in memory (basic pipeline) and offloaded (layer-wise pipeline with an offload directory).

The model is scale.py's Llama-3.2-1B shape (16 layers, hidden 2048, FFN 8192; random init,
bfloat16), on the CPU; calibration 8 x 256 random tokens. Each variant runs `compress` at 25 % in
its own process while a sampler thread reads the process's resident memory every 5 ms, split as
the kernel reports it: anonymous memory (RssAnon: what the process holds) and file-backed pages
(RssFile: memory-mapped files, the offloaded Grams among them; the kernel can drop these
under pressure and read them back). The float64 Grams, one (8192 + 1)^2 matrix per layer, are
8.0 GiB for this shape.

Writes docs/results/width_memory.{json,md} with the exact command (`--tiny`: a 2-layer smoke run
into --out).

Example:
    .venv/bin/python benchmarks/width_memory.py                 # ~10 min on 2 cores
    .venv/bin/python benchmarks/width_memory.py --tiny --out /tmp/width-memory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, command_line, machine, run_child  # benchmarks/ is on sys.path when run as a script

VARIANTS = ("in-memory", "offload")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Highest anonymous, file-backed and total resident memory while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.before = _status()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            now = _status()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def child(variant: str, shape: str, samples: int, seq_len: int) -> dict[str, Any]:
    """One variant in this process."""
    from scale import SHAPES, _model

    import subfit_fx
    from subfit_fx.pipelines import SessionFactory

    model = _model(shape, torch.bfloat16)
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="subfit-width-") as scratch:
        factory = SessionFactory("sequential", offload=scratch) if variant == "offload" else None
        with PeakMemory() as mem:
            start = time.perf_counter()
            c = subfit_fx.compress(model, ids, 0.25, progress=False, batch_size=4,
                                   **({"session_factory": factory} if factory else {}))
            seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "method": c.recipe.method, "notes": c.report.notes,
            "sparsity_actual": c.report.sparsity_actual, "before": mem.before, "peak": mem.peak,
            "tensors": {k: float(t.double().abs().sum()) for k, t in sorted(c.recipe.tensors.items())[:4]}}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(result: dict[str, Any]) -> str:
    from scale import SHAPES

    c = SHAPES[result["shape"]]
    grams = c["num_hidden_layers"] * 8 * (c["intermediate_size"] + 1) ** 2
    lines = [f"# Width pruning's memory ({result['shape']} shape, bfloat16, CPU, {result['samples']} x "
             f"{result['seq_len']} tokens, default method at 25 %)", "",
             f"Float64 inner Grams of all FFNs: {_gib(grams)} GiB. Memory above what the process held before "
             "compress (the model built, the interpreter): anonymous (RssAnon) and file-backed (RssFile, "
             "memory-mapped files) peaks.", "",
             "| variant | ran | wall s | peak anonymous GiB | peak file-backed GiB | peak total GiB |",
             "|---|---|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = result["variants"][v]
        b, p = r["before"], r["peak"]
        lines.append(f"| {v} | {r['method']} | {r['seconds']:.0f} | {_gib(p['RssAnon'] - b['RssAnon'])} | "
                     f"{_gib(p['RssFile'] - b['RssFile'])} | {_gib(p['VmRSS'] - b['VmRSS'])} |")
    same = result["variants"]["in-memory"]["tensors"] == result["variants"]["offload"]["tensors"]
    lines += ["", f"Recipes equal (first tensors' sums): {'yes' if same else 'no'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 smoke run (needs --out)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, default=None, help="results path prefix (default docs/results/width_memory)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else "1b"
    if args.child:
        print(json.dumps(child(args.child, shape, args.samples, args.seq_len)))
        return 0
    if args.tiny and args.out is None:
        p.error("--tiny writes a smoke result: pass --out PATH")
    variants = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               *(["--tiny"] if args.tiny else [])]
        measured = run_child(cmd)
        if measured is None:
            return 1
        variants[v] = measured
        print(v, {k: variants[v][k] for k in ("method", "seconds", "peak")}, flush=True)
    result = {"command": command_line(), "machine": machine(), "shape": shape, "samples": args.samples,
              "seq_len": args.seq_len, "variants": variants}
    out = args.out or RESULTS / "width_memory"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(f"{markdown(result)}\n\nCommand: `{result['command']}`  \nMachine: "
                                 f"{result['machine']}\n")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
