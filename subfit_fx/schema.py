"""Schema checks of the artifacts subfit_fx reads back (recipe.json with its weights, report.json,
eval.json, bench.json) and the one JSON writer of its artifacts.

A malformed file that still parses must fail here, with one line naming the field and the fix,
instead of a traceback deep in the rewrite or, worse, a wrong model that runs. Written JSON never
holds NaN or Infinity (not JSON): a non-finite result is an error.

Example:
    >>> bench = {"rows": [], "bytes": {"dense": 1, "compressed": 1}, "repeats": 0}
    >>> check_bench(bench, Path("b.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    subfit_fx.errors.InputError: 'b.json' is invalid: repeats is 0, expected an integer >= 1; ...
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from subfit_fx.errors import InputError, ModelLoadError, NonFiniteError, SubfitError

__all__ = ["ACTIONS", "FORMS", "INPUTS", "KINDS", "check_bench", "check_eval", "check_lm_eval", "check_recipe",
           "check_recipe_tensors", "check_report", "dumps", "read_json"]

ACTIONS = ("remove", "bypass", "slim")
FORMS = ("remove", "linear", "lowrank", "shared", "slim")
INPUTS = ("normalized", "stream", "inner")
KINDS = ("attention", "ffn")
_RECIPE_FIX = "compress again (or restore the recipe directory 'subfit-fx compress' wrote)"
_REPORT_FIX = "restore the report.json 'subfit-fx compress' wrote, or delete it"


class _Fields:
    """Typed field access that fails with one line: '<file>' is invalid: <field> <problem>; <fix>."""

    def __init__(self, path: Path, error: type[SubfitError], fix: str) -> None:
        self.path, self.error, self.fix = path, error, fix

    def fail(self, field: str, problem: str) -> NoReturn:
        raise self.error(f"'{self.path}' is invalid: {field} {problem}; {self.fix}")

    def get(self, obj: dict, key: str, kind: str, where: str = "", default: Any = ...) -> Any:
        """obj[key] of `kind` ('str', 'int', 'num', 'bool', 'dict', 'list'; 'str?' allows null; an
        int kind may carry a minimum, 'int>=1'); a missing key is an error unless `default` is given."""
        field = f"{where}{key}"
        if key not in obj:
            if default is ...:
                self.fail(field, "is missing")
            return default
        return self.value(obj[key], kind, field)

    def value(self, value: Any, kind: str, field: str) -> Any:
        base, _, low = kind.partition(">=")
        if base.endswith("?") and value is None:
            return value
        base = base.rstrip("?")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = {"str": isinstance(value, str), "int": number and isinstance(value, int), "num": number,
              "bool": isinstance(value, bool), "dict": isinstance(value, dict), "list": isinstance(value, list)}[base]
        if not ok:
            self.fail(field, f"is {json.dumps(value)[:40]}, expected {_a(_NAMES[base])}")
        if low and value < float(low):
            self.fail(field, f"is {value}, expected {_a(_NAMES[base])} >= {low}")
        return value

    def choice(self, obj: dict, key: str, choices: tuple[str, ...], where: str = "") -> str:
        value = self.get(obj, key, "str", where)
        if value not in choices:
            self.fail(f"{where}{key}", f"is {value!r}, expected one of {', '.join(choices)}")
        return value

    def finite(self, data: Any) -> None:
        """Every number in `data` is finite (json.loads reads NaN, Infinity and 1e999)."""
        bad = _non_finite(data)
        if bad is not None:
            self.fail(bad[0] or "the file", f"is {bad[1]}, not a finite number")


def _non_finite(data: Any, field: str = "") -> tuple[str, float] | None:
    """(field path, value) of the first NaN or infinite number in nested dicts and lists."""
    if isinstance(data, float) and not math.isfinite(data):
        return field, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for key, value in items:
        bad = _non_finite(value, f"{field}.{key}" if field else str(key))
        if bad is not None:
            return bad
    return None


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


_NAMES = {"str": "string", "int": "integer", "num": "finite number", "bool": "boolean", "dict": "object",
          "list": "list"}


def read_json(path: Path, check: Callable[[Any, Path], None], error: type[SubfitError] = ModelLoadError) -> Any:
    """Parse the JSON file `path` and run `check` (one of this module's checks) on it.

    Example:
        >>> read_json(Path("out/report.json"), check_report)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"cannot read '{path}' as JSON ({str(exc).splitlines()[0][:120]}); regenerate the file") from exc
    check(data, path)
    return data


def dumps(data: Any, what: str) -> str:
    """`data` as indented, sorted JSON text with a final newline; NaN or Infinity anywhere is a
    `NonFiniteError` naming the field (Python would write them, but they are not JSON).

    Example:
        >>> dumps({"a": [1, float("nan")]}, "eval.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.NonFiniteError: eval.json: a.1 is nan, not a finite number; ...
    """
    bad = _non_finite(data)
    if bad is not None:
        raise NonFiniteError(f"{what}: {bad[0]} is {bad[1]}, not a finite number; the model or its calibration "
                             "produced NaN or Inf: check the model's weights and rerun")
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # a recipe's options.dtype (subfit_fx.devices.DTYPES)


def check_recipe(data: Any, path: Path, format: str) -> None:
    """Check a parsed recipe.json: types, branch records, known actions / forms / inputs, labels of
    its own branches (spans consecutive, none replaced twice), tensor keys declared with 2-D weights
    and 1-D biases chaining the stream width to itself, finite numbers; `format` is the version
    string this subfit_fx writes.

    Example:
        >>> check_recipe({"format": "subfit-fx-recipe/1", "method": "m", "branches": [],  # doctest: +ELLIPSIS
        ...               "replacements": [{"labels": ["x"]}], "tensors": {}}, Path("r.json"), "subfit-fx-recipe/1")
        Traceback (most recent call last):
        ...
        subfit_fx.errors.ModelLoadError: 'r.json' is invalid: replacements.0.labels.0 is 'x', which is not a ...
    """
    f = _Fields(path, ModelLoadError, _RECIPE_FIX)
    if not isinstance(data, dict):
        f.fail("the file", "is not a JSON object")
    if data.get("format") != format:
        f.fail("format", f"is {data.get('format')!r}, expected {format!r} (re-create it with this version of "
                         "subfit_fx)")
    f.finite(data)
    f.get(data, "method", "str")
    f.get(data, "base_model", "str?", default=None)
    options = f.get(data, "options", "dict", default={})
    f.get(options, "sparsity", "num", "options.", default=None)
    if "dtype" in options:  # recorded since dtypes other than float32 run; older recipes are float32
        f.choice(options, "dtype", DTYPE_NAMES, "options.")
    order: dict[str, int] = {}
    widths: dict[str, int] = {}
    for i, b in enumerate(f.get(data, "branches", "list")):
        where = f"branches.{i}."
        f.value(b, "dict", where[:-1])
        label = f.get(b, "label", "str", where)
        if label in order:
            f.fail(f"{where}label", f"{label!r} appears twice")
        f.choice(b, "kind", KINDS, where)
        f.get(b, "layer", "int>=0", where)
        f.get(b, "params", "int>=0", where)
        order[label], widths[label] = i, f.get(b, "width", "int>=1", where)
    shapes = f.get(data, "tensors", "dict")
    for key, shape in shapes.items():
        f.value(shape, "list", f"tensors.{key}")
        for j, n in enumerate(shape):
            f.value(n, "int>=1", f"tensors.{key}.{j}")
    replaced: set[str] = set()
    for i, r in enumerate(f.get(data, "replacements", "list")):
        where = f"replacements.{i}."
        f.value(r, "dict", where[:-1])
        labels = f.get(r, "labels", "list", where)
        if not labels:
            f.fail(f"{where}labels", "is empty")
        for j, label in enumerate(labels):
            f.value(label, "str", f"{where}labels.{j}")
            if label not in order:
                f.fail(f"{where}labels.{j}", f"is {label!r}, which is not a branch of the recipe's model")
            if label in replaced:
                f.fail(f"{where}labels.{j}", f"is {label!r}, which an earlier replacement already replaces")
            replaced.add(label)
        if [order[label] for label in labels] != list(range(order[labels[0]], order[labels[0]] + len(labels))):
            f.fail(f"{where}labels", "are not consecutive branches of the model, in order")
        action, form = f.choice(r, "action", ACTIONS, where), f.choice(r, "form", FORMS, where)
        kind = f.choice(r, "input", INPUTS, where)
        f.get(r, "info", "dict", where)
        layers = f.get(r, "layers", "list", where)
        if (action == "slim") != (form == "slim") or (action == "slim") != (kind == "inner"):
            f.fail(f"{where}action", f"{action!r} with form {form!r} and input {kind!r} is inconsistent "
                                     "(slim: form slim, input inner; others: neither)")
        if action == "slim":
            _check_slim(f, r, layers, shapes, widths[labels[0]], where)
            continue
        if (action == "remove") != (form == "remove") or (action == "remove") != (not layers):
            f.fail(f"{where}action", f"{action!r} with form {form!r} and {len(layers)} layers is inconsistent "
                                     "(remove: form remove, no layers; bypass: another form and layers)")
        _check_chain(f, layers, shapes, widths[labels[0]], where)


def _pair(f: _Fields, pair: Any, shapes: dict[str, list[int]], field: str) -> tuple[str, str | None]:
    """(weight key, bias key or None) of a [weight key, bias key or null] pair of declared tensors."""
    if not (isinstance(pair, list) and len(pair) == 2):
        f.fail(field, "is not a [weight key, bias key or null] pair")
    w_key, b_key = f.value(pair[0], "str", f"{field}.0"), f.value(pair[1], "str?", f"{field}.1")
    for key in (k for k in (w_key, b_key) if k is not None):
        if key not in shapes:
            f.fail(field, f"names tensor {key!r}, which the recipe's tensors do not list")
    return w_key, b_key


def _check_slim(f: _Fields, r: dict, layers: list, shapes: dict[str, list[int]], width: int, where: str) -> None:
    """A slim replacement: producers [kept, in] (+ [kept] biases; [k * kept, in] for a fused producer
    split into info.chunks[j] = k equal chunks), one last map [width, kept]. An
    attention slim (info.kind "attention") keeps whole key/value groups: its key/value producers
    have fewer rows than the query's, each a multiple of info.kept_groups."""
    producers = f.get(r, "producers", "list", where)
    if len(layers) != 1 or not producers:
        f.fail(f"{where}layers", "a slim replacement needs one output map and at least one producer")
    info = r.get("info") if isinstance(r.get("info"), dict) else {}
    groups = info.get("kept_groups") if info.get("kind") == "attention" else None
    if groups is not None and (not isinstance(groups, int) or groups < 1):
        f.fail(f"{where}info.kept_groups", f"is {groups!r}, expected a positive number of key/value groups")
    chunks = info.get("chunks", [1] * len(producers))
    if (not isinstance(chunks, list) or len(chunks) != len(producers)
            or not all(isinstance(k, int) and k >= 1 for k in chunks)):
        f.fail(f"{where}info.chunks", f"is {chunks!r}, expected one positive chunk count per producer")
    kept = None
    for j, pair in enumerate(producers):
        field = f"{where}producers.{j}"
        w_key, b_key = _pair(f, pair, shapes, field)
        shape = shapes[w_key]
        kept = shape[0] // chunks[j] if kept is None else kept
        rows = shape[0] if len(shape) == 2 else None
        if rows is None or (rows != kept * chunks[j] if groups is None else rows % groups):
            want = (f"[{kept * chunks[j]}, in]" if groups is None
                    else f"[a multiple of {groups} key/value groups, in]")
            f.fail(f"tensors.{w_key}", f"is {shape}, expected a 2-D weight {want} ({field})")
        if b_key is not None and shapes[b_key] != [rows]:
            f.fail(f"tensors.{b_key}", f"is {shapes[b_key]}, expected a 1-D bias [{rows}] ({field})")
    _check_chain(f, layers, shapes, width, where, start=kept)


def _check_chain(f: _Fields, layers: list, shapes: dict[str, list[int]], width: int, where: str,
                 start: int | None = None) -> None:
    """Each layer is [weight key, bias key or null] of declared tensors: (out, in) weights, (out,)
    biases, in == previous out, from the stream width (or `start` features) back to it."""
    features = width if start is None else start
    for j, pair in enumerate(layers):
        field = f"{where}layers.{j}"
        w_key, b_key = _pair(f, pair, shapes, field)
        shape = shapes[w_key]
        if len(shape) != 2 or shape[1] != features:
            f.fail(f"tensors.{w_key}", f"is {shape}, expected a 2-D weight [out, {features}] ({field})")
        if b_key is not None and shapes[b_key] != [shape[0]]:
            f.fail(f"tensors.{b_key}", f"is {shapes[b_key]}, expected a 1-D bias [{shape[0]}] ({field})")
        features = shape[0]
    if layers and features != width:
        f.fail(f"{where}layers", f"end with {features} features, expected the stream width {width}")


def check_recipe_tensors(data: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The weights file holds exactly the tensors recipe.json lists, with those shapes, float and finite.

    Example:
        >>> nan = torch.full((2, 2), float("nan"))
        >>> check_recipe_tensors({"tensors": {"w": [2, 2]}}, {"w": nan}, Path("w"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.ModelLoadError: 'w' is invalid: tensor w holds NaN or Inf; ...
    """
    f = _Fields(path, ModelLoadError, _RECIPE_FIX)
    declared = data["tensors"]
    if set(tensors) != set(declared):
        odd = sorted(set(tensors) ^ set(declared))
        f.fail(f"tensor {odd[0]}", "is in only one of recipe.json and the weights file")
    for key, t in tensors.items():
        if list(t.shape) != declared[key]:
            f.fail(f"tensor {key}", f"has shape {list(t.shape)}, but recipe.json says {declared[key]}")
        if not t.is_floating_point():
            f.fail(f"tensor {key}", f"has dtype {t.dtype}, expected a floating-point type")
        if not torch.isfinite(t).all():
            f.fail(f"tensor {key}", "holds NaN or Inf")


def check_report(data: Any, path: Path, labels: set[str] | None = None) -> None:
    """Check a parsed report.json (the fields `Report` and the HTML report read); `labels`, when
    given, are the recipe's branch labels the report must stay within.

    Example:
        >>> check_report({"method": "m", "sparsity_target": "a lot"}, Path("report.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.ModelLoadError: 'report.json' is invalid: sparsity_target is "a lot", expected a ...
    """
    f = _Fields(path, ModelLoadError, _REPORT_FIX)
    if not isinstance(data, dict):
        f.fail("the file", "is not a JSON object")
    f.finite(data)
    f.get(data, "method", "str")
    f.get(data, "sparsity_target", "num")
    for key in ("sparsity_actual", "sparsity_all_params", "kv_fraction_kept"):
        f.get(data, key, "num", default=None)
    for key in ("params_before", "params_after", "block_params", "bypass_params", "flops_per_token_before",
                "flops_per_token_after"):
        f.get(data, key, "int", default=None)
    f.get(data, "options", "dict", default={})
    for key in ("replaced", "notes"):
        for i, item in enumerate(f.get(data, key, "list", default=[])):
            f.value(item, "str", f"{key}.{i}")
            if key == "replaced" and labels is not None and item not in labels:
                f.fail(f"replaced.{i}", f"is {item!r}, which is not a branch of the recipe")
    for i, b in enumerate(f.get(data, "branches", "list", default=[])):
        where = f"branches.{i}."
        f.value(b, "dict", where[:-1])
        label = f.get(b, "label", "str", where)
        if labels is not None and label not in labels:
            f.fail(f"{where}label", f"is {label!r}, which is not a branch of the recipe")
        f.choice(b, "kind", KINDS, where)
        f.get(b, "layer", "int>=0", where)
        f.get(b, "params", "int>=0", where)
        f.get(b, "replaced", "bool", where)
        f.get(b, "form", "str", where, default=None)
        for name, score in f.get(b, "scores", "dict", where, default={}).items():
            f.value(score, "num", f"{where}scores.{name}")
        fit = f.get(b, "fit", "dict", where, default={})
        f.get(fit, "params", "int>=0", f"{where}fit.", default=None)


def check_eval(data: Any, path: Path) -> None:
    """Check a parsed eval.json (`subfit-fx eval ... --json`): an object of strings, booleans and
    finite numbers (nested objects allowed), with `seq_len` a positive integer.

    Example:
        >>> check_eval({"perplexity": float("nan"), "seq_len": 8}, Path("eval.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: 'eval.json' is invalid: perplexity is nan, not a finite number; ...
    """
    f = _Fields(path, InputError, "regenerate it with 'subfit-fx eval DIR --text FILE --json > eval.json'")
    if not isinstance(data, dict):
        f.fail("the file", "is not a JSON object")
    f.finite(data)
    f.get(data, "seq_len", "int>=1")

    def scalars(obj: Any, field: str) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                scalars(value, f"{field}.{key}" if field else key)
        elif isinstance(obj, list) or not (obj is None or isinstance(obj, str | int | float)):
            f.fail(field, "is a list; expected a string, boolean, number or object")

    scalars(data, "")


def check_lm_eval(data: Any, path: Path) -> None:
    """Check a parsed lm_eval.json (`subfit-fx eval DIR --tasks ...`): an object with `tasks` (task
    names), `score` and `results` objects, finite numbers throughout.

    Example:
        >>> check_lm_eval({"tasks": ["t"], "score": {"t": 0.5}, "results": {}}, Path("lm_eval.json"))
    """
    f = _Fields(path, InputError, "regenerate it with 'subfit-fx eval DIR --tasks T1,T2'")
    if not isinstance(data, dict):
        f.fail("the file", "is not a JSON object")
    f.finite(data)
    for key in ("score", "results"):
        if not isinstance(data.get(key), dict):
            f.fail(key, "is missing or not an object")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        f.fail("tasks", "is missing or not a list of task names")


def check_bench(data: Any, path: Path) -> None:
    """Check a parsed bench.json (`subfit-fx bench ... --json`): timing rows, file sizes, repeats.

    Example:
        >>> check_bench({"rows": "fast"}, Path("bench.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: 'bench.json' is invalid: rows is "fast", expected a list; ...
    """
    f = _Fields(path, InputError, "regenerate it with 'subfit-fx bench A.onnx B.onnx --json > bench.json'")
    if not isinstance(data, dict):
        f.fail("the file", "is not a JSON object")
    f.finite(data)
    for i, row in enumerate(f.get(data, "rows", "list")):
        where = f"rows.{i}."
        f.value(row, "dict", where[:-1])
        f.choice(row, "stage", ("forward", "prefill", "decode"), where)
        f.get(row, "seq", "int>=1", where)
        for key in ("dense_ms", "compressed_ms", "speedup"):
            if f.get(row, key, "num", where) <= 0:
                f.fail(f"{where}{key}", f"is {row[key]}, expected a positive number")
    sizes = f.get(data, "bytes", "dict")
    for key in ("dense", "compressed"):
        f.get(sizes, key, "int>=1", "bytes.")
    f.get(data, "repeats", "int>=1")
    f.get(data, "threads", "int?>=1", default=None)
    kv = f.get(data, "kv_bytes_per_token", "dict", default={})
    for key, value in kv.items():
        f.value(value, "int>=0", f"kv_bytes_per_token.{key}")
