from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subfit_fx.errors import InputError
from subfit_fx.selection import Candidate, check_sparsity, select, sparsity_of


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(10, 1000), st.integers(0, 9)), min_size=1, max_size=12),
       st.floats(0.01, 0.8))
def test_greedy_reaches_target_within_one_branch(items, target):
    cands = [Candidate(f"b{i}", s, p, b) for i, (s, p, b) in enumerate(items)]
    block = sum(c.params for c in cands)
    chosen = [c for c in cands if c.label in select(cands, block, target)]
    actual = sparsity_of(chosen, block)
    if actual < target:  # only when every candidate is used
        assert len(chosen) == len(cands)
    else:
        assert actual - target < max(c.saved for c in chosen) / block + 1e-12


def test_group_cost_is_paid_once():
    cands = [Candidate("a", 0.1, 100, 10, "g"), Candidate("b", 0.1, 100, 10, "g")]
    assert sparsity_of(cands, 1000, {"g": 50}) == pytest.approx((180 - 50) / 1000)


@pytest.mark.parametrize("bad", ["abc", 0, -0.1, 0.9, 1.5, None])
def test_bad_sparsity(bad):
    with pytest.raises(InputError):
        check_sparsity(bad)
