"""Properties over random tiny configurations of several architecture families: two branches per
layer, W = 0 bypass equals removal, transparent observers, and bitwise save -> load round trips."""

from __future__ import annotations

import tempfile

import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import subfit_fx
from subfit_fx import capture, find_branches, prepare
from subfit_fx.recipe import Recipe, Replacement, branch_records
from subfit_fx.rewrite import apply_recipe
from subfit_fx.zoo import tiny_model

ARCHS = ("llama", "gpt2", "bert", "qwen2", "opt", "gpt_neox")
# (arch, hidden, layers, seed); hidden is divisible by the zoo's 4 heads
CONFIGS = st.tuples(st.sampled_from(ARCHS), st.sampled_from((32, 48, 64)), st.integers(2, 4), st.integers(0, 3))
# Every example captures a model (seconds): no example database and no shrinking (the space is small
# and the failing configuration is reported as drawn).
SETTINGS = settings(max_examples=5, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _batch(seed: int, batch: int = 2, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (the zoo's vocabulary is 128) with two left-padding positions in row 0."""
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _zero_and_removal(branches, labels: list[str]) -> tuple[Recipe, Recipe]:
    width = branches[0].width
    records = branch_records(branches)
    removed = Recipe("t", records, [Replacement((label,), "remove") for label in labels])
    zero = Recipe("t", records, [Replacement((label,), "bypass", "linear", "normalized", [("w", "b")])
                                 for label in labels],
                  tensors={"w": torch.zeros(width, width), "b": torch.zeros(width)})
    return removed, zero


@SETTINGS
@given(config=CONFIGS, picks=st.lists(st.integers(0, 7), min_size=1, max_size=8))
@example(config=("opt", 32, 2, 0), picks=[1])  # OPT flattens tokens before its FFN (padding regression)
def test_capture_branches_zero_bypass_and_observers(config, picks):
    """One capture per example (the expensive part) serves three properties."""
    arch, hidden, layers, seed = config
    ep = capture(tiny_model(arch, hidden=hidden, layers=layers, seed=seed))
    ids, mask = _batch(seed)
    with torch.no_grad():
        dense = ep.module()(ids, mask)

    # 1. two residual branches per layer: one attention, one FFN, all as wide as the stream
    branches = find_branches(ep)
    assert len(branches) == 2 * layers
    kinds = sorted((b.layer, b.kind) for b in branches)
    assert kinds == [(i, k) for i in range(layers) for k in ("attention", "ffn")]
    assert all(b.width == hidden for b in branches)

    # 2. a bypass with W = 0 computes exactly what removing the branch computes
    chosen = list(dict.fromkeys(branches[i % len(branches)].label for i in picks))
    removed, zero = _zero_and_removal(branches, chosen)
    with torch.no_grad():
        a = apply_recipe(ep, removed).module()(ids, mask)
        b = apply_recipe(ep, zero).module()(ids, mask)
    assert torch.equal(a, b)
    assert not torch.equal(a, dense), "replacing branches of a random model must change its outputs"

    # 3. observers on every branch leave the outputs bitwise unchanged and see every real token
    session = prepare(ep, branches, progress=False)
    for probe in session._probes.values():
        probe.start_observing(("normalized", "stream"))
    with torch.no_grad():
        observed = session.forward((ids, mask))
    tokens = {label: int(probe.stop_observing().tokens) for label, probe in session._probes.items()}
    assert torch.equal(observed, dense), f"{arch}: observers changed the outputs"
    assert tokens == dict.fromkeys(tokens, int(mask.sum())), "statistics must count real tokens, not padding"


@SETTINGS
@given(config=CONFIGS, sparsity=st.sampled_from((0.1, 0.25, 0.4)))
def test_save_then_load_is_bitwise_identical(config, sparsity):
    arch, hidden, layers, seed = config
    model = tiny_model(arch, hidden=hidden, layers=layers, seed=seed)
    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    compressed = subfit_fx.compress(model, calib, sparsity, progress=False)
    assert compressed.recipe.replacements, "nothing was replaced: the round trip would be vacuous"
    with tempfile.TemporaryDirectory() as tmp:
        compressed.save(f"{tmp}/out")
        loaded = subfit_fx.load(f"{tmp}/out", model=model)

    assert [r.labels for r in loaded.recipe.replacements] == [r.labels for r in compressed.recipe.replacements]
    assert sorted(loaded.recipe.tensors) == sorted(compressed.recipe.tensors)
    for key, tensor in loaded.recipe.tensors.items():  # saved as float32 (fits are float64 in memory)
        assert torch.equal(tensor, compressed.recipe.tensors[key].to(tensor.dtype)), key
    assert sorted(loaded.program.state_dict) == sorted(compressed.program.state_dict)
    ids, mask = _batch(seed + 1)
    with torch.no_grad():
        assert torch.equal(loaded.module()(ids, mask), compressed.module()(ids, mask))
