"""subfit_fx as one step of a torch.fx pass pipeline: a user pass before ours, ours, a user pass after.

    python examples/compose_passes.py

Runs offline on a tiny random-init Llama: compress once (the Recipe), then apply it inside a
PassManager between two user passes, and check the result equals running the passes one by one.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_manager import PassManager, pass_result_wrapper

import subfit_fx
from subfit_fx.passes import TagBranchesPass
from subfit_fx.passes.replace_branches import ReplaceBranchesPass
from subfit_fx.zoo import tiny_model


def fold_dropout(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A user pass: eval-mode dropout is the identity, so drop it from the graph."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.dropout.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def temperature(gm: torch.fx.GraphModule, t: float = 0.7) -> torch.fx.GraphModule:
    """A user pass: divide the output logits by a temperature."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(torch.ops.aten.div.Tensor, (out.args[0][0], t))
    out.args = ((scaled,),)
    gm.recompile()
    return gm


def main() -> None:
    model = tiny_model("llama", layers=4)
    calib = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    recipe = subfit_fx.compress(model, calib, 0.25, "subfit", progress=False).recipe

    tag = TagBranchesPass()
    manager = PassManager([pass_result_wrapper(fold_dropout), tag, ReplaceBranchesPass(recipe),
                           pass_result_wrapper(temperature)])
    piped = manager(subfit_fx.capture(model).module()).graph_module

    by_hand = fold_dropout(subfit_fx.capture(model).module())
    by_hand = ReplaceBranchesPass(recipe)(tag(by_hand).graph_module).graph_module
    by_hand = temperature(by_hand)

    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        same = torch.equal(piped(ids, mask), by_hand(ids, mask))
    print(f"branches found: {len(tag.branches)}; replaced: {', '.join(recipe.replaced_labels())}")
    print(f"PassManager result equals the passes run one by one: {same}")
    assert same


if __name__ == "__main__":
    main()
