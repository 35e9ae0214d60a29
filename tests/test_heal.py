"""Healing trains the recipe's bypass tensors against the dense output, and nothing else."""

from __future__ import annotations

import pytest
import torch

import subfit_fx
from subfit_fx.errors import InputError
from subfit_fx.heal import check_heal, heal_recipe, output_loss
from subfit_fx.rewrite import apply_recipe
from subfit_fx.zoo import tiny_model


def _calib(seed: int = 0, batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 128, (4, 16), generator=gen), torch.ones(4, 16, dtype=torch.long))
            for _ in range(batches)]


def _bypassed(arch: str = "llama"):
    """A tiny model and a recipe with bypass tensors (the statistics judge fits them)."""
    torch.manual_seed(0)
    model = tiny_model(arch, hidden=64, layers=4)
    c = subfit_fx.compress(model, _calib(), 0.3, "subfit", judge="statistics", progress=False)
    assert c.recipe.tensors, "the fixture needs bypass tensors"
    return model, c


@pytest.mark.parametrize("arch, causal", [("llama", True), ("bert", False)])
def test_heal_lowers_the_calibration_loss_and_touches_only_recipe_tensors(arch, causal):
    model, c = _bypassed(arch)
    ep = subfit_fx.capture(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    result = heal_recipe(ep, c.recipe, _calib(), causal=causal, epochs=6, lr=1e-3, progress=False)
    assert result.steps == 6 * 3
    assert result.last_epoch_loss < result.first_epoch_loss
    assert set(result.tensors) == set(c.recipe.tensors)
    for key, value in result.tensors.items():
        old = c.recipe.tensors[key]
        assert value.shape == old.shape and value.dtype == old.dtype
    assert any(not torch.equal(result.tensors[k], c.recipe.tensors[k]) for k in result.tensors)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # kept weights never change
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


def test_compress_with_heal_records_it_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=64, layers=4)
    plain = subfit_fx.compress(model, _calib(), 0.3, "subfit", judge="statistics", progress=False)
    healed = subfit_fx.compress(model, _calib(), 0.3, "subfit", judge="statistics", heal=3, heal_lr=1e-3,
                                progress=False)
    # same picks, same parameter count; only the bypass values moved
    assert [r.labels for r in healed.recipe.replacements] == [r.labels for r in plain.recipe.replacements]
    assert healed.report.params_after == plain.report.params_after
    assert healed.recipe.options["heal"] == 3 and healed.recipe.options["heal_lr"] == 1e-3
    assert any(n.startswith("healed: ") for n in healed.report.notes)
    ids, mask = _calib(seed=5, batches=1)[0]
    with torch.no_grad():
        dense = subfit_fx.capture(model).module()(ids, mask)
        out = healed.module()(ids, mask)
        assert not torch.allclose(out, plain.module()(ids, mask))
        healed.save(tmp_path / "c")
        again = subfit_fx.load(tmp_path / "c").module()(ids, mask)
    torch.testing.assert_close(again, out)
    assert dense.shape == out.shape


def test_heal_leaves_a_loaded_recipe_and_its_program_unchanged(tmp_path):
    """A loaded recipe's tensors are the program's parameters (same dtype, no copy): healing
    must train copies."""
    model, c = _bypassed()
    c.save(tmp_path / "c")
    loaded = subfit_fx.load(tmp_path / "c", model=model)
    before = {k: v.clone() for k, v in loaded.recipe.tensors.items()}
    ids, mask = _calib(seed=3, batches=1)[0]
    with torch.no_grad():
        out = loaded.module()(ids, mask)
    result = heal_recipe(subfit_fx.capture(model), loaded.recipe, _calib(), causal=True, epochs=2, lr=1e-3,
                         progress=False)
    assert all(torch.equal(before[k], loaded.recipe.tensors[k]) for k in before)
    assert any(not torch.equal(before[k], result.tensors[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(loaded.module()(ids, mask), out)


def test_heal_zero_and_removal_only_recipes_change_nothing():
    model, c = _bypassed()
    ep = subfit_fx.capture(model)
    assert heal_recipe(ep, c.recipe, _calib(), causal=True, epochs=0, progress=False).tensors == {}
    removal = subfit_fx.compress(model, _calib(), 0.3, method="shortgpt", heal=2, progress=False)
    assert not removal.recipe.tensors
    assert "heal: the recipe has no bypass tensors to train" in removal.report.notes
    # the recipe applied again gives the same program outputs
    ids, mask = _calib(seed=2, batches=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(apply_recipe(ep, removal.recipe).module()(ids, mask),
                                   removal.module()(ids, mask))


def test_output_loss_is_zero_only_for_equal_outputs_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    mask = torch.ones(2, 5)
    for causal in (True, False):
        assert float(output_loss(a, a, mask, causal)) == pytest.approx(0.0, abs=1e-7)
        assert float(output_loss(b, a, mask, causal)) > 0.0
    mask[1, 3:] = 0
    c = a.clone()
    c[1, 3:] = 100.0  # only padded positions differ
    assert float(output_loss(c, a, mask, True)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("epochs, lr, message", [(-1, 1e-4, "heal=-1"), (1.5, 1e-4, "heal=1.5"),
                                                 (True, 1e-4, "heal=True"), (1, 0.0, "heal_lr=0.0"),
                                                 (1, "x", "heal_lr='x'")])
def test_check_heal_names_the_fix(epochs, lr, message):
    with pytest.raises(InputError, match=message):
        check_heal(epochs, lr)


def test_heal_with_offloaded_weights_is_refused_before_any_work():
    with pytest.raises(InputError, match="heal trains through the whole model"):
        subfit_fx.compress("builtin:llama", _calib(), 0.25, method="llm-drop", offload_weights=True, heal=1,
                           progress=False)
