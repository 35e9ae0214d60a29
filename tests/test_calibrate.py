"""Session.output_sensitivity: the output metric of each branch, checked against what a small change
of the branch output really does at the model's output."""

from __future__ import annotations

import pytest
import torch

import subfit_fx
from subfit_fx.calibrate import prepare
from subfit_fx.zoo import tiny_model


def _batches(n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 120, (4, 16), generator=gen), torch.ones(4, 16, dtype=torch.long)) for _ in range(n)]


def _shifted(model: torch.nn.Module, module: str, shift: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's output with `shift` added to `module`'s output at every token."""
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _a, out: out + shift)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_output_sensitivity_predicts_the_output_change_of_the_last_branch(arch):
    # the last FFN reaches the output token by token, so to second order a constant change d of its
    # output costs d^T F d / 2 nats of KL per token (causal LM) or d^T F d of squared output change
    torch.manual_seed(0)
    model = tiny_model(arch, layers=2).eval()
    session = prepare(subfit_fx.capture(model), progress=False)
    label = [b.label for b in session.branches if b.kind == "ffn"][-1]
    batches = _batches(8, 1)
    fisher = sum(session.output_sensitivity(batches, [label], causal=arch == "llama", seed=s)[label]
                 for s in range(8)) / 8
    direction = torch.randn(fisher.shape[0], generator=torch.Generator().manual_seed(2))
    shift = 1e-2 * direction / direction.norm()
    ids = torch.cat([ids for ids, _ in batches])
    module = label if arch == "llama" else label.replace("intermediate+output", "output.dense")  # BERT's branch end
    dense, moved = _shifted(model, module, torch.zeros_like(shift), ids), _shifted(model, module, shift, ids)
    if arch == "llama":
        logp, logq = torch.log_softmax(dense.double(), -1), torch.log_softmax(moved.double(), -1)
        measured = float((logp.exp() * (logp - logq)).sum(-1).mean())
        predicted = 0.5 * float(shift.double() @ fisher @ shift.double())
    else:
        measured = float(((moved - dense).double() ** 2).sum(-1).mean())
        predicted = float(shift.double() @ fisher @ shift.double())
    assert measured > 0
    assert 0.8 < predicted / measured < 1.25


def test_output_sensitivity_leaves_the_session_as_it_was():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=2).eval()
    session = prepare(subfit_fx.capture(model), progress=False)
    batch = _batches(1, 3)[0]
    before = session.forward(batch)
    mask = batch[1].clone()
    mask[1, 10:] = 0  # padding counts no token and moves nothing
    fisher = session.output_sensitivity([(batch[0], mask)], causal=True)
    assert set(fisher) == {b.label for b in session.branches}
    assert all(torch.isfinite(f).all() and f.trace() > 0 for f in fisher.values())
    assert all(torch.allclose(f, f.T) for f in fisher.values())
    assert torch.equal(session.forward(batch), before)
    assert not session.forward(batch).requires_grad
