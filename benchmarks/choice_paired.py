"""Is a continuation-choice gap between two methods real? A paired comparison on many items.

quality.py scores 200 items (standard error about 0.035 per accuracy), too few to separate most
methods. This script compresses the given methods at one sparsity exactly as quality.py does
(SmolLM2-135M-Instruct, 64 x 256 calibration tokens of wikitext-2 valid.txt), scores every
model on the same ITEMS items of an evaluation split, and compares each method with every other
item by item: the items only one of the two gets right decide (McNemar's exact test), and the
paired difference gets a 95 % interval.

    python benchmarks/choice_paired.py [--sparsity 0.25] [--items 1000] [--methods subfit shortgpt]
                                       [--split test] [--recipes DIR]

A spec may also set the calibration: `auto:calib_len=512,calib_samples=32` calibrates on 32 x 512
tokens instead of 64 x 256 (those two options go to the benchmark, not to the method).

--recipes DIR keeps each compressed model and its per-item outcomes in DIR/<spec> and reuses them
on the next run (the calibration is the same for both splits). --reuse RESULTS.json brings in the
models of an earlier run of this script on the same split and items (their outcomes, perplexity and
sparsity, without compressing them again); its dense outcomes must equal this run's, so the items
are the same. --dense-check N scores the dense model on only the first N items and takes the rest
of its outcomes from the --reuse files once those N agree (an hour saved per 1000 items; its
perplexity is always measured). Writes docs/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from quality import calibration, compressed, parse_spec, recipe_dir, reference, seconds

import subfit_fx
from subfit_fx.data import tokenize_text
from subfit_fx.evaluation import choice_correctness, perplexity_and_accuracy


def encode(outcomes: list[bool]) -> str:
    """Per-item outcomes as the results files keep them: one '1' or '0' per item."""
    return "".join("1" if x else "0" for x in outcomes)


def decode(bits: str) -> list[bool]:
    """The inverse of `encode`."""
    return [c == "1" for c in bits]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant items are Binomial(n, 1/2) if neither
    model is better."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Accuracy difference a - b with its paired standard error and the McNemar counts."""
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    diff = (only_a - only_b) / n
    se = math.sqrt(max(0.0, (only_a + only_b) / n - diff ** 2) / n)
    return {"difference": diff, "se": se, "ci95": [diff - 1.96 * se, diff + 1.96 * se], "only_a": only_a,
            "only_b": only_b, "both": sum(x and y for x, y in zip(a, b)), "p_mcnemar": mcnemar_exact(only_a, only_b)}


def dense_note(data: dict) -> str:
    """What the text says when the dense outcomes were only spot-checked (--dense-check)."""
    scored = data.get("dense_scored", data["items"])
    if scored == data["items"]:
        return ""
    return (f" The dense model was scored on the first {scored} items here (they matched the reused file's); "
            "its other outcomes come from the reused file.")


def markdown(data: dict) -> str:
    n = data["items"]
    lines = ["# Continuation choice, paired over many items", "",
             f"SmolLM2-135M-Instruct at {data['sparsity']:.2%} target sparsity, {data['split']} half of wikitext-2 "
             f"test.txt, {n} continuation-choice items (seed 0; quality.py uses 200). Each model scores the same "
             "items; a difference is significant when McNemar's exact p is small. Perplexity and next-token accuracy: "
             "the first 8192 tokens in windows of 256, as quality.py." + dense_note(data), "",
             "| model | choice acc. | SE | ppl / dense | next-token / dense | actual sparsity | compress s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    dense = data["models"]["dense"]
    for name, m in data["models"].items():
        acc = m["accuracy"]
        sparsity = f"{m['sparsity_actual']:.1%}" if "sparsity_actual" in m else "-"
        compress = seconds(m.get("compress_s"))
        shown = f"{name} (outcomes from {Path(m['from']).name})" if "from" in m else name
        lines.append(f"| {shown} | {acc:.3f} | {math.sqrt(acc * (1 - acc) / n):.3f} | "
                     f"{m['perplexity'] / dense['perplexity']:.3f} | "
                     f"{m['next_token_accuracy'] / dense['next_token_accuracy']:.3f} | {sparsity} | {compress} |")
    lines += ["", "| A vs B | A - B | 95 % interval | only A right | only B right | McNemar p |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, p in data["pairs"].items():
        lo, hi = p["ci95"]
        lines.append(f"| {key} | {p['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {p['only_a']} | {p['only_b']} | "
                     f"{p['p_mcnemar']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["subfit", "shortgpt"], help="method specs, as quality.py")
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--recipes", type=Path, default=None, help="keep and reuse recipes in this directory")
    parser.add_argument("--name", default="choice_paired", help="results file stem under docs/results")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="results JSON of earlier runs on the same split and items whose models join the pairs")
    parser.add_argument("--dense-check", type=int, default=None, metavar="N",
                        help="with --reuse: score the dense model on the first N items only and reuse the rest")
    args = parser.parse_args()
    if args.dense_check is not None and not args.reuse:
        sys.exit("error: --dense-check takes the dense outcomes from --reuse files; pass --reuse RESULTS.json")
    earlier = [json.loads(path.read_text()) for path in args.reuse]
    for path, data in zip(args.reuse, earlier):
        if (data["split"], data["items"]) != (args.split, args.items) or not math.isclose(data["sparsity"],
                                                                                          args.sparsity):
            sys.exit(f"error: {path} scored {data['items']} {data['split']} items at {data['sparsity']:.2%}, not "
                     f"{args.items} {args.split} items at {args.sparsity:.2%}; pass a matching results file")
    model, tokenizer, text = reference(args.split)

    ids = tokenize_text(text, tokenizer)[:8192]

    def outcomes(module: torch.nn.Module, where: Path | None = None) -> tuple[list[bool], dict]:
        """Per-item outcomes and quality.py's perplexity (8192 tokens, windows of 256), kept beside
        the compressed model (a killed run resumes)."""
        kept = where / f"choice-{args.split}-{args.items}.json" if where is not None else None
        if kept is not None and kept.is_file():
            data = json.loads(kept.read_text())
            return decode(data["outcomes"]), data["perplexity"]
        outcomes_only = kept.with_suffix(".txt") if kept is not None else None  # from a run before perplexity
        with torch.no_grad():
            if outcomes_only is not None and outcomes_only.is_file():
                out = decode(outcomes_only.read_text().strip())
            else:
                out = choice_correctness(module, tokenizer, text, args.items, 0, progress=False)
            ppl = perplexity_and_accuracy(module, ids, 256, progress=False)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps({"outcomes": encode(out), "perplexity": ppl}))
        return out, ppl

    models: dict[str, dict] = {}
    per_item: dict[str, list[bool]] = {}
    dense_dir = args.recipes / "dense" if args.recipes else None
    dense = subfit_fx.capture(model).module()
    if args.dense_check is None:
        per_item["dense"], ppl = outcomes(dense, dense_dir)
        checked = per_item["dense"]
    else:
        with torch.no_grad():
            checked = choice_correctness(dense, tokenizer, text, args.items, 0, first=args.dense_check,
                                         progress=False)
            ppl = perplexity_and_accuracy(dense, ids, 256, progress=False)
        per_item["dense"] = decode(earlier[0]["outcomes"]["dense"])
    models["dense"] = {"accuracy": sum(per_item["dense"]) / len(per_item["dense"]), **ppl}
    print("dense", models["dense"], flush=True)
    for path, data in zip(args.reuse, earlier):
        if not data["outcomes"]["dense"].startswith(encode(checked)) or data["outcomes"]["dense"] != encode(
                per_item["dense"]):
            sys.exit(f"error: {path} has other dense outcomes than this run (other items or another evaluation); "
                     "pass a results file of the same items")
        for spec, m in data["models"].items():
            if spec != "dense" and spec not in args.methods:
                per_item[spec] = decode(data["outcomes"][spec])
                models[spec] = {**m, "from": str(path)}
    for spec in args.methods:
        _, options = parse_spec(spec)
        calib = calibration(tokenizer, options.get("calib_samples", 64), options.get("calib_len", 256))
        c, compress_s = compressed(args.recipes, spec, model, calib, args.sparsity)
        per_item[spec], ppl = outcomes(c.module(), recipe_dir(args.recipes, spec))
        models[spec] = {"accuracy": sum(per_item[spec]) / len(per_item[spec]), **ppl,
                        "sparsity_actual": c.report.sparsity_actual, "compress_s": compress_s,
                        "replaced": c.report.replaced}
        print(spec, models[spec]["accuracy"], flush=True)
    pairs = {f"{a} vs {b}": paired(per_item[a], per_item[b])
             for a, b in itertools.combinations(list(per_item)[1:], 2)}
    pairs.update({f"{a} vs dense": paired(per_item[a], per_item["dense"]) for a in list(per_item)[1:]})
    data = {"sparsity": args.sparsity, "items": len(per_item["dense"]), "split": args.split, "models": models,
            "dense_scored": len(checked),
            "pairs": pairs, "outcomes": {k: encode(v) for k, v in per_item.items()}}
    write_results(args.name, data, markdown(data))


if __name__ == "__main__":
    main()
