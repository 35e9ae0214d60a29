"""Parameter-budgeted, non-contiguous greedy selection (METHOD.md "Sparsity accounting").

sparsity = (params of replaced branches - params of bypasses) / params of all blocks.

Example:
    >>> cands = [Candidate("a", 0.1, 100, 10), Candidate("b", 0.5, 100, 10), Candidate("c", 0.2, 50, 0)]
    >>> select(cands, block_params=1000, target=0.1)
    ['a', 'c']
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from subfit_fx.errors import InputError

__all__ = ["BUDGET_TOLERANCE", "Candidate", "check_sparsity", "repair_overshoot", "select", "sparsity_of"]

BUDGET_TOLERANCE = 0.015  # net block sparsity a selection may land away from its target


@dataclass(frozen=True)
class Candidate:
    """A replaceable branch: its score (damage), its parameters and its bypass's parameters.
    `group` names a one-time cost (e.g. a shared FFN basis) paid when the first member is chosen."""

    label: Hashable  # the candidate's id: a branch label, or e.g. a (label, form) choice
    score: float
    params: int
    bypass_params: int
    group: str | None = None
    branch: str | None = None  # candidates of one branch (alternative forms) exclude each other

    @property
    def key(self) -> str:
        """The branch this candidate replaces."""
        return self.branch or self.label

    @property
    def saved(self) -> int:
        """Net parameters saved by replacing this branch (group cost not included)."""
        return self.params - self.bypass_params


def check_sparsity(sparsity: object) -> float:
    """Validate a target sparsity: a number with 0 < s < 0.9.

    Example:
        >>> check_sparsity("0.25")
        0.25
    """
    try:
        value = float(sparsity)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"sparsity {sparsity!r} is not a number; pass a fraction such as 0.25") from None
    if not 0.0 < value < 0.9:
        raise InputError(f"sparsity {value} is out of range; pass a fraction with 0 < sparsity < 0.9 "
                         "(e.g. 0.25 for 25 % of block parameters)")
    return value


def sparsity_of(chosen: list[Candidate], block_params: int, group_costs: dict[str, int] | None = None) -> float:
    """Net sparsity of a selection, group costs included once per group used.

    Example:
        >>> sparsity_of([Candidate("a", 0, 100, 10, "g")], 1000, {"g": 40})
        0.05
    """
    groups = {c.group for c in chosen if c.group}
    cost = sum((group_costs or {}).get(g, 0) for g in groups)
    return (sum(c.saved for c in chosen) - cost) / block_params


def select(candidates: list[Candidate], block_params: int, target: float,
           group_costs: dict[str, int] | None = None, already: list[Candidate] | None = None,
           limit: int | None = None, tolerance: float = BUDGET_TOLERANCE) -> list[str]:
    """Greedy by score per net parameter saved, until the net sparsity reaches `target` (the
    last choice overshoots by less than one branch). `already` chosen candidates count toward the
    budget; `limit` caps how many are added in this call (for re-scoring every k choices).

    The last choice is budget-aware: once the greedy pick would reach the target, any candidate
    that also reaches it competes on its score alone (its total damage), because the parameters
    it saves beyond the target buy nothing. A big branch that is cheap per parameter then loses
    to a small one that just closes the gap. A selection that still overshoots by more than
    `tolerance` (net sparsity) is repaired by swapping one pick for up to two other candidates
    when that lands within it (unless `limit` is set: a partial selection is not final).

    Example:
        >>> select([Candidate("a", 0.3, 10, 0), Candidate("b", 0.1, 10, 0)], 100, 0.1)
        ['b']
        >>> select([Candidate("big", 0.5, 60, 0), Candidate("small", 0.2, 20, 0)], 100, 0.1)
        ['small']
    """
    group_costs = group_costs or {}
    chosen = list(already or [])
    picked: list[str] = []
    taken = {a.key for a in chosen}
    pool = [c for c in candidates if c.saved > 0 and c.key not in taken]

    def cost_rate(c: Candidate) -> float:
        used = {a.group for a in chosen}
        extra = group_costs.get(c.group, 0) if c.group and c.group not in used else 0
        net = c.saved - extra
        return c.score / net if net > 0 else float("inf")

    while pool and sparsity_of(chosen, block_params, group_costs) < target:
        if limit is not None and len(picked) >= limit:
            break
        best = min(pool, key=lambda c: (cost_rate(c), c.label))
        if cost_rate(best) == float("inf"):
            break
        if sparsity_of([*chosen, best], block_params, group_costs) >= target:
            closing = [c for c in pool if cost_rate(c) < float("inf")
                       and sparsity_of([*chosen, c], block_params, group_costs) >= target]
            best = min(closing, key=lambda c: (c.score, cost_rate(c), c.label))
        chosen.append(best)
        picked.append(best.label)
        pool = [c for c in pool if c.key != best.key]
    if limit is None:
        picked = repair_overshoot(chosen, picked, pool, block_params, target, group_costs, tolerance)
    return picked


def repair_overshoot(chosen: list[Candidate], picked: list[str], pool: list[Candidate], block_params: int,
                      target: float, group_costs: dict[str, int] | None = None,
                      tolerance: float = BUDGET_TOLERANCE) -> list[str]:
    """Honest budgets: when the greedy selection overshoots the target by more than `tolerance`,
    swap one of this call's picks for up to two unchosen candidates so that the net sparsity lands
    within `tolerance` of the target (at or above it where possible, never under 90 % of it), at
    the least added damage.
    Unchanged when no swap lands there. Returns the new `picked` labels.

    Example:
        >>> a, b, c = Candidate("ffn", 0.1, 50, 0), Candidate("x", 0.2, 20, 0), Candidate("y", 0.3, 20, 0)
        >>> repair_overshoot([a], ["ffn"], [b, c], 100, 0.2, tolerance=0.05)
        ['x']
    """
    group_costs = group_costs or {}
    reached = sparsity_of(chosen, block_params, group_costs)
    if reached - target <= tolerance:
        return picked
    mine = [c for c in chosen if c.label in picked]
    best: tuple[tuple[bool, float], list[Candidate]] | None = None
    for out in mine:
        rest = [c for c in chosen if c is not out]
        options = [c for c in pool if c.key != out.key and c.saved > 0]
        combos: list[list[Candidate]] = [[]] + [[c] for c in options]
        combos += [[a, b] for i, a in enumerate(options) for b in options[i + 1:] if a.key != b.key]
        for add in combos:
            s = sparsity_of(rest + add, block_params, group_costs)
            if max(target - tolerance, 0.9 * target) <= s <= target + tolerance:
                cost = (s < target, sum(c.score for c in add) - out.score)
                if best is None or cost < best[0]:
                    best = (cost, add)
                    best_out = out
    if best is None:
        return picked
    return [label for label in picked if label != best_out.label] + [c.label for c in best[1]]
