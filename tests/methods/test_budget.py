"""Honest budgets: on a model with 12 layers every method lands within 1.5 points of the target
block sparsity (METHOD.md "Sparsity accounting"), or, where its granularity cannot, at the nearest
achievable sparsity above the target and says so in the report."""

from __future__ import annotations

import pytest
import torch

import subfit_fx
from subfit_fx.methods import METHODS
from subfit_fx.zoo import tiny_model

CALIB = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama12():
    torch.manual_seed(0)
    return tiny_model("llama", layers=12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lands_within_one_and_a_half_points(llama12, method):
    options = {"eval_batches": 1} if method == "blockpruner" else {}
    c = subfit_fx.compress(llama12, CALIB, 0.25, method, progress=False, **options)
    actual = c.report.sparsity_actual
    assert abs(actual - 0.25) <= 0.015, (method, actual, c.report.notes)


def test_a_method_that_cannot_land_near_the_target_says_so():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4)  # one layer is 25 % of the blocks
    c = subfit_fx.compress(model, CALIB, 0.15, "shortgpt", progress=False)
    assert c.report.sparsity_actual == pytest.approx(0.25)
    assert any(n.startswith("budget: landed at 25.00% for a 15.00% target") for n in c.report.notes)
