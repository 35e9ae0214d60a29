"""Every method's SmolLM2 exported to ONNX with and without KV cache, each validated.

Each method compresses SmolLM2-135M-Instruct exactly as benchmarks/quality.py does (same
calibration, same budget), then `export_onnx` (no cache) and `export_onnx_kv` write it to a
temporary folder; both are validated against torch by the scale-aware criterion of
`subfit_fx.exporters.validate` (max |diff| relative to the logits' scale, KL of the next-token
distributions, top-1 agreement). An export that fails validation is reported, not hidden.

    python benchmarks/export_all.py [--methods subfit shortgpt ...] [--sparsity 0.25]

Writes docs/results/export_all.{json,md}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from quality import one_sparsity_parser, parse_spec, setup

import subfit_fx
from subfit_fx.errors import ValidationError
from subfit_fx.exporters.kv_cache import export_onnx_kv
from subfit_fx.exporters.onnx_export import export_onnx

parser = one_sparsity_parser(__doc__.splitlines()[0])
parser.add_argument("--name", default="export_all", help="results file stem under docs/results")


def _export(exporter: Any, source: Any, path: Path) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        parity = exporter(source, path).parity
    except ValidationError as error:  # reported in the table: a failing export must be visible
        return {"passed": False, "summary": str(error), "seconds": time.perf_counter() - t}
    return {**parity.to_dict(), "summary": parity.summary(), "seconds": time.perf_counter() - t}


def main() -> None:
    args = parser.parse_args()
    _, model, _, _, calib, _ = setup(args, "test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ["dense", *args.methods]:
            source, sparsity = model, 0.0
            if spec != "dense":
                method, options = parse_spec(spec)
                source = subfit_fx.compress(model, calib, args.sparsity, method, progress=False, **options)
                sparsity = source.report.sparsity_actual
            row = {"method": spec, "sparsity_actual": sparsity,
                   "plain": _export(export_onnx, source, Path(tmp) / f"{spec}.onnx"),
                   "kv_cache": _export(export_onnx_kv, source, Path(tmp) / f"{spec}.kv.onnx")}
            rows.append(row)
            print(f"{spec}: plain {row['plain']['summary']}\n{spec}: kv {row['kv_cache']['summary']}", flush=True)
    lines = [f"# Every method's SmolLM2 exported to ONNX at {args.sparsity:.0%}, with and without KV cache", "",
             "Each export validated against torch (relative max |diff| <= 1e-4 of the logits' scale, KL <= 1e-5 "
             "nats; `subfit_fx.exporters.validate`).", "",
             "| method | actual sparsity | no cache: relative diff, KL | KV cache: relative diff, KL | passed |",
             "|---|---:|---|---|---|"]
    for r in rows:
        cells = [f"{e.get('relative_diff', float('nan')):.1e}, {e.get('kl') or 0:.1e}"
                 for e in (r["plain"], r["kv_cache"])]
        ok = r["plain"]["passed"] and r["kv_cache"]["passed"]
        lines.append(f"| {r['method']} | {100 * r['sparsity_actual']:.1f} % | {cells[0]} | {cells[1]} | "
                     f"{'yes' if ok else '**no**'} |")
    lines += ["", "Checks:", ""] + [f"- {r['method']}, {kind}: {r[key]['summary']}" for r in rows
                                     for kind, key in (("no cache", "plain"), ("KV cache", "kv_cache"))]
    md = "\n".join(lines) + "\n"
    write_results(args.name, {"sparsity_target": args.sparsity, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
