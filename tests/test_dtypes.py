"""bfloat16 / float16 models: float64 statistics, weights saved in the model's dtype, float32 ONNX,
parity within the documented tolerance; bad --device / --dtype are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from subfit_fx import capture, find_branches, prepare
from subfit_fx.cli import main
from subfit_fx.compress import compress, load
from subfit_fx.exporters import export_onnx
from subfit_fx.exporters.validate import tolerance_for
from subfit_fx.runtime import OnnxRunner
from subfit_fx.zoo import tiny_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_are_float64_and_equal_to_those_of_the_activations(dtype):
    model = tiny_model("llama").to(dtype)
    session = prepare(capture(model), progress=False)
    ids = torch.randint(0, 128, (2, 8))
    label = session.branches[1].label
    seen = []
    session.watch([(ids, torch.ones_like(ids))], lambda lab, x, y: seen.append(y) if lab == label else None)
    stats = session.calibrate([(ids, torch.ones_like(ids))], desc=None)[label]
    assert stats.gram["normalized"].dtype == torch.float64
    y = seen[0].reshape(-1, seen[0].shape[-1]).double()  # the model's own low-precision output
    assert torch.allclose(stats.scalars["y_sq"], (y * y).sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compress_save_load_export_in_low_precision(dtype, tmp_path):
    calib = torch.randint(0, 128, (8, 16))
    c = compress("builtin:llama", calib, 0.25, "subfit", judge="statistics", dtype=dtype, progress=False)
    assert c.recipe.options["dtype"] == dtype and any(r.action == "bypass" for r in c.recipe.replacements)
    c.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "recipe.json").read_text())["options"]["dtype"] == dtype
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}  # noqa: SIM118
    loaded = load(tmp_path / "c")
    ids = calib[:2]
    mask = torch.ones_like(ids)
    out = c.module()(ids, mask)
    assert out.dtype == getattr(torch, dtype)
    assert torch.equal(loaded.module()(ids, mask), out)  # weights saved in their dtype: bitwise
    assert loaded.dense_model() is not None  # the base re-loads in the recorded dtype, hash and all

    export_onnx(loaded, tmp_path / "c.onnx")  # float32 file, checked against the upcast model
    onnx_out = OnnxRunner(tmp_path / "c.onnx")(ids.numpy(), mask.numpy())
    assert onnx_out.dtype == np.float32
    # against the low-precision torch model: within the documented tolerance of its dtype
    ref = out.detach().float().numpy()
    assert np.abs(onnx_out - ref).max() / np.abs(ref).max() <= tolerance_for(getattr(torch, dtype)).rtol


def test_old_recipes_without_a_dtype_are_float32(tmp_path):
    c = compress(tiny_model("llama"), torch.randint(0, 128, (8, 16)), 0.25, "subfit", judge="statistics",
                 progress=False)
    del c.recipe.options["dtype"]
    c.save(tmp_path / "c")
    assert "dtype" not in json.loads((tmp_path / "c" / "recipe.json").read_text())["options"]
    assert load(tmp_path / "c", model=tiny_model("llama")).recipe.storage_dtype() == torch.float32


def test_bypass_weights_follow_the_activations():
    from subfit_fx.recipe import Recipe, Replacement, branch_records
    from subfit_fx.rewrite import apply_recipe

    ep = capture(tiny_model("llama").to(torch.bfloat16))
    label = find_branches(ep)[1].label
    recipe = Recipe("manual", branch_records(find_branches(ep)),
                    [Replacement((label,), "bypass", "linear", "normalized", [("w", "b")])],
                    {"w": torch.eye(64, dtype=torch.float64), "b": torch.zeros(64, dtype=torch.float64)})
    program = apply_recipe(ep, recipe)
    assert {program.state_dict[k].dtype for k in program.state_dict if k.startswith("subfit.")} == {torch.bfloat16}


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cuda"], "asks for CUDA"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_device_or_dtype_is_one_line_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text " * 50)
    out = tmp_path / "out"
    assert main(["compress", "builtin:llama", "--calib", str(calib), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
