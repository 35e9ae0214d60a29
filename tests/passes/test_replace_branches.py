from __future__ import annotations

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager, pass_result_wrapper

import subfit_fx
from subfit_fx.errors import RecipeMismatchError
from subfit_fx.passes import TagBranchesPass
from subfit_fx.passes.replace_branches import ReplaceBranchesPass
from subfit_fx.zoo import tiny_model
from tests.conftest import captured


@pytest.fixture(scope="module")
def compressed():
    model = tiny_model("llama", layers=4)
    return model, subfit_fx.compress(model, torch.randint(3, 128, (8, 16)), 0.3, "subfit", progress=False)


def test_pass_equals_program_rewrite(compressed, tokens):
    model, c = compressed
    result = PassManager([ReplaceBranchesPass(c.recipe)])(subfit_fx.capture(model).module())
    gm = result.graph_module
    with torch.no_grad():
        assert torch.equal(gm(*tokens), c.module()(*tokens))
    assert sum(p.numel() for p in gm.parameters()) == c.report.params_after


def test_pass_composes_with_user_passes(compressed, tokens):
    """A user pass before and after ours gives the same result as running them one by one."""
    model, c = compressed

    def scale_logits(gm: torch.fx.GraphModule):  # a user's own pass: logits * 2 at the output
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (out.args[0][0], 2.0))
        out.args = ((doubled,),)
        gm.recompile()
        return gm

    tag = TagBranchesPass()
    manager = PassManager([tag, ReplaceBranchesPass(c.recipe), pass_result_wrapper(scale_logits)])
    managed = manager(subfit_fx.capture(model).module())
    one_by_one = scale_logits(ReplaceBranchesPass(c.recipe)(tag(subfit_fx.capture(model).module()).graph_module)
                              .graph_module)
    with torch.no_grad():
        assert torch.equal(managed.graph_module(*tokens), one_by_one(*tokens))
        assert torch.equal(managed.graph_module(*tokens), 2 * c.module()(*tokens))


def test_mismatched_recipe_leaves_module_untouched(compressed):
    _, c = compressed
    _, ep = captured("gpt2")
    gm = ep.module()
    before = [n.name for n in gm.graph.nodes]
    with pytest.raises(RecipeMismatchError):
        ReplaceBranchesPass(c.recipe)(gm)
    assert [n.name for n in gm.graph.nodes] == before


def test_compose_example_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "compose_passes.py"), run_name="__main__")
