"""How much does healing (`compress(heal=EPOCHS)`) add to the default SubFit? A probe on the *dev*
half of wikitext-2 test.txt, on SmolLM2-135M-Instruct, to choose heal's settings (never the test
half).

The default SubFit compresses to SPARSITY exactly as benchmarks/quality.py does (64 x 256
calibration tokens of wikitext-2 valid.txt), or its saved directory is reused (--reuse DIR, as
choice_paired.py --recipes writes it); then the recipe's bypass tensors are healed with each
EPOCHS:LR setting on the same calibration batches (`subfit_fx.heal.heal_recipe`, what
`compress(heal=...)` runs) and every variant is evaluated like quality.py (8192 tokens in windows
of 256, 200 choice items).

    python benchmarks/heal_dev.py [--sparsity 0.25] [--settings 2:1e-4 2:3e-4] [--reuse DIR]

Writes docs/results/heal_dev.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from quality import calibration, reference

import subfit_fx
from subfit_fx.capture import is_causal_lm
from subfit_fx.checkpoints import ensure_smollm2
from subfit_fx.evaluation import evaluate
from subfit_fx.gguf import cache_root
from subfit_fx.heal import heal_recipe
from subfit_fx.rewrite import apply_recipe

METRICS = ("perplexity", "next_token_accuracy", "choice_accuracy")


def markdown(data: dict) -> str:
    dense = data["dense"]
    lines = ["# Healing the default's bypasses (dev half)", "",
             f"SmolLM2-135M-Instruct, default SubFit at {data['sparsity']:.2%} target ({data['sparsity_actual']:.1%} "
             "actual; healing changes no parameter count). Each row trains the recipe's bypass tensors for EPOCHS "
             "passes over the 64 x 256 calibration tokens (8 batches) with Adam at LR against the dense next-token "
             "distribution (KL). Dev half of wikitext-2 test.txt, 8192 tokens, 200 choice items (standard error "
             f"about 0.035). Dense: perplexity {dense['perplexity']:.2f}, next-token "
             f"{dense['next_token_accuracy']:.3f}, choice {dense['choice_accuracy']:.3f}.", "",
             "| variant | heal s | KL first epoch -> last | ppl / dense | next-token / dense | choice acc. |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in data["variants"].items():
        kl = f"{m['first_epoch_loss']:.3f} -> {m['last_epoch_loss']:.3f}" if "first_epoch_loss" in m else "-"
        heal_s = f"{m['heal_s']:.0f}" if "heal_s" in m else "-"
        lines.append(f"| {name} | {heal_s} | {kl} | {m['perplexity'] / dense['perplexity']:.3f} | "
                     f"{m['next_token_accuracy'] / dense['next_token_accuracy']:.3f} | {m['choice_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--settings", nargs="+", default=["2:1e-4", "2:3e-4"], help="EPOCHS:LR per variant")
    parser.add_argument("--reuse", type=Path, default=None, help="a saved default SubFit directory to start from")
    args = parser.parse_args()
    model, tokenizer, text = reference("dev")
    calib = calibration(tokenizer, 64, 256)

    def score(module: torch.nn.Module) -> dict:
        with torch.no_grad():
            m = evaluate(module, tokenizer, text, causal=True, seq_len=256, max_tokens=8192,
                         choice_items_count=200, progress=False)
        return {k: m[k] for k in METRICS}

    if args.reuse is not None and (args.reuse / "recipe.json").is_file():
        c = subfit_fx.load(args.reuse, model=model)
    else:
        c = subfit_fx.compress(model, calib, args.sparsity, "subfit", progress=False)
    ep = subfit_fx.capture(model)
    variants = {"default (not healed)": score(c.module())}
    for setting in args.settings:
        epochs, lr = setting.split(":")
        t = time.perf_counter()
        healed = heal_recipe(ep, c.recipe, calib, causal=is_causal_lm(model), epochs=int(epochs), lr=float(lr),
                             progress=False)
        heal_s = time.perf_counter() - t
        recipe = dataclasses.replace(c.recipe, tensors={**c.recipe.tensors, **healed.tensors})
        name = f"heal {epochs} epochs, lr {lr}"
        variants[name] = {**score(apply_recipe(ep, recipe).module()), "heal_s": heal_s,
                          "first_epoch_loss": healed.first_epoch_loss, "last_epoch_loss": healed.last_epoch_loss}
        print(name, variants[name], flush=True)
    # quality.py's cached dense run of the dev half, same protocol
    cached = cache_root() / "dense" / f"{ensure_smollm2().name}-dev-256-8192-200.json"
    dense = json.loads(cached.read_text()) if cached.is_file() else score(ep.module())
    data = {"sparsity": args.sparsity, "sparsity_actual": c.report.sparsity_actual,
            "dense": {k: dense[k] for k in METRICS}, "variants": variants}
    write_results("heal_dev", data, markdown(data))


if __name__ == "__main__":
    main()
