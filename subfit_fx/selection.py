"""Parameter-budgeted, non-contiguous greedy selection (METHOD.md "Sparsity accounting").

sparsity = (params of replaced branches - params of bypasses) / params of all blocks.

Example:
    >>> cands = [Candidate("a", 0.1, 100, 10), Candidate("b", 0.5, 100, 10), Candidate("c", 0.2, 50, 0)]
    >>> select(cands, block_params=1000, target=0.1)
    ['a', 'c']
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from subfit_fx.errors import InputError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BUDGET_TOLERANCE", "Candidate", "check_sparsity", "repair_overshoot", "select", "select_jointly",
           "sparsity_of"]

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
    covers: tuple[str, ...] = ()  # every branch it replaces, when more than `key` (a span of layers)

    @property
    def key(self) -> str:
        """The branch this candidate replaces (the first one, for a span)."""
        return self.branch or self.label

    @property
    def keys(self) -> frozenset:
        """Every branch this candidate replaces: candidates that share one exclude each other."""
        return frozenset(self.covers or (self.key,))

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
    taken = frozenset().union(*(a.keys for a in chosen))
    pool = [c for c in candidates if c.saved > 0 and not c.keys & taken]

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
        pool = [c for c in pool if not c.keys & best.keys]
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
        taken = frozenset().union(*(c.keys for c in rest))
        options = [c for c in pool if c.key != out.key and c.saved > 0 and not c.keys & taken]
        combos: list[list[Candidate]] = [[]] + [[c] for c in options]
        combos += [[a, b] for i, a in enumerate(options) for b in options[i + 1:] if not a.keys & b.keys]
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


def select_jointly(candidates: list[Candidate], block_params: int, target: float,
                   group_costs: dict[str, int] | None = None, tolerance: float = BUDGET_TOLERANCE,
                   resolution: int = 4096, order: Sequence[str] | None = None) -> list[Hashable]:
    """At most one candidate per branch (`Candidate.key`: keep it, or one of its options: a fit,
    removal, a slimming level...) so that the net sparsity lands in [target, target + tolerance]
    at the least total damage (sum of scores): a multiple-choice knapsack, solved exactly by
    dynamic programming over the parameters saved in units of 1/`resolution` of the budget
    (saved parameters are rounded down, so the real sparsity is never below what was planned).
    A candidate that covers a run of branches (a span map, `Candidate.covers`) excludes every
    option of those branches: with the branches in model `order` (required then; a span's branches
    must be consecutive in it) the program walks the branches in order and a span jumps over its
    run, so spans stay exact too. A group cost (a shared FFN basis) is handled by solving with and
    without the group and keeping the better. Where no choice lands in the window (coarse
    options), the choice nearest under the target within `tolerance` (and 90 % of it) is taken,
    as `repair_overshoot` does, else the least damage above the window, else the most saved.

    With integer parameter counts below `resolution` the solution is optimal, so it never costs
    more damage than the greedy `select` whose selection lies in the same window.

    Example:
        >>> cands = [Candidate("a", 0.1, 60, 0), Candidate("b", 0.3, 60, 0),
        ...          Candidate(("c", 1), 0.2, 30, 0, branch="c"), Candidate(("c", 2), 0.35, 50, 0, branch="c")]
        >>> select_jointly(cands, 100, 0.5, tolerance=0.2)
        ['a']
        >>> select_jointly(cands, 100, 0.9, tolerance=0.2)
        [('c', 1), 'a']
        >>> span = Candidate(("a", "span"), 0.25, 120, 10, branch="a", covers=("a", "b"))
        >>> select_jointly([*cands, span], 100, 1.0, tolerance=0.2, order=["a", "b", "c"])
        [('a', 'span')]
    """
    import numpy as np

    group_costs = group_costs or {}
    seq = _branch_sequence(candidates, order)
    position = {label: i for i, label in enumerate(seq)}
    budget = target * block_params
    best: tuple[tuple[int, float], list[Hashable]] | None = None
    groups = sorted({c.group for c in candidates if c.group})
    for used in [frozenset(), *([frozenset(groups)] if groups else [])]:
        pool = [c for c in candidates if c.saved > 0 and (c.group is None or c.group in used)]
        extra = sum(group_costs.get(g, 0) for g in used)
        need = budget + extra
        unit = max(1.0, need / resolution)
        low, high = int(np.ceil(need / unit - 1e-9)), int((need + tolerance * block_params) // unit)
        biggest = max((int(c.saved // unit) for c in pool), default=0)
        cap = max(high, low + biggest)
        starting: dict[int, list[int]] = {}
        for j, c in enumerate(pool):
            starting.setdefault(position[c.covers[0] if c.covers else c.key], []).append(j)
        # dp[i]: least damage per saved state over the first i branches of `seq`; arg[i]: how
        # each state was reached (-1: branch i-1 kept, else the pool index of the last choice)
        dp = np.full((len(seq) + 1, cap + 1), np.inf)
        arg = np.full((len(seq) + 1, cap + 1), -2)
        dp[0, 0] = 0.0
        for i in range(len(seq)):
            _relax(dp[i + 1], arg[i + 1], dp[i], -1)
            for j in starting.get(i, []):
                size = int(pool[j].saved // unit)
                if size <= 0 or size > cap:
                    continue
                shifted = np.full(cap + 1, np.inf)
                shifted[size:] = dp[i, :-size] + pool[j].score
                _relax(dp[i + len(pool[j].keys)], arg[i + len(pool[j].keys)], shifted, j)
        final = dp[len(seq)]
        states, reachable = np.arange(cap + 1), np.isfinite(final)
        below = max(need - tolerance * block_params, 0.9 * need) / unit
        above = reachable & (states >= low) & (states <= high)
        under = reachable & (states >= below) & (states < low)
        if above.any():  # in [target, target + tolerance]: the least damage
            state = int(np.flatnonzero(above)[np.argmin(final[above])])
        elif under.any():  # else just under the target, as near as possible
            nearest = states == np.flatnonzero(under).max()
            state = int(np.flatnonzero(nearest)[0])
        elif (reachable & (states >= low)).any():  # else the least damage above the window
            over = reachable & (states >= low)
            state = int(np.flatnonzero(over)[np.argmin(final[over])])
        else:
            state = int(np.flatnonzero(reachable)[-1])
        picks, i = [], len(seq)
        while i > 0:
            how = int(arg[i][state])
            if how == -1:
                i -= 1
                continue
            picks.append(pool[how])
            state -= int(pool[how].saved // unit)
            i -= len(pool[how].keys)
        chosen_groups = {c.group for c in picks if c.group}
        if chosen_groups != set(used):  # the group was paid for but not used: the other solve covers it
            continue
        reached = sparsity_of(picks, block_params, group_costs)
        inside = target <= reached <= target + tolerance + 1e-12
        near = max(target - tolerance, 0.9 * target) <= reached < target
        rank = (0 if inside else 1 if near else 2 if reached >= target else 3,
                -reached if near or reached < target else sum(c.score for c in picks))
        if best is None or rank < best[0]:
            best = (rank, [c.label for c in sorted(picks, key=lambda c: str(c.label))])
    return best[1] if best is not None else []


def _relax(dp: np.ndarray, arg: np.ndarray, values: np.ndarray, how: int) -> None:
    """Where `values` beats `dp`, take it and record `how` it was reached (in place)."""
    better = values < dp
    dp[better], arg[better] = values[better], how


def _branch_sequence(candidates: list[Candidate], order: Sequence[str] | None) -> list[str]:
    """The branches of `candidates` in the order the knapsack walks them: `order` where given
    (a span's branches must be consecutive in it), else sorted (no spans allowed then)."""
    labels = {label for c in candidates for label in c.keys}
    if order is None:
        if any(c.covers for c in candidates):
            raise ValueError("candidates that cover a run of branches (spans) need order=[every branch, in "
                             "model order]")
        return sorted(labels, key=str)
    missing = labels - set(order)
    if missing:
        raise ValueError(f"order lacks branches of the candidates: {sorted(missing, key=str)}")
    seq = [label for label in order if label in labels]
    position = {label: i for i, label in enumerate(seq)}
    for c in candidates:
        if c.covers and [position[label] for label in c.covers] != list(
                range(position[c.covers[0]], position[c.covers[0]] + len(c.covers))):
            raise ValueError(f"candidate {c.label!r} covers branches that are not consecutive in order")
    return seq
