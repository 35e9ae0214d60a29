"""The Report: per-branch scores, the selection, parameter / FLOP / KV-cache accounting, fit errors.

Example:
    >>> Report(method="subfit", sparsity_target=0.25).to_json()["method"]
    'subfit'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Report", "build_report"]


@dataclass
class Report:
    """Everything a user needs to judge a compression run (written as report.json / report.md)."""

    method: str
    sparsity_target: float
    sparsity_actual: float = 0.0
    sparsity_all_params: float = 0.0
    replaced: list[str] = field(default_factory=list)
    kv_fraction_kept: float = 1.0
    params_before: int = 0
    params_after: int = 0
    block_params: int = 0
    bypass_params: int = 0  # parameters the bypasses add, plus norm weights they keep in use
    flops_per_token_before: int = 0
    flops_per_token_after: int = 0
    branches: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the content of report.json)."""
        return asdict(self)

    def selection_map(self) -> str:
        """Layers x {attention, ffn}: '#' replaced, 's' slimmed (width-pruned), '.' kept (shows the
        non-contiguous pattern).

        Example:
            >>> Report("m", 0.1, branches=[{"layer": 0, "kind": "ffn", "replaced": True}]).selection_map()
            'layer  attn ffn\\n    0     -   #'
        """
        layers = sorted({b["layer"] for b in self.branches})
        cell = {(b["layer"], b["kind"]): ("s" if b.get("form") == "slim" else "#") if b["replaced"] else "."
                for b in self.branches}
        rows = ["layer  attn ffn"]
        rows += [f"{layer:5d}  {cell.get((layer, 'attention'), '-'):>4} {cell.get((layer, 'ffn'), '-'):>3}"
                 for layer in layers]
        return "\n".join(rows)

    def to_markdown(self) -> str:
        """A human-readable summary (the content of report.md)."""
        lines = [
            f"# subfit_fx report: {self.method}", "",
            f"- sparsity over block parameters: target {self.sparsity_target:.2%}, actual {self.sparsity_actual:.2%}",
            f"- sparsity over all parameters: {self.sparsity_all_params:.2%}",
            f"- parameters: {self.params_before:,} -> {self.params_after:,} (bypasses add {self.bypass_params:,})",
            f"- linear FLOPs per token: {self.flops_per_token_before:,} -> {self.flops_per_token_after:,}",
            f"- KV cache kept: {self.kv_fraction_kept:.2%} (key/value heads over all attention layers)",
            f"- replaced ({len(self.replaced)}): {', '.join(self.replaced) or 'none'}", "",
            "## Selection map (# replaced, s slimmed)", "", "```", self.selection_map(), "```", "",
            "## Branches", "",
        ]
        names = sorted({k for b in self.branches for k in b.get("scores", {})})
        lines.append("| layer | kind | label | params | replaced | form | " + " | ".join(names) + " |")
        lines.append("|---:|---|---|---:|:---:|---|" + "---:|" * len(names))
        for b in self.branches:
            vals = " | ".join(f"{b['scores'][n]:.4g}" if n in b.get("scores", {}) else "" for n in names)
            lines.append(f"| {b['layer']} | {b['kind']} | `{b['label']}` | {b['params']:,} | "
                         f"{'yes' if b['replaced'] else ''} | {b.get('form', '')} | {vals} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def build_report(method: str, target: float, recipe: Any, branches: list[Any], block_params: int,
                 params_before: int, params_after: int, scores: dict[str, dict[str, float]],
                 options: dict[str, Any], notes: list[str] | None = None) -> Report:
    """Assemble the report of one run from the recipe and the accounting.

    Example:
        >>> build_report("m", 0.1, recipe, branches, 100, 200, 180, {}, {})  # doctest: +SKIP
    """
    replaced = set(recipe.replaced_labels())
    forms = {label: r.form for r in recipe.replacements for label in r.labels}
    infos = {label: r.info for r in recipe.replacements for label in r.labels}
    bypass = recipe.bypass_params() + recipe.kept_params(branches)
    removed_branch_params = sum(b.params for b in branches if b.label in replaced)
    attention = [b for b in branches if b.kind == "attention"]
    # a replaced attention has no cache; a slimmed one keeps its kept key/value groups
    kv_kept = sum(1.0 if b.label not in replaced else
                  infos[b.label].get("kept_groups", 0) / infos[b.label].get("groups", 1) for b in attention)
    linear_before = 2 * params_before
    report = Report(
        method=method, sparsity_target=target,
        sparsity_actual=(removed_branch_params - bypass) / block_params,
        sparsity_all_params=(params_before - params_after) / params_before,
        replaced=[b.label for b in branches if b.label in replaced],
        kv_fraction_kept=kv_kept / len(attention) if attention else 1.0,
        params_before=params_before, params_after=params_after, block_params=block_params,
        bypass_params=bypass,
        # 2 FLOPs per weight per token for the matmuls (embedding lookups excluded would be finer;
        # attention-score FLOPs grow with context and are reported by the speed benchmark).
        flops_per_token_before=linear_before, flops_per_token_after=linear_before - 2 * (params_before - params_after),
        options=options, notes=list(notes or []),
    )
    for b in branches:
        entry = {"label": b.label, "kind": b.kind, "layer": b.layer, "params": b.params,
                 "replaced": b.label in replaced, "scores": scores.get(b.label, {})}
        if b.label in replaced:
            entry["form"] = forms[b.label]
            entry["fit"] = infos[b.label]
            if forms[b.label] == "slim":  # the fraction of inner channels (or key/value groups) kept
                entry["kept_ratio"] = len(infos[b.label]["kept"]) / infos[b.label]["channels"]
        report.branches.append(entry)
    return report
