"""Fuzzing a compressed directory: every mutation of recipe.json (any field, set, deleted or extended),
of the weights (shapes, ranks, dtypes, NaN / Inf / huge values, missing or extra tensors) and of
report.json either loads and evaluates to a correct, finite result, or fails as the CLI fails: exit
2, one line. Never a traceback (run_guarded re-raises anything that is not a user error), never
exit 0 with garbage."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import subfit_fx
from subfit_fx.cli import run_guarded
from subfit_fx.methods.layers import Layer, span_replacement
from subfit_fx.schema import dumps
from subfit_fx.zoo import tiny_model
from tests.fixtures_reliability import read_recipe_tensors, write_recipe_tensors

_compress_module = sys.modules["subfit_fx.compress"]  # `subfit_fx.compress` is also the function's name

LABELS = [f"model.layers.{i}.{kind}" for i in range(4) for kind in ("self_attn", "mlp")]
WORDS = ["remove", "bypass", "linear", "lowrank", "shared", "normalized", "stream", "attention", "ffn",
         "subfit-fx-recipe/1", "shared0.weight", "r0.0.weight", "r0.1.bias", "", *LABELS]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 70), st.just(10**9),
    st.sampled_from([0.5, -1.0, 0.0, 1e308, math.nan, math.inf, -math.inf]),
    st.sampled_from(WORDS), st.text(max_size=4),
    st.lists(st.sampled_from(WORDS), max_size=2), st.lists(st.integers(0, 64), max_size=3),
    st.just({}), st.just({"label": LABELS[0]}),
)


class _Base:
    """The valid directory and what it evaluates to, built once per module."""

    def __init__(self, root: Path) -> None:
        self.model = tiny_model("llama", hidden=32, layers=4)
        calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
        compressed = subfit_fx.compress(self.model, calib, 0.5, "subfit", judge="statistics", progress=False)
        recipe = compressed.recipe
        # a removed span (whole layer 0) next to the single-branch bypasses: every kind of replacement
        recipe.replacements = [span_replacement([Layer(0, tuple(LABELS[:2]), 0)]),
                               *[r for r in recipe.replacements if not set(r.labels) & set(LABELS[:2])]]
        self.dir = root / "base"
        compressed.save(self.dir)
        self.ep = subfit_fx.capture(self.model)
        self.ids = calib[:2, :16]
        self.recipe = json.loads((self.dir / "recipe.json").read_text())
        assert {r["action"] for r in self.recipe["replacements"]} == {"remove", "bypass"}
        assert {r["form"] for r in self.recipe["replacements"]} >= {"remove", "lowrank", "shared"}
        self.report = json.loads((self.dir / "report.json").read_text())
        self.tensors = read_recipe_tensors(self.dir)
        self.logits = self.run(self.dir)[1]

    def run(self, directory: Path) -> tuple[int, torch.Tensor | None, str]:
        """(exit code, logits, stderr) of loading and evaluating `directory` the way the CLI does."""
        out: dict[str, object] = {}

        def body() -> int:
            loaded = subfit_fx.load(directory, model=self.model)
            with torch.no_grad():
                logits = loaded.module()(self.ids, torch.ones_like(self.ids))
            dumps({"mean_logit": logits.double().mean().item()}, "evaluation result")  # what eval prints
            out["loaded"], out["logits"] = loaded, logits
            return 0

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run_guarded(body, [])
        out["code"] = code
        self.last = out
        return code, out.get("logits"), err.getvalue()


@pytest.fixture(scope="module")
def base():
    root = Path(tempfile.mkdtemp(prefix="subfit-fuzz-"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            built = _Base(root)
            # one capture serves every example (load() only reads it: apply_recipe copies)
            mp.setattr(_compress_module, "capture", lambda model: built.ep)
            yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _paths(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every field path of a JSON document (containers and leaves), root excluded."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _edit_json(draw, doc: dict) -> tuple[dict, tuple]:
    """Set, delete or extend one field of a copy of `doc`; returns the copy and the path."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from(_paths(doc)))
    *parents, last = path
    parent = doc
    for key in parents:
        parent = parent[key]
    op = draw(st.sampled_from(["set", "delete", "extend"]))
    if op == "delete":
        del parent[last]
    elif op == "extend" and isinstance(parent[last], list):
        parent[last].append(draw(JSON_VALUES) if draw(st.booleans()) else json.loads(json.dumps(parent[last][0]))
                            if parent[last] else None)
    elif op == "extend" and isinstance(parent[last], dict):
        parent[last][draw(st.sampled_from(WORDS))] = draw(JSON_VALUES)
    else:
        parent[last] = draw(JSON_VALUES)
    return doc, path


TENSOR_OPS = {
    "nan": lambda t: t.index_fill(0, torch.tensor([0]), math.nan),
    "inf": lambda t: t.index_fill(0, torch.tensor([0]), -math.inf),
    "huge": lambda t: t * 1e30,
    "transpose": lambda t: t.T.contiguous() if t.dim() == 2 else t,
    "add-dim": lambda t: t[None].contiguous(),
    "flatten": lambda t: t.flatten(),
    "drop-row": lambda t: t[:-1].contiguous(),
    "int32": lambda t: t.to(torch.int32),
    "float16": lambda t: t.to(torch.float16),
    "bfloat16": lambda t: t.to(torch.bfloat16),
    "float64": lambda t: t.to(torch.float64),
    "other-values": lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 0.01,
}


@settings(max_examples=90, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_directory_loads_correctly_or_fails_with_one_line(base, data):
    draw = data.draw
    target = draw(st.sampled_from(["recipe", "recipe", "tensor", "report"]))
    recipe, report, tensors = base.recipe, base.report, dict(base.tensors)
    inert = False  # a mutation that must not change the model's output
    if target == "recipe":
        recipe, path = _edit_json(draw, recipe)
        inert = path[0] in ("method", "base_model", "options") or path[0::2][:2] == ("replacements", "info")
    elif target == "report":
        report, _ = _edit_json(draw, report)
        inert = True
    else:
        key = draw(st.sampled_from([*sorted(tensors), "<missing>", "<extra>"]))
        if key == "<missing>":
            del tensors[draw(st.sampled_from(sorted(tensors)))]
        elif key == "<extra>":
            tensors["stray.weight"] = torch.zeros(2, 2)
        else:
            tensors[key] = TENSOR_OPS[draw(st.sampled_from(sorted(TENSOR_OPS)))](tensors[key])
            if draw(st.booleans()):  # recipe.json follows the new shape: only the file's own checks remain
                recipe = {**recipe, "tensors": {**recipe["tensors"], key: list(tensors[key].shape)}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "c"
        shutil.copytree(base.dir, directory)
        (directory / "recipe.json").write_text(json.dumps(recipe))  # NaN / Infinity written as Python does
        (directory / "report.json").write_text(json.dumps(report))
        write_recipe_tensors(directory, tensors)
        code, logits, err = base.run(directory)

    event(f"{target}: exit {code}{' (inert)' if inert and code == 0 else ''}")
    assert code in (0, 2), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("subfit-fx: error: "), err
        assert "Traceback" not in err
        return
    assert err == ""
    assert logits.shape == base.logits.shape and torch.isfinite(logits).all()
    if inert:
        assert torch.equal(logits, base.logits)
    loaded = base.last["loaded"].recipe.to_json()  # what runs is what the files say, nothing coerced
    for key in ("method", "branches"):
        assert loaded[key] == recipe[key]
    assert loaded["options"] == recipe.get("options", {}) and loaded["base_model"] == recipe.get("base_model")
    for got, given_ in zip(loaded["replacements"], recipe["replacements"], strict=True):
        assert {k: got[k] for k in ("labels", "action", "form", "input", "layers", "info")} == \
            {k: given_[k] for k in ("labels", "action", "form", "input", "layers", "info")}
    for key, tensor in base.last["loaded"].recipe.tensors.items():
        assert torch.equal(tensor, tensors[key])
