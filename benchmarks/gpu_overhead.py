"""GPU overhead: where a width-pruned program's time goes in torch on a GPU at batch 1.

Builds the Llama-3.2-1B-shaped random-init model of benchmarks/gpu.py in bfloat16 on CUDA,
compresses it with the default method at 25 %, and times prefill (1, 128 and 2048 tokens, no
cache) of three forwards interleaved: the Hugging Face model's eager forward, the dense captured
program (`capture(model).module()`) and the compressed program. Then it profiles one 128-token
forward of each program and prints the number of CUDA kernels and their summed GPU time: if GPU
time is a small part of the wall time, the forward is launch-bound (host-side), and a method that
only narrows matmuls (width pruning) cannot show its FLOP / byte savings there.

Prints its findings (no JSON: a diagnostic, quoted in docs/results/gpu.md with its command).
`--tiny` runs the same on a 2-layer hidden-64 model on the CPU (no profile) in about a minute.

Example:
    python3 benchmarks/gpu_overhead.py            # on a GPU machine, ~2 min on an H200
    .venv/bin/python benchmarks/gpu_overhead.py --tiny
"""

from __future__ import annotations

import sys

import torch
import transformers as tf
from gpu import LLAMA_1B, TINY  # benchmarks/ is on sys.path when run as a script

from subfit_fx import capture
from subfit_fx.compress import compress
from subfit_fx.exporters.bench import interleaved


def main(argv: list[str]) -> int:
    tiny = "--tiny" in argv
    dev = torch.device("cpu" if tiny else "cuda")
    cfg = tf.LlamaConfig(**(TINY if tiny else LLAMA_1B), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(dev):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    calib = torch.randint(3, cfg.vocab_size, (16, 32 if tiny else 512), generator=torch.Generator().manual_seed(0))
    c = compress(model, calib, 0.25, progress=False, batch_size=4)
    print("kept ratios", [round(b["kept_ratio"], 3) for b in c.report.branches if b.get("form") == "slim"])
    ids = torch.randint(3, cfg.vocab_size, (2, 16), device=dev)
    dense, comp = capture(model, (ids, torch.ones_like(ids))).module(), c.module()

    def timed(fn: object) -> object:
        def step() -> None:
            with torch.no_grad():
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return step

    for n in [1, 16] if tiny else [1, 128, 2048]:
        x = torch.randint(3, cfg.vocab_size, (1, n), device=dev)
        m = torch.ones_like(x)
        fns = {"hf": lambda x=x, m=m: model(input_ids=x, attention_mask=m, use_cache=False),
               "dense_program": lambda x=x, m=m: dense(x, m), "compressed_program": lambda x=x, m=m: comp(x, m)}
        t = interleaved({k: timed(f) for k, f in fns.items()}, repeats=5 if tiny else 20)
        print(n, {k: round(v * 1e3, 2) for k, v in t.items()}, flush=True)
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        x = torch.randint(3, cfg.vocab_size, (1, 128), device=dev)
        m = torch.ones_like(x)
        for name, f in {"dense_program": lambda: dense(x, m), "compressed_program": lambda: comp(x, m)}.items():
            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                f()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            print(name, "cuda kernels", sum(e.count for e in kernels), "cuda ms",
                  round(sum(e.self_device_time_total for e in kernels) / 1e3, 2))
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
