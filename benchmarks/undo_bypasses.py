"""Which of the default's replacements cost continuation-choice accuracy? A probe on the *dev*
half (never the test half) of wikitext-2 test.txt, on SmolLM2-135M-Instruct.

The default SubFit compresses to SPARSITY exactly as benchmarks/quality.py does (64 x 256
calibration tokens of wikitext-2 valid.txt); then the recipe is applied again with the
replacements of each GROUP left out (those branches stay dense), and every variant is evaluated
like quality.py (8192 tokens in windows of 256, 200 choice items). Leaving replacements out
lowers the sparsity: variants are diagnostics of where the default loses, not methods at a
matched budget.

    python benchmarks/undo_bypasses.py [--sparsity 0.25] [--groups 28,29 6,7,8]

Writes docs/results/undo_bypasses.{json,md}. A group is comma-separated layer indices whose
attention replacements are left out (the default's attention bypasses outside its span map).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, write_results
from quality import calibration, reference

import subfit_fx
from subfit_fx.evaluation import evaluate
from subfit_fx.rewrite import apply_recipe

METRICS = ("perplexity", "next_token_accuracy", "choice_accuracy")


def markdown(data: dict) -> str:
    dense = data["dense"]
    lines = ["# Which of the default's replacements cost choice accuracy? (dev half)", "",
             f"`{data['command']}`", "",
             f"SmolLM2-135M-Instruct, default SubFit at {data['sparsity']:.2%} target, compressed once "
             f"({data['compress_s']:.0f} s); each row applies the same recipe with some attention replacements "
             f"left out (those branches stay dense, so the sparsity is lower). Dev half of wikitext-2 test.txt, "
             f"8192 tokens, 200 choice items (standard error about 0.035). Dense: perplexity "
             f"{dense['perplexity']:.2f}, next-token {dense['next_token_accuracy']:.3f}, choice "
             f"{dense['choice_accuracy']:.3f}.", "",
             "| variant | ppl / dense | next-token / dense | choice acc. |", "|---|---:|---:|---:|"]
    for name, m in data["variants"].items():
        lines.append(f"| {name} | {m['perplexity'] / dense['perplexity']:.3f} | "
                     f"{m['next_token_accuracy'] / dense['next_token_accuracy']:.3f} | {m['choice_accuracy']:.3f} |")
    lines += ["", "Replacements of the default: " + "; ".join(data["replacements"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--groups", nargs="+", default=["28,29", "6,7,8"])
    args = parser.parse_args()
    model, tokenizer, text = reference("dev")

    def score(module: torch.nn.Module) -> dict:
        m = evaluate(module, tokenizer, text, causal=True, seq_len=256, max_tokens=8192, choice_items_count=200,
                     progress=False)
        return {k: m[k] for k in METRICS}

    t = time.perf_counter()
    c = subfit_fx.compress(model, calibration(tokenizer, 64, 256), args.sparsity, "subfit", progress=False)
    compress_s = time.perf_counter() - t
    variants = {"default (all replacements)": score(c.module())}
    for group in args.groups:
        layers = [int(x) for x in group.split(",")]
        keep = {f"model.layers.{i}.self_attn" for i in layers}
        recipe = dataclasses.replace(c.recipe, replacements=[r for r in c.recipe.replacements
                                                             if not set(r.labels) & keep])
        name = f"attention of layers {group} left dense"
        variants[name] = score(apply_recipe(subfit_fx.capture(model), recipe).module())
        print(name, variants[name], flush=True)
    data = {"command": command_line(), "machine": machine(), "sparsity": args.sparsity, "compress_s": compress_s,
            "dense": score(subfit_fx.capture(model).module()), "variants": variants,
            "replacements": [f"{'+'.join(r.labels)} ({r.form})" for r in c.recipe.replacements]}
    write_results("undo_bypasses", data, markdown(data))


if __name__ == "__main__":
    main()
