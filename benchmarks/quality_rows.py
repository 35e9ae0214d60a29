"""Edit the rows of a quality results file without re-running anything: rename a method's rows
(e.g. the former default, once an option changed it: `--rename subfit=subfit:spans=0`) and/or take
finished rows of one method from another results file (a run from a snapshot), then rewrite
docs/results/NAME.{json,md,png} with benchmarks/quality.py's writer. Row values are copied, never
recomputed; each row keeps the command that produced it.

    python benchmarks/quality_rows.py --rename subfit=subfit:spans=0 --take /tmp/run/quality.json:subfit \
        --sparsities 0.25 0.1875

--rename-at S [S ...] renames only the rows at those target sparsities (a default that changed at
some sparsities only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
from _common import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="quality", help="results file stem under docs/results")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename a method's rows")
    parser.add_argument("--rename-at", nargs="+", type=float, default=None,
                        help="--rename only the rows at these target sparsities (default: all)")
    parser.add_argument("--take", action="append", default=[], metavar="FILE:METHOD",
                        help="rows of METHOD from another results file (same dense reference), replacing ours")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help="--take only the rows at these target sparsities (default: all)")
    args = parser.parse_args()
    path = RESULTS / f"{args.name}.json"
    data = json.loads(path.read_text())
    rows = data["rows"]
    for spec in args.rename:
        old, new = spec.split("=", 1)
        if any(r["method"] == new for r in rows):
            sys.exit(f"rows of {new!r} exist already; rename them first")
        rows = [dict(r, method=new) if r["method"] == old and (args.rename_at is None or r["sparsity_target"]
                                                                in args.rename_at) else r for r in rows]
    for spec in args.take:
        # the method spec may hold colons itself (hybrid:replace=False): split after the .json
        file, sep, method = spec.partition(".json:")
        if not sep:
            sys.exit(f"--take {spec!r}: expected FILE.json:METHOD")
        file += ".json"
        other = json.loads(Path(file).read_text())
        ours, theirs = data["dense"], other["dense"]
        same = ours.keys() == theirs.keys() and all(
            abs(ours[k] - theirs[k]) <= 1e-5 * abs(ours[k]) if isinstance(ours[k], float) else ours[k] == theirs[k]
            for k in ours)  # float32 sums differ in the last bits between machines
        if not same:
            sys.exit(f"{file} was evaluated against another dense reference; its rows do not compare")
        taken = [r for r in other["rows"] if r["method"] == method
                 and (args.sparsities is None or r["sparsity_target"] in args.sparsities)]
        replaced = {r["sparsity_target"] for r in taken}
        rows = taken + [r for r in rows if not (r["method"] == method and r["sparsity_target"] in replaced)]
        print(f"took {len(taken)} rows of {method}: {sorted(r['sparsity_target'] for r in taken)}")
    run_args = argparse.Namespace(**data["args"])
    for key in ("samples", "seq_len", "eval_tokens"):
        setattr(run_args, key, int(getattr(run_args, key)))
    run_args.name = args.name
    quality.write(run_args, Path(data["args"]["model"]), rows, data["dense"])


if __name__ == "__main__":
    main()
