"""Reliability and safety: user errors are one line with exit code 2, outputs are atomic, weights are
never unpickled, recipes are checked against their model, and runs are deterministic."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import subfit_fx
from subfit_fx.cli import main
from subfit_fx.errors import CalibrationError, ModelLoadError, RecipeMismatchError, ValidationError
from subfit_fx.zoo import tiny_model
from tests.fixtures_reliability import (
    assert_no_output,
    assert_one_line_error,
    calib_text,
    cli_env,
    read_recipe_tensors,
    reaped,
    run_cli,
    stderr_lines,
    write_recipe_tensors,
)

FAST = ["--samples", "8", "--seq-len", "32"]


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(calib_text())
    return path


def _compress_argv(model: str, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", model, "--calib", str(calib), "--sparsity", "0.25", *FAST, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny llama (2 layers, width 32), shared read-only."""
    path = tmp_path_factory.mktemp("model") / "llama"
    tiny_model("llama", hidden=32, layers=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compressed_dir(model_dir, tmp_path_factory) -> Path:
    """`model_dir` compressed once by the CLI (seed 0), shared read-only by several tests."""
    root = tmp_path_factory.mktemp("compressed")
    calib = root / "calib.txt"
    calib.write_text(calib_text())
    assert main(_compress_argv(str(model_dir), calib, root / "out")) == 0
    return root / "out"


def _saved_model(path: Path, poison: float | None = None) -> Path:
    model = tiny_model("llama", layers=2)
    if poison is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = poison
    model.save_pretrained(path)
    return path


# -- user errors of `compress`: exit 2, one line naming problem and fix, nothing written -------------

def _missing_model(tmp: Path, calib: Path) -> list[str]:
    return _compress_argv(str(tmp / "no-such-model"), calib, tmp / "out")


def _dir_without_model(tmp: Path, calib: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return _compress_argv(str(tmp / "empty"), calib, tmp / "out")


def _corrupted_safetensors(tmp: Path, calib: Path) -> list[str]:
    model_dir = _saved_model(tmp / "model")
    for weights in model_dir.glob("*.safetensors"):
        weights.write_bytes(b"\x00garbage, not a safetensors header" * 16)
    return _compress_argv(str(model_dir), calib, tmp / "out")


def _calib_file(tmp: Path, text: str) -> Path:
    path = tmp / "short.txt"
    path.write_text(text)
    return path


def _with(*pairs: str):
    """Compress builtin:llama with options replaced by `pairs` (flag, value, flag, value...)."""
    def build(tmp: Path, calib: Path) -> list[str]:
        argv = _compress_argv("builtin:llama", calib, tmp / "out")
        for flag, value in zip(pairs[::2], pairs[1::2]):
            argv[argv.index(flag) + 1] = value
        return argv
    return build


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


USER_ERRORS = {
    "missing-model": (_missing_model, ["does not exist", "Hugging Face model directory"]),
    "dir-without-model": (_dir_without_model, ["not a model directory", "save_pretrained"]),
    "corrupted-safetensors": (_corrupted_safetensors, ["cannot load weights", "re-save"]),
    "missing-calib": (lambda t, c: _with("--calib", str(t / "nope.txt"))(t, c), ["does not exist"]),
    "empty-calib": (lambda t, c: _with("--calib", str(_calib_file(t, " \n")))(t, c), ["is empty"]),
    "calib-is-a-directory": (lambda t, c: _with("--calib", str(t))(t, c), ["is not a regular file (a directory)"]),
    "calib-is-a-fifo": (lambda t, c: _with("--calib", str(_fifo(t)))(t, c), ["is not a regular file (a FIFO)"]),
    "calib-shorter-than-a-sequence": (lambda t, c: _with("--calib", str(_calib_file(t, "hello world")))(t, c),
                                      ["fewer than one sequence", "--seq-len"]),
    "seq-len-above-max-positions": (_with("--seq-len", "129"), ["exceeds", "128", "--seq-len 128"]),
    "sparsity-zero": (_with("--sparsity", "0"), ["sparsity", "0 < sparsity < 0.9"]),
    "sparsity-negative": (_with("--sparsity", "-0.1"), ["sparsity", "0 < sparsity < 0.9"]),
    "sparsity-0.9": (_with("--sparsity", "0.9"), ["sparsity", "0 < sparsity < 0.9"]),
    "sparsity-above-1": (_with("--sparsity", "1.5"), ["sparsity", "0 < sparsity < 0.9"]),
    "sparsity-nan": (_with("--sparsity", "nan"), ["sparsity", "0 < sparsity < 0.9"]),
    "sparsity-not-a-number": (_with("--sparsity", "abc"), ["'abc' is not a number", "0.25"]),
    "unknown-method": (lambda t, c: [*_with()(t, c), "--method", "bogus"], ["unknown method 'bogus'", "choose one of"]),
    "missing-output-parent": (lambda t, c: _compress_argv("builtin:llama", c, t / "no" / "such" / "out"),
                              ["does not exist", "create it first"]),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_compress_user_error_is_one_line_exit_2_and_writes_nothing(case, tmp_path, calib, capsys):
    build, needles = USER_ERRORS[case]
    argv = build(tmp_path, calib)
    out = Path(argv[argv.index("--out") + 1])
    capsys.readouterr()
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)
    assert_no_output(out)


def test_debug_flag_shows_the_traceback(tmp_path, calib, capsys):
    argv = ["--debug", *_missing_model(tmp_path, calib)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ModelLoadError" in err
    assert stderr_lines(err)[-1].startswith("subfit-fx: error:")
    assert_no_output(tmp_path / "out")


def test_cli_subprocess_sparsity_not_a_number(tmp_path, calib):
    proc = run_cli(_with("--sparsity", "lots")(tmp_path, calib))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "'lots' is not a number")
    assert_no_output(tmp_path / "out")


# -- weights only through safetensors -----------------------------------------------------------------

class _Trap:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_weights_are_never_unpickled(tmp_path, calib, capsys):
    model_dir = _saved_model(tmp_path / "model")
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    sentinel = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Trap(armed)))  # the trap works when something does unpickle it
    assert armed.exists()

    with pytest.raises(ModelLoadError, match="safetensors"):
        subfit_fx.load_model(model_dir)
    assert main(_compress_argv(str(model_dir), calib, tmp_path / "out")) == 2
    assert_one_line_error(capsys.readouterr().err, "no *.safetensors", "never unpickles")
    assert not sentinel.exists()
    assert_no_output(tmp_path / "out")


def _index_naming(tmp: Path, name: str) -> Path:
    """A saved tiny llama whose safetensors index maps every tensor to `name`."""
    from safetensors import safe_open

    model_dir = _saved_model(tmp / "model")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, name)}))
    return model_dir


@pytest.mark.parametrize("name", ["pytorch_model.bin", "../model.safetensors", "/tmp/model.safetensors"])
def test_index_naming_a_pickle_or_a_file_outside_is_refused_before_loading(tmp_path, calib, capsys, name):
    """transformers followed such an index into torch.load, and its message advised weights_only=False."""
    model_dir = _index_naming(tmp_path, name)
    sentinel = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    before = _tree(model_dir)
    assert main(_compress_argv(str(model_dir), calib, tmp_path / "out")) == 2
    line = assert_one_line_error(capsys.readouterr().err, f"maps weights to '{name}'", "never unpickles")
    assert "weights_only" not in line
    assert not sentinel.exists() and _tree(model_dir) == before
    assert_no_output(tmp_path / "out")


def _config_of(arch: str | None, model_dir: Path, **changes: object) -> Path:
    """Replace `model_dir`'s config by the saved config of a tiny `arch` (None: its own), with `changes`."""
    source = model_dir
    if arch:
        source = model_dir.parent / arch
        tiny_model(arch, hidden=32, layers=2).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))
    return model_dir


@pytest.mark.parametrize("config, needles", [
    ({"arch": "gpt2"}, ["model_type gpt2", "missing from the weights (e.g. transformer.h.0",
                        "unused (e.g. model.embed_tokens.weight"]),
    ({"arch": None, "intermediate_size": 80}, ["wrong shape (e.g. model.layers.0.mlp.down_proj.weight [32, 64] "
                                               "vs config [32, 80]"]),
])
def test_weights_of_another_model_are_refused(model_dir, tmp_path, calib, capsys, config, needles):
    """A gpt2 config over llama weights loaded as a random-init GPT-2 and compressed without a word."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    changes = dict(config)
    _config_of(changes.pop("arch"), model, **changes)
    before = _tree(model)
    with pytest.raises(ModelLoadError, match=r"do not match its config\.json"):
        subfit_fx.load_model(model)
    assert main(_compress_argv(str(model), calib, tmp_path / "out")) == 2
    assert_one_line_error(capsys.readouterr().err, "do not match its config.json", "restore the config.json",
                          *needles)
    assert _tree(model) == before
    assert_no_output(tmp_path / "out")


def test_encoder_from_a_checkpoint_with_a_task_head_loads(tmp_path):
    """A BertForMaskedLM checkpoint is an encoder plus a head we drop on purpose: not a mismatch."""
    import transformers

    from subfit_fx.zoo import tiny_config

    mlm = transformers.BertForMaskedLM(tiny_config("bert", hidden=32, layers=2))
    mlm.save_pretrained(tmp_path / "bert")
    model = subfit_fx.load_model(tmp_path / "bert")
    assert type(model).__name__ == "BertModel"
    assert torch.equal(model.encoder.layer[0].output.dense.weight, mlm.bert.encoder.layer[0].output.dense.weight)


# -- recipes are checked against their model ---------------------------------------------------------

def test_recipe_from_another_model_is_rejected(compressed_dir):
    with pytest.raises(RecipeMismatchError, match="another model"):
        subfit_fx.load(compressed_dir, model=tiny_model("gpt2"))


def test_recipe_for_another_width_is_rejected(compressed_dir):
    # same architecture and branch labels as the compressed model, but a wider stream
    with pytest.raises(RecipeMismatchError, match="width"):
        subfit_fx.load(compressed_dir, model=tiny_model("llama", hidden=64, layers=2))


def test_cli_export_of_recipe_from_another_model_is_rejected(compressed_dir, tmp_path, capsys):
    moved = tmp_path / "compressed"
    shutil.copytree(compressed_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    # the directory's config now describes another architecture than its weights and recipe
    other = {**tiny_model("gpt2").config.to_dict(), "subfit": {**config["subfit"], "base_model_type": "gpt2"}}
    (moved / "config.json").write_text(json.dumps(other))
    out = tmp_path / "model.onnx"
    assert main(["export", str(moved), "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "does not match its config")
    assert_no_output(out)


# -- outputs: refused when present, replaced atomically with --force ---------------------------------

def test_existing_output_is_refused_without_force(tmp_path, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_compress_argv("builtin:llama", calib, out)) == 2
    assert_one_line_error(capsys.readouterr().err, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]  # no temp sibling


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["model", "inside-model", "over-model", "calib", "symlink-to-model"])
def test_output_never_lies_in_or_over_an_input(model_dir, tmp_path, calib, capsys, where):
    """`compress DIR --out DIR --force` once deleted the model it was reading."""
    model = tmp_path / "models" / "llama"
    shutil.copytree(model_dir, model)
    before = _tree(model)
    link = tmp_path / "link"
    link.symlink_to(model)
    out = {"model": model, "inside-model": model / "out", "over-model": model.parent, "calib": calib,
           "symlink-to-model": link}[where]
    assert main(_compress_argv(str(model), calib, out, "--force")) == 2
    assert_one_line_error(capsys.readouterr().err, "lies in or over the input", "outside it")
    assert _tree(model) == before and calib.is_file()


@pytest.mark.parametrize("where, needle", [
    ("dangling-symlink", "is a symbolic link"), ("symlink-to-a-directory", "is a symbolic link"),
    (".", "names no new file or directory"), ("/proc/out", "special filesystem /proc"),
])
def test_odd_outputs_are_refused_before_any_work(tmp_path, calib, capsys, monkeypatch, where, needle):
    """These ended in tracebacks after the whole run (a link to a directory: after replacing the link)."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # where '.' points
    (tmp_path / "dangling-symlink").symlink_to(tmp_path / "nowhere")
    (tmp_path / "target").mkdir()
    (tmp_path / "symlink-to-a-directory").symlink_to(tmp_path / "target")
    out = where if where.startswith((".", "/")) else str(tmp_path / where)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_compress_argv("builtin:llama", calib, Path(out), "--force")) == 2
    assert_one_line_error(capsys.readouterr().err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list((tmp_path / "work").iterdir()) == []
    assert (tmp_path / "symlink-to-a-directory").is_symlink() and list((tmp_path / "target").iterdir()) == []


def test_export_output_never_lies_in_its_input(compressed_dir, tmp_path, capsys):
    moved = tmp_path / "compressed"
    shutil.copytree(compressed_dir, moved)
    before = _tree(moved)
    assert main(["export", str(moved), "--out", str(moved / "m.onnx")]) == 2
    assert_one_line_error(capsys.readouterr().err, "lies in or over the input")
    assert _tree(moved) == before


def test_same_seed_rerun_with_force_replaces_output_byte_identically(model_dir, compressed_dir, tmp_path, calib):
    """Determinism (same model, data, options, seed -> same bytes) and --force replacing an output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_compress_argv(str(model_dir), calib, out, "--seed", "0", "--force")) == 0
    assert not (out / "keep.txt").exists()
    for name in ("recipe.json", "model.safetensors"):
        assert (out / name).read_bytes() == (compressed_dir / name).read_bytes(), name
    assert json.loads((out / "recipe.json").read_text())["replacements"], "nothing replaced: vacuous comparison"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]  # no temp or old sibling


def test_failed_run_with_force_leaves_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(_compress_argv("builtin:llama", empty, out, "--force")) == 2
    assert_one_line_error(capsys.readouterr().err, "is empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "out"]


def test_unwritable_output_directory(tmp_path, calib, capsys):
    if os.geteuid() == 0:  # root writes through chmod; nothing can be created under a regular file
        parent = tmp_path / "file.txt"
        parent.write_text("not a directory")
    else:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o500)
    out = parent / "out"
    try:
        assert main(_compress_argv("builtin:llama", calib, out)) == 2
        assert_one_line_error(capsys.readouterr().err, "cannot write")
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", parent.name]
    finally:
        if parent.is_dir():
            parent.chmod(0o700)


# -- exported artifacts are validated before they appear ---------------------------------------------

def test_onnx_parity_failure_writes_nothing(tmp_path):
    try:
        from subfit_fx.exporters.onnx_export import export_onnx
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("subfit_fx.exporters"):
            pytest.skip("subfit_fx.exporters.onnx_export does not exist yet")
        raise
    from subfit_fx.capture import HFWrapper

    model = tiny_model("gpt2", hidden=32, layers=1)
    wrong = copy.deepcopy(model)
    with torch.no_grad():  # a deliberately wrong weight in what the ONNX model is checked against
        fc = wrong.transformer.h[0].mlp.c_fc.weight
        fc.add_(torch.randn(fc.shape, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "model.onnx"
    with pytest.raises(ValidationError, match="onnx vs torch"):
        export_onnx(model, out, reference=HFWrapper(wrong).eval())
    assert list(tmp_path.iterdir()) == []


# -- non-finite statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["auto", "subfit"])
def test_non_finite_weights_and_statistics_are_refused_before_any_output(method):
    tokens = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")  # the CLI test below uses NaN
    with pytest.raises(ModelLoadError, match=r"weight model\.layers\.0\.mlp\.down_proj\.weight holds NaN or Inf"):
        subfit_fx.compress(model, tokens, 0.25, method, progress=False)
    # finite weights, non-finite activations (the hook is traced into the captured graph): caught on
    # the statistics
    model = tiny_model("llama", layers=2)
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        subfit_fx.compress(model, tokens, 0.25, method, progress=False)


def test_cli_non_finite_weights_are_one_line_error(tmp_path, calib, capsys):
    model_dir = _saved_model(tmp_path / "model", poison=float("nan"))
    out = tmp_path / "out"
    assert main(_compress_argv(str(model_dir), calib, out)) == 2
    assert_one_line_error(capsys.readouterr().err, "NaN or Inf", "model.layers.0.mlp")
    assert_no_output(out)


# -- interruption --------------------------------------------------------------------------------------

def test_sigint_during_compress_exits_130_and_writes_nothing(tmp_path):
    calib = tmp_path / "long.txt"
    # > 512 sequences of 128 tokens: calibration alone takes several seconds, so the interrupt lands
    # well inside the run even on a loaded machine (with 64 it could land during interpreter exit)
    calib.write_text(calib_text(words=12000))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "subfit_fx", "compress", "builtin:llama", "--calib", str(calib),
            "--sparsity", "0.25", "--samples", "512", "--seq-len", "128", "--out", str(out)]
    # SIG_DFL in the child: Python then installs its handler, even when this run inherited SIGINT ignored
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with reaped(proc):
        first = proc.stderr.readline()
        assert first.startswith("compressing builtin:llama"), first
        time.sleep(1.5)
        assert proc.poll() is None, "compress finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert_one_line_error(first + rest, "no output was written", prefix="subfit-fx: interrupted")
    assert "wrote" not in stdout
    assert_no_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.txt"]


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler, as a CLI in a terminal has it (a test run started in the
    background inherits SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_that_a_library_turns_into_another_error_still_exits_130(tmp_path, calib, capsys, monkeypatch,
                                                                            python_sigint_handler):
    """torch's C++ argument parser reports a SIGINT landing inside torch.export as a TypeError."""

    def export(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)  # the handler runs at the next bytecode, before this sleep returns
        except KeyboardInterrupt:
            raise TypeError("empty_strided(): argument 'size' failed to unpack the object at pos 1 with "
                            'error "KeyboardInterrupt: <EMPTY MESSAGE>"') from None
        raise AssertionError("SIGINT was not delivered")

    monkeypatch.setattr(torch.export, "export", export)
    out = tmp_path / "out"
    assert main(_compress_argv("builtin:llama", calib, out)) == 130
    assert_one_line_error(capsys.readouterr().err, "no output was written", prefix="subfit-fx: interrupted")
    assert_no_output(out)


@pytest.mark.parametrize("argv", [
    ["bench", "a.onnx", "b.onnx", "--repeats", "0"],
    ["generate", "m.onnx", "--prompt", "x", "--max-new-tokens", "-5"],
    ["eval", "builtin:llama", "--text", "t.txt", "--batch-size", "0"],
    ["compress", "builtin:llama", "--calib", "t.txt", "--out", "o", "--samples", "0"],
])
def test_numeric_options_are_range_checked_by_the_parser(argv, capsys):
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "not a positive integer")


# -- artifacts are validated on read; JSON outputs are finite -------------------------------------------

@pytest.fixture(scope="module")
def bypass_dir(model_dir, tmp_path_factory) -> Path:
    """`model_dir` compressed with a shared-basis bypass (tensors in model.safetensors), read-only."""
    root = tmp_path_factory.mktemp("bypass")
    calib = root / "calib.txt"
    calib.write_text(calib_text())
    assert main(_compress_argv(str(model_dir), calib, root / "out", "--method", "subfit", "--judge", "statistics")) == 0
    assert json.loads((root / "out" / "recipe.json").read_text())["tensors"], "no bypass: vacuous fixture"
    return root / "out"


def _mutated(source: Path, tmp: Path, edit) -> Path:
    """A copy of compressed directory `source` with `edit(recipe_dict, tensors_dict)` applied."""
    out = tmp / "mutated"
    shutil.copytree(source, out)
    recipe = json.loads((out / "recipe.json").read_text())
    tensors = read_recipe_tensors(out)
    edit(recipe, tensors)
    (out / "recipe.json").write_text(json.dumps(recipe))
    write_recipe_tensors(out, tensors)
    return out


def _set(path: str, value: object):
    """An edit setting recipe field `path` (dot-separated keys and list indices) to `value`."""
    def edit(recipe: dict, tensors: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        obj = recipe
        for p in parents:
            obj = obj[p]
        obj[last] = value
    return edit


def _weight(change):
    def edit(recipe: dict, tensors: dict) -> None:
        key = recipe["replacements"][0]["layers"][0][0]
        tensors[key] = change(tensors[key])
        recipe["tensors"][key] = list(tensors[key].shape)
    return edit


BAD_RECIPES = {
    "branches-not-a-list": (_set("branches", "x"), 'branches is "x", expected a list'),
    "unknown-action": (_set("replacements.0.action", "explode"), "replacements.0.action is 'explode', expected one "
                                                                 "of remove, bypass"),
    "unknown-form": (_set("replacements.0.form", "cubic"), "replacements.0.form is 'cubic'"),
    "unknown-input": (_set("replacements.0.input", "sideways"), "replacements.0.input is 'sideways'"),
    "unknown-label": (_set("replacements.0.labels", ["model.layers.9.mlp"]), "which is not a branch"),
    "label-as-number": (_set("replacements.0.labels", [3]), "replacements.0.labels.0 is 3, expected a string"),
    "width-as-string": (_set("branches.0.width", "32"), 'branches.0.width is "32", expected an integer'),
    "remove-with-layers": (_set("replacements.0.action", "remove"), "is inconsistent"),
    "missing-tensor-key": (_set("replacements.0.layers.0.0", "ghost.weight"), "names tensor 'ghost.weight'"),
    "nan-option": (_set("options.sparsity", float("nan")), "options.sparsity is nan, not a finite number"),
    "rank-3-weight": (_weight(lambda t: t[..., None]), "expected a 2-D weight"),
    "transposed-weight": (_weight(lambda t: t.T.contiguous()), "expected a 2-D weight"),
    "nan-weight": (_weight(lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "holds NaN or Inf"),
    "integer-weight": (_weight(lambda t: t.to(torch.int32)), "expected a floating-point type"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_malformed_recipe_is_one_line_naming_the_field(bypass_dir, model_dir, tmp_path, case):
    edit, needle = BAD_RECIPES[case]
    mutated = _mutated(bypass_dir, tmp_path, edit)
    with pytest.raises(ModelLoadError) as info:
        subfit_fx.load(mutated, model=subfit_fx.load_model(model_dir))
    message = str(info.value)
    assert needle in message and "compress again" in message and "\n" not in message, message


def test_nan_bypass_weights_are_refused_by_every_command(bypass_dir, tmp_path, calib, capsys):
    """NaN weights once evaluated to `"perplexity": NaN` (not JSON) with exit 0."""
    mutated = _mutated(bypass_dir, tmp_path, BAD_RECIPES["nan-weight"][0])
    before = _tree(mutated)
    for argv in (["eval", str(mutated), "--text", str(calib), "--json"],
                 ["export", str(mutated), "--out", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert_one_line_error(captured.err, "holds NaN or Inf", "compress again")
        assert captured.out == ""
    assert _tree(mutated) == before
    assert_no_output(tmp_path / "m.onnx")


def test_non_finite_evaluation_result_is_an_error_not_nan_json(tmp_path, calib, capsys):
    model_dir = _saved_model(tmp_path / "model", poison=float("nan"))
    assert main(["eval", str(model_dir), "--text", str(calib), "--json", "--choice-items", "2"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "evaluation result:", "not a finite number")
    assert "NaN" not in captured.out


@pytest.mark.parametrize("name, content, needle", [
    ("report.json", {"method": "subfit", "sparsity_target": float("inf")}, "sparsity_target is inf"),
    ("report.json", {"method": "subfit", "sparsity_target": 0.25, "replaced": ["model.layers.7.mlp"]},
     "replaced.0 is 'model.layers.7.mlp', which is not a branch"),
    ("report.json", [1, 2], "is not a JSON object"),
])
def test_malformed_report_is_one_line(compressed_dir, model_dir, tmp_path, name, content, needle):
    moved = tmp_path / "c"
    shutil.copytree(compressed_dir, moved)
    (moved / name).write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        subfit_fx.load(moved, model=subfit_fx.load_model(model_dir))


def test_eval_json_output_is_what_report_reads_back(compressed_dir, tmp_path, calib, capsys):
    moved = tmp_path / "c"
    shutil.copytree(compressed_dir, moved)
    assert main(["eval", str(moved), "--text", str(calib), "--json", "--choice-items", "2"]) == 0
    (moved / "eval.json").write_text(capsys.readouterr().out)
    assert main(["report", str(moved)]) == 0
    assert "perplexity_ratio" in (moved / "report.html").read_text()


@pytest.mark.parametrize("name, content, needle", [
    ("eval.json", {"seq_len": 128, "perplexity": float("nan")}, "perplexity is nan"),
    ("eval.json", {"seq_len": 0}, "seq_len is 0, expected an integer >= 1"),
    ("bench.json", {"rows": [{"stage": "prefill", "seq": 8, "dense_ms": 1, "compressed_ms": 0, "speedup": 1}],
                    "bytes": {"dense": 1, "compressed": 1}, "repeats": 1}, "rows.0.compressed_ms is 0"),
    ("bench.json", {"rows": []}, "bytes is missing"),
])
def test_report_command_validates_eval_and_bench_json(compressed_dir, tmp_path, capsys, name, content, needle):
    moved = tmp_path / "c"
    shutil.copytree(compressed_dir, moved)
    (moved / name).write_text(json.dumps(content))
    before = (moved / "report.html").read_bytes()
    assert main(["report", str(moved)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{name}' is invalid", needle, "regenerate it")
    assert (moved / "report.html").read_bytes() == before


# -- concurrent runs and killed runs ---------------------------------------------------------------------

def _start_long_compress(tmp: Path, out: Path) -> subprocess.Popen:
    """A compress run that calibrates for several seconds, started in its own interpreter."""
    calib = tmp / "long.txt"
    calib.write_text(calib_text(words=12000))
    argv = [sys.executable, "-m", "subfit_fx", "compress", "builtin:llama", "--calib", str(calib),
            "--sparsity", "0.25", "--samples", "32", "--seq-len", "128", "--out", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_concurrent_runs_on_one_output_exactly_one_succeeds(tmp_path, calib, capsys):
    """Two runs with one --out both reported success; one result silently replaced the other."""
    out = tmp_path / "out"
    with reaped(_start_long_compress(tmp_path, out)) as first:
        _wait_for(tmp_path / ".out.lock", first)  # the first run has claimed the output
        assert main(_compress_argv("builtin:llama", calib, out)) == 2  # this process: another run
        assert first.poll() is None, "the second run did not fail fast"
        assert_one_line_error(capsys.readouterr().err, "being written by another run", f"(pid {first.pid})",
                              "choose another output")
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "wrote" in stdout and (out / "recipe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "long.txt", "out"]


def test_rerun_after_a_killed_run_succeeds_and_removes_its_leftovers(tmp_path, calib):
    out = tmp_path / "out"
    killed = _start_long_compress(tmp_path, out)
    try:
        _wait_for(tmp_path / ".out.lock", killed)
    finally:
        killed.kill()  # SIGKILL: no handler, no cleanup
        killed.communicate()
    # what a kill during the final save would also leave: the half-written temporary sibling
    (tmp_path / ".out.k1ll3d_x.partial").mkdir()
    (tmp_path / ".out.k1ll3d_x.partial" / "recipe.json").write_text("{")
    (tmp_path / ".out.v2.abcdefgh.partial").mkdir()  # another output's temporary: not ours to remove
    assert (tmp_path / ".out.lock").exists(), "vacuous: the killed run left no claim"
    assert main(_compress_argv("builtin:llama", calib, out)) == 0
    assert (out / "recipe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.v2.abcdefgh.partial", "calib.txt", "long.txt",
                                                          "out"]


def test_output_moved_aside_by_a_killed_forced_run_is_put_back(tmp_path):
    from subfit_fx.atomic import claim

    out = tmp_path / "out"
    (tmp_path / ".out.old-999999").mkdir()  # a --force run killed between its two renames
    (tmp_path / ".out.old-999999" / "keep.txt").write_text("mine")
    with claim(out):
        pass
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- commands are bounded by the model's context ---------------------------------------------------------

@pytest.fixture(scope="module")
def kv_onnx(tmp_path_factory) -> Path:
    """builtin:llama (context 128) exported with a KV cache, shared read-only."""
    out = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    assert main(["export", "builtin:llama", "--out", str(out), "--kv-cache"]) == 0
    return out


def test_generate_stops_at_the_context_with_a_notice(kv_onnx, capsys):
    """--max-new-tokens 100000000 hung; past the context it would end in an ONNX Runtime traceback."""
    assert main(["generate", str(kv_onnx), "--prompt", "Hello", "--max-new-tokens", "100000000"]) == 0
    captured = capsys.readouterr()
    assert "generating 123 tokens, not 100000000" in captured.err and "context of 128" in captured.err
    assert captured.out.startswith("Hello") and "Traceback" not in captured.err


@pytest.mark.parametrize("argv, needles", [
    (["generate", "{onnx}", "--prompt", "x" * 128], ["--prompt has 128 tokens", "context is 128", "shorten"]),
    (["bench", "{onnx}", "{onnx}", "--seq", "8,200", "--repeats", "1"], ["--seq 200 is beyond the context",
                                                                         "use --seq up to 127"]),
    (["bench", "{onnx}", "{onnx}", "--seq", "128", "--repeats", "1"], ["decode step after it needs one more"]),
])
def test_lengths_beyond_the_context_are_one_line(kv_onnx, capsys, argv, needles):
    assert main([a.format(onnx=kv_onnx) for a in argv]) == 2
    assert_one_line_error(capsys.readouterr().err, *needles)


def test_eval_text_that_is_a_fifo_is_named_as_such(tmp_path, capsys):
    """A FIFO was reported as "does not exist" (and opening it would block forever)."""
    assert main(["eval", "builtin:llama", "--text", str(_fifo(tmp_path))]) == 2
    assert_one_line_error(capsys.readouterr().err, "is not a regular file (a FIFO)", "pass a UTF-8 text file")


def test_interrupt_that_a_library_swallows_still_exits_130_and_writes_nothing(tmp_path, calib, capsys, monkeypatch,
                                                                               python_sigint_handler):
    """A library that catches the TypeError torch made of the KeyboardInterrupt and carries on (a
    fallback path) must not let the run finish and write its output."""
    real_export = torch.export.export

    def export(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # swallowed: the run goes on with a good capture
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    out = tmp_path / "out"
    assert main(_compress_argv("builtin:llama", calib, out)) == 130
    assert_one_line_error(capsys.readouterr().err, "no output was written", prefix="subfit-fx: interrupted")
    assert_no_output(out)
    from subfit_fx import interrupts

    assert not interrupts.interrupted()  # a library call after the CLI run is not stopped by its Ctrl-C


def test_atomic_writers_refuse_to_commit_after_an_interrupt(tmp_path):
    from subfit_fx import interrupts
    from subfit_fx.atomic import atomic_dir, atomic_file

    interrupts.note()
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a.txt").write_text("x")
        with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "f.onnx") as staged:
            staged.write_text("x")
    finally:
        interrupts.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "d") as tmp:  # cleared: writes again
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "d" / "a.txt").read_text() == "x"
