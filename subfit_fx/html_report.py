"""A self-contained HTML report of one compression run (images embedded as base64 PNG).

It shows the redundancy heatmap (layers x {attention, ffn}) of every recorded score, the
selection map, parameter / FLOP / KV-cache accounting, fit errors per replaced branch, and, when
`eval.json`, `lm_eval.json` or `bench.json` sit in the directory (e.g. `subfit-fx eval DIR --json >
DIR/eval.json`; `subfit-fx eval DIR --tasks ...` writes lm_eval.json), their tables. `subfit-fx report DIR` rebuilds it.

Example:
    >>> write_html_report(Path("out/llama-25"))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

__all__ = ["html_table", "render_html", "render_page", "write_html_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1050px;color:#1d2330}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}td,th{padding:.25rem .6rem;border:1px solid #dde}
th{background:#f3f5fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kpis{display:flex;gap:1rem;flex-wrap:wrap}.kpi{background:#f3f5fa;border-radius:8px;padding:.6rem 1rem}
.kpi b{display:block;font-size:1.3rem}code{font-size:.85em}img{max-width:100%}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heatmaps(report: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    branches = report["branches"]
    layers = sorted({b["layer"] for b in branches})
    names = sorted({k for b in branches for k in b.get("scores", {}) if not k.startswith("fit_error")})
    if not names:
        return "<p>No scores were recorded.</p>"
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 * len(names) + 1, 0.32 * len(layers) + 1.4), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = np.full((len(layers), 2), np.nan)
        for b in branches:
            if name in b.get("scores", {}):
                grid[layers.index(b["layer"]), 0 if b["kind"] == "attention" else 1] = b["scores"][name]
        ax.imshow(grid, aspect="auto", cmap="viridis")
        for b in branches:
            if b["replaced"]:
                ax.add_patch(plt.Rectangle((-0.5 + (b["kind"] != "attention"), layers.index(b["layer"]) - 0.5), 1, 1,
                                           fill=False, edgecolor="#ff3b30", linewidth=2))
        ax.set_title(name, fontsize=8)
        ax.set_xticks([0, 1], ["attn", "ffn"], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.suptitle("scores per branch (lower = cheaper to replace); red = replaced", fontsize=9, y=1.04)
    return f'<img alt="redundancy heatmaps" src="{_png(fig)}">'


def html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An HTML table of `rows` (dicts) over `columns`; numbers right-aligned, text escaped.

    Example:
        >>> html_table([{"a": 1.5}], ["a"])
        '<table><tr><th>a</th></tr><tr><td class="num">1.5</td></tr></table>'
    """
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4g}</td>')
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v:,}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _flat(data: Any, prefix: str = "") -> list[dict[str, Any]]:
    if isinstance(data, dict) and all(not isinstance(v, dict | list) for v in data.values()):
        return [{"metric": f"{prefix}{k}", "value": v} for k, v in data.items()]
    rows: list[dict[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            nested = isinstance(v, dict | list)
            rows += _flat(v, f"{prefix}{k}.") if nested else [{"metric": f"{prefix}{k}", "value": v}]
    elif isinstance(data, list):
        for i, v in enumerate(data):
            rows += _flat(v, f"{prefix}{i}.")
    return rows


def render_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained HTML page: `title`, then (heading, HTML body) sections.

    Example:
        >>> "<h2>x</h2>" in render_page("t", [("x", "<p>y</p>")])
        True
    """
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _selection_cell(branch: dict[str, Any]) -> str:
    if "kept_ratio" in branch:  # width-pruned: how much of it is left
        return f'<td style="background:#ffcc80;text-align:center">slimmed to {branch["kept_ratio"]:.0%}</td>'
    replaced = branch["replaced"]
    return (f'<td style="background:{"#ff3b30" if replaced else "#e7f7ea"};text-align:center">'
            f'{"replaced" if replaced else "kept"}</td>')


def render_html(report: dict[str, Any], extras: dict[str, Any] | None = None) -> str:
    """The report page for a report.json dict; `extras` maps titles to eval/bench JSON.

    Example:
        >>> "<html" in render_html({"method": "subfit", "sparsity_target": 0.25, "branches": []})
        True
    """
    r = {"sparsity_actual": 0.0, "kv_fraction_kept": 1.0, "params_before": 0, "params_after": 0,
         "bypass_params": 0, "flops_per_token_before": 0, "flops_per_token_after": 0, "replaced": [], **report}
    branches = r.get("branches", [])
    kpis = [("sparsity (blocks)", f"{r['sparsity_actual']:.1%}"), ("target", f"{r['sparsity_target']:.1%}"),
            ("parameters", f"{r['params_before']:,} → {r['params_after']:,}"),
            ("KV cache kept", f"{r['kv_fraction_kept']:.0%}"),
            ("linear FLOPs / token", f"{r['flops_per_token_before']:,} → {r['flops_per_token_after']:,}")]
    layers = sorted({b["layer"] for b in branches})
    cell = {(b["layer"], b["kind"]): b for b in branches}
    sel_rows = "".join(
        f"<tr><td>{layer}</td>" + "".join(_selection_cell(cell[(layer, k)]) if (layer, k) in cell else "<td>-</td>"
                                          for k in ("attention", "ffn")) + "</tr>" for layer in layers)
    fits = [{"label": b["label"], "kind": b["kind"], "layer": b["layer"], "form": b.get("form", ""),
             "branch params": b["params"], "bypass params": b.get("fit", {}).get("params", 0),
             "kept (slimmed)": f"{b['kept_ratio']:.0%}" if "kept_ratio" in b else "",
             "relative fit error": b.get("scores", {}).get("fit_error_relative", float("nan"))}
            for b in branches if b["replaced"]]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>subfit_fx report: {html.escape(str(r['method']))}</title><style>{_CSS}</style></head><body>",
        f"<h1>subfit_fx report — {html.escape(str(r['method']))}</h1>",
        "<div class='kpis'>" + "".join(f"<div class='kpi'>{html.escape(k)}<b>{html.escape(v)}</b></div>"
                                       for k, v in kpis) + "</div>",
        "<h2>Redundancy heatmap</h2>", _heatmaps(r) if branches else "<p>No branches.</p>",
        "<h2>Selection map</h2><table><tr><th>layer</th><th>attention</th><th>ffn</th></tr>" + sel_rows + "</table>",
        "<h2>Accounting</h2>", html_table([
            {"quantity": "block parameters", "value": r.get("block_params", 0)},
            {"quantity": "bypass parameters (incl. kept norms)", "value": r["bypass_params"]},
            {"quantity": "sparsity over all parameters", "value": float(r.get("sparsity_all_params", 0.0))},
            {"quantity": "replaced branches", "value": len(r["replaced"])},
        ], ["quantity", "value"]),
        "<h2>Fit errors of replaced branches</h2>",
        html_table(fits, ["label", "kind", "layer", "form", "branch params", "bypass params", "kept (slimmed)",
                          "relative fit error"])
        if fits else "<p>Nothing replaced.</p>",
    ]
    for title, data in (extras or {}).items():
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(_flat(data), ["metric", "value"])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(directory: Path, out: Path | None = None) -> Path:
    """Write `report.html` for a compressed directory (reads report.json, eval.json, lm_eval.json, bench.json).

    Example:
        >>> write_html_report(Path("out/llama-25"))  # doctest: +SKIP
    """
    directory = Path(directory)
    from subfit_fx.errors import InputError
    from subfit_fx.schema import check_bench, check_eval, check_lm_eval, check_report, read_json

    report = read_json(directory / "report.json", check_report)
    extras = {}
    for name, title, check in (("eval.json", "Evaluation", check_eval), ("lm_eval.json", "lm-evaluation-harness",
                               check_lm_eval), ("bench.json", "Benchmark", check_bench)):
        if (directory / name).is_file():
            extras[title] = read_json(directory / name, check, InputError)
    out = out or directory / "report.html"
    out.write_text(render_html(report, extras), encoding="utf-8")
    return out
