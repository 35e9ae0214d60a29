from __future__ import annotations

import pytest
import torch

from subfit_fx import find_branches
from subfit_fx.calibrate import prepare
from subfit_fx.capture import HFWrapper
from tests.conftest import captured


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gpt_neox"])
def test_observers_leave_outputs_bitwise_equal(arch, tokens):
    model, ep = captured(arch)
    session = prepare(ep, progress=False)
    ids, mask = tokens
    for probe in session._probes.values():
        probe.start_observing(("normalized", "stream"))
    with torch.no_grad():
        assert torch.equal(session.forward(tokens), HFWrapper(model)(ids, mask))
    assert all(int(p.stop_observing().tokens) == int(mask.sum()) for p in session._probes.values())


def test_padding_and_first_token_are_excluded(tokens):
    _, ep = captured("llama")
    ids, mask = tokens
    stats = prepare(ep, progress=False).calibrate([tokens], desc=None)
    assert all(int(s.tokens) == int(mask.sum()) for s in stats.values())
    stats = prepare(ep, skip_first=True, progress=False).calibrate([tokens], desc=None)
    assert all(int(s.tokens) == int(mask.sum()) - ids.shape[0] for s in stats.values())


def test_calibration_of_two_batches_equals_one_concatenated_batch():
    _, ep = captured("qwen2")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (4, 10), generator=gen)
    mask = torch.ones_like(ids)
    session = prepare(ep, progress=False)
    one = session.calibrate([(ids, mask)], desc=None)
    two = session.calibrate([(ids[:2], mask[:2]), (ids[2:], mask[2:])], desc=None)
    for label in one:
        for key, value in one[label].tensors().items():
            torch.testing.assert_close(two[label].tensors()[key], value, rtol=1e-9, atol=1e-8)


def test_replacement_switch_changes_and_restores_output(tokens):
    _, ep = captured("llama")
    session = prepare(ep, progress=False)
    label = find_branches(ep)[1].label
    from subfit_fx.fit import removal

    dense = session.forward(tokens)
    session.set_replacement(label, removal(torch.eye(65, dtype=torch.float64), 0.0, 64))
    assert not torch.equal(session.forward(tokens), dense)
    session.clear_replacements()
    assert torch.equal(session.forward(tokens), dense)
