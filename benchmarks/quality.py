"""Quality at matched parameter budgets: SubFit vs five baselines on the trained reference model.

Calibration text: wikitext-2 valid.txt (the reference model's training distribution).
Evaluation text: the second half of wikitext-2 test.txt (never trained on, never calibrated on,
never used to choose options: the first half is the dev split that benchmarks/subfit_ablation.py
uses). All methods get the same calibration batches and the same budget (net sparsity over block
parameters, METHOD.md).

    python benchmarks/quality.py [--methods subfit shortgpt ...] [--sparsities 0.125 0.25 ...]

Writes docs/results/quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results

import subfit_fx
from subfit_fx.data import read_text, text_batches
from subfit_fx.evaluation import evaluate
from subfit_fx.training import default_data_dir, ensure_reference_model

METHODS = ["subfit", "subfit-guarded", "shortgpt", "uidl", "replaceme", "llm-drop", "blockpruner"]
SPARSITIES = [0.125, 0.1875, 0.25, 0.3125, 0.375]


def eval_split(split: str) -> str:
    """wikitext-2 test.txt, halved at a line boundary: 'dev' (first half) or 'test' (second half)."""
    text = read_text(default_data_dir() / "wikitext-2" / "test.txt")
    cut = text.index("\n", len(text) // 2)
    return text[:cut] if split == "dev" else text[cut:]


def calibration(tokenizer: Any, samples: int, seq_len: int, seed: int = 0) -> list:
    return text_batches(default_data_dir() / "wikitext-2" / "valid.txt", tokenizer, samples=samples,
                        seq_len=seq_len, batch_size=8, seed=seed)


def setup(args: argparse.Namespace, split: str) -> tuple:
    """(model dir, model, tokenizer, evaluation text, calibration batches, dense metrics) for a run."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir = args.model or ensure_reference_model()
    model = subfit_fx.load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = eval_split(split)
    calib = calibration(tokenizer, args.samples, args.seq_len)
    dense = evaluate(subfit_fx.capture(model).module(), tokenizer, text, causal=True, seq_len=args.seq_len,
                     max_tokens=args.eval_tokens, choice_items_count=args.choice_items, progress=False)
    return model_dir, model, tokenizer, text, calib, dense


def run_one(model, tokenizer, calib, text, method, sparsity, args, options) -> dict[str, Any]:
    t = time.perf_counter()
    c = subfit_fx.compress(model, calib, sparsity, method, progress=False, **options)
    compress_s = time.perf_counter() - t
    metrics = evaluate(c.module(), tokenizer, text, causal=True, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                       choice_items_count=args.choice_items, progress=False)
    r = c.report
    forms = [f"{label} ({rep.form})" for rep in c.recipe.replacements for label in rep.labels]
    return {"method": method, "sparsity_target": sparsity, "sparsity_actual": r.sparsity_actual,
            "replaced": r.replaced, "replaced_forms": forms, "kv_fraction_kept": r.kv_fraction_kept,
            "params_after": r.params_after,
            "selection_map": r.selection_map(), "compress_s": compress_s, **metrics}


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["sparsity_target"], r["perplexity"] / dense["perplexity"])
                     for r in rows if r["method"] == method)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linewidth=2.5 if method == "subfit" else 1.3)
    ax.set_xlabel("sparsity (% of transformer-block parameters, net of bypasses)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Reference model (8-layer Llama), wikitext-2 test (held-out half)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict], dense: dict, key: str, fmt: str, ratio_to: str | None) -> list[str]:
    sparsities = sorted({r["sparsity_target"] for r in rows})
    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for s in sparsities:
            hit = [r for r in rows if r["method"] == method and r["sparsity_target"] == s]
            if not hit:
                cells.append("")
                continue
            value = hit[0][key] / dense[ratio_to] if ratio_to else hit[0][key]
            best = [r[key] for r in rows if r["sparsity_target"] == s]
            is_best = hit[0][key] == (min(best) if key == "perplexity" else max(best))
            cells.append(("**" + format(value, fmt) + "**") if is_best else format(value, fmt))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="reference model dir (default: cached/trained)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=40_000)
    parser.add_argument("--choice-items", type=int, default=200)
    parser.add_argument("--split", choices=("test", "dev"), default="test")
    parser.add_argument("--name", default="quality", help="results file stem under docs/results")
    args = parser.parse_args()
    model_dir, model, tokenizer, text, calib, dense = setup(args, args.split)
    print(f"dense: {json.dumps(dense)}", flush=True)
    rows = []
    for sparsity in args.sparsities:
        for method in args.methods:
            row = run_one(model, tokenizer, calib, text, method, sparsity, args, {})
            rows.append(row)
            print(f"{method:12s} {sparsity:.4f}: ppl {row['perplexity']:.2f} "
                  f"({row['perplexity'] / dense['perplexity']:.2f}x) choice {row['choice_accuracy']:.3f} "
                  f"actual {row['sparsity_actual']:.3f} [{row['compress_s']:.0f}s]", flush=True)

    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, dense, png)
    at25 = {r["method"]: r for r in rows if r["sparsity_target"] == 0.25}
    verdict = []
    ppl_dense, choice_dense = dense["perplexity"], dense["choice_accuracy"]
    baselines = [m for m in at25 if not m.startswith("subfit")]
    for ours in [m for m in at25 if m.startswith("subfit")]:
        if not baselines:
            break
        best = min((at25[m] for m in baselines), key=lambda r: r["perplexity"])
        mine = at25[ours]
        ratio = (mine["perplexity"] / ppl_dense) / (best["perplexity"] / ppl_dense)
        excess = (mine["perplexity"] / ppl_dense - 1) / max(best["perplexity"] / ppl_dense - 1, 1e-9)
        verdict.append(
            f"- At 25 %, {ours}: perplexity ratio {mine['perplexity'] / ppl_dense:.3f}x vs best baseline "
            f"({best['method']}) {best['perplexity'] / ppl_dense:.3f}x. Ratio of ratios {ratio:.2f} (target <= 0.60: "
            f"**{'met' if ratio <= 0.6 else 'missed'}**); ratio of perplexity *increases* over dense {excess:.2f} "
            f"({'<=' if excess <= 0.6 else '>'} 0.60).")
        choice_ok = all(mine["choice_accuracy"] >= at25[m]["choice_accuracy"] for m in baselines)
        verdict.append(f"- At 25 %, {ours}: choice-accuracy retention {mine['choice_accuracy'] / choice_dense:.3f} "
                       f">= every baseline's: **{'met' if choice_ok else 'missed'}**.")
        best_from_25 = all(
            min((r for r in rows if r["sparsity_target"] == s and (r["method"] == ours or r["method"] in baselines)),
                key=lambda r: r["perplexity"])["method"] == ours
            for s in {r["sparsity_target"] for r in rows} if s >= 0.25)
        verdict.append(f"- {ours} best (perplexity) against every baseline at every sparsity from 25 % up: "
                       f"**{'met' if best_from_25 else 'missed'}**.")
    maps = [f"### {m} at 25 %\n\n```\n{r['selection_map']}\n```\n" for m, r in at25.items()]
    md = "\n".join([
        "# Quality at matched parameter budgets", "",
        f"Reference model `{model_dir}`; calibration {args.samples} x {args.seq_len} tokens of wikitext-2 valid.txt;",
        f"evaluation on the {args.split} half of wikitext-2 test.txt ({args.eval_tokens} tokens for perplexity, "
        f"{args.choice_items} continuation-choice items). Dense: perplexity {dense['perplexity']:.2f}, next-token "
        f"accuracy {dense['next_token_accuracy']:.3f}, choice accuracy {dense['choice_accuracy']:.3f}.", "",
        *verdict, "",
        "## Perplexity / dense (lower is better; best per column in bold)", "",
        *table(rows, dense, "perplexity", ".2f", "perplexity"), "",
        "## Next-token accuracy retention (accuracy / dense)", "",
        *table(rows, dense, "next_token_accuracy", ".3f", "next_token_accuracy"), "",
        "## Continuation-choice accuracy retention (accuracy / dense; chance = 0.25 / dense)", "",
        *table(rows, dense, "choice_accuracy", ".3f", "choice_accuracy"), "",
        f"![perplexity ratio vs sparsity]({png.name})", "",
        "## What each method replaced at 25 % (# = replaced)", "", *maps,
    ])
    write_results(args.name, {"dense": dense, "rows": rows, "args": vars(args) | {"model": str(model_dir)}}, md)
    print(md)


if __name__ == "__main__":
    main()
