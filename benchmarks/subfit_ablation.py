"""Which SubFit options keep the most of the model? Measured on the *dev* half of wikitext-2
test.txt (benchmarks/quality.py reports on the other half), so defaults are never tuned on the
evaluation text.

    python benchmarks/subfit_ablation.py [--sparsities 0.25 0.375] [--configs default stream ...]

Writes docs/results/subfit_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from quality import run_one, setup

CONFIGS: dict[str, dict] = {
    "default": {},  # judged at the output (judge="output"), 4 held-out sequences, 4 rounds, bypass or removal
    "statistics": {"judge": "statistics"},  # one shot, statistics-only fit-residual score (the former default)
    "judge-8-sequences": {"judge_sequences": 8},
    "forms-auto": {"forms": "auto"},  # also a full linear map per branch
    "rounds-2": {"rounds": 2},
    "rounds-8": {"rounds": 8},
    "sequential": {"sequential": True},
    "stream-input": {"bypass_input": "stream"},
    "guarded": {"judge": "statistics", "score": "holdout", "holdout": 0.25, "forms": "auto", "rescore_every": 1,
                "sequential": True},
}
BASELINES = ["shortgpt", "llm-drop"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--baselines", nargs="*", default=BASELINES)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--choice-items", type=int, default=100)
    parser.add_argument("--name", default="subfit_ablation", help="output name under docs/results/")
    args = parser.parse_args()
    model_dir, model, tokenizer, text, calib, dense = setup(args, "dev")
    rows = []
    for sparsity in args.sparsities:
        runs = [(name, "subfit", CONFIGS[name]) for name in args.configs] + [(b, b, {}) for b in args.baselines]
        for name, method, options in runs:
            row = run_one(model, tokenizer, calib, text, method, sparsity, args, options, name=name)
            row["config"] = name
            rows.append(row)
            print(f"{sparsity:.3f} {name:28s} ppl x{row['perplexity'] / dense['perplexity']:.3f} "
                  f"choice {row['choice_accuracy']:.3f} sparsity {row['sparsity_actual']:.3f} "
                  f"kv {row['kv_fraction_kept']:.2f} [{row['compress_s']:.0f}s]", flush=True)
    lines = [f"# SubFit ablation: {args.name} (dev half of wikitext-2 test.txt)", "",
             f"Dense dev perplexity {dense['perplexity']:.2f}, choice accuracy {dense['choice_accuracy']:.3f}. "
             "Rows are SubFit option sets (and baselines for scale); same calibration and budget for all.", "",
             "| sparsity | config | options | ppl / dense | next-token acc / dense | choice acc | actual sparsity "
             "| KV kept | replaced | seconds |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        opts = json.dumps(CONFIGS.get(r["config"], {})) if r["config"] in CONFIGS else "(baseline)"
        lines.append(f"| {r['sparsity_target']:.4g} | {r['config']} | `{opts}` | "
                     f"{r['perplexity'] / dense['perplexity']:.3f} | "
                     f"{r['next_token_accuracy'] / dense['next_token_accuracy']:.3f} | {r['choice_accuracy']:.3f} | "
                     f"{r['sparsity_actual']:.3f} | {r['kv_fraction_kept']:.2f} | {len(r['replaced'])} | "
                     f"{r['compress_s']:.0f} |")
    lines += ["", "| sparsity | config | replaced (form) |", "|---:|---|---|"]
    lines += [f"| {r['sparsity_target']:.4g} | {r['config']} | {', '.join(r.get('replaced_forms') or r['replaced'])} |"
              for r in rows]
    settings = {k: str(v) for k, v in vars(args).items()} | {"model": str(model_dir)}
    write_results(args.name, {"dense": dense, "rows": rows, "args": settings},
                  "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
