"""The Recipe: what to replace, with what. Every method (SubFit and each baseline) is a policy
that produces one; `subfit_fx.rewrite.apply_recipe` applies any Recipe to any capture of the
model. A Recipe saves as JSON + safetensors and re-applies without re-calibration.

Example:
    >>> r = Recipe(method="subfit", branches=[], replacements=[Replacement(("h.0.attn",), "remove")])
    >>> r.replaced_labels()
    ['h.0.attn']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from subfit_fx.branches import Branch
from subfit_fx.errors import ModelLoadError, RecipeMismatchError
from subfit_fx.fit import Fit
from subfit_fx.schema import check_recipe, check_recipe_tensors, dumps

__all__ = ["FORMAT", "STORE", "WEIGHTS", "Recipe", "Replacement", "read_store", "recipe_from_fits", "store_name"]

FORMAT = "subfit-fx-recipe/1"
WEIGHTS = "model.safetensors"  # a self-contained directory's weights (subfit_fx.standalone)
STORE = "subfit_tensors"  # the module holding the recipe tensors there


def store_name(key: str) -> str:
    """The name of a recipe tensor inside the model's parameter store (no dots allowed there).

    Example:
        >>> store_name("r0.1.weight")
        'r0__1__weight'
    """
    return key.replace(".", "__")


@dataclass
class Replacement:
    """One replaced span: a single branch (SubFit) or a run of consecutive branches covering whole
    layers (layer-level baselines). `action` "remove" deletes it; "bypass" adds
    `chain(input)` where chain is `layers`, linear maps given as (weight key, bias key or None)
    into `Recipe.tensors`; "slim" (width pruning of one branch with a channel site,
    `subfit_fx.channels`; form "slim", input "inner") narrows the branch: each of `producers`
    (the site's producer matmuls, in graph order) gets the weight / bias given (its kept rows),
    the channel-wise ops between them run on the kept channels, and `layers` (one map, usually
    refitted) replaces the last matmul. `info["kept"]` lists the kept channel indices."""

    labels: tuple[str, ...]
    action: str  # "remove" | "bypass"
    form: str = "remove"  # "remove" | "linear" | "lowrank" | "shared"
    input: str = "normalized"  # "normalized" | "stream"
    layers: list[tuple[str, str | None]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # fit error, rank, ridge (report only)
    producers: list[tuple[str, str | None]] = field(default_factory=list)  # "slim" only

    def is_span(self) -> bool:
        """True for a multi-branch (layer-level) replacement."""
        return len(self.labels) > 1


@dataclass
class Recipe:
    """The plan for one model. `branches` records every branch (label, kind, layer, params, width)
    of the model it was made for, so a mismatch is caught before any computation."""

    method: str
    branches: list[dict[str, Any]]
    replacements: list[Replacement]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    base_sha256: str | None = None  # provenance: `standalone.weights_sha256` of the base

    def storage_dtype(self) -> torch.dtype:
        """The dtype the bypass weights are saved in: the model's (`options["dtype"]`), float32 for
        recipes written before the dtype was recorded.

        Example:
            >>> Recipe("m", [], [], options={"dtype": "bfloat16"}).storage_dtype()
            torch.bfloat16
        """
        return getattr(torch, str(self.options.get("dtype", "float32")))

    def replaced_labels(self) -> list[str]:
        """Labels of all replaced branches, in recipe order."""
        return [label for r in self.replacements for label in r.labels]

    def removed_attention_labels(self) -> list[str]:
        """Attention branches whose computation (and KV cache) the recipe removes."""
        kinds = {b["label"]: b["kind"] for b in self.branches}
        slim = set(self.slimmed_labels())
        return [label for label in self.replaced_labels() if kinds.get(label) == "attention" and label not in slim]

    def removed_attention_layers(self) -> list[int]:
        """Layer indices (`Branch.layer`) whose attention the recipe replaces: their KV cache goes."""
        removed = set(self.removed_attention_labels())
        return sorted({b["layer"] for b in self.branches if b["label"] in removed})

    def bypass_params(self) -> int:
        """Parameters the recipe adds (each tensor counted once, so a shared basis counts once)."""
        used = {key for r in self.replacements for w, b in r.layers + r.producers for key in (w, b) if key}
        return sum(self.tensors[k].numel() for k in used)

    def kept_params(self, branches: list[Branch]) -> int:
        """Parameters of replaced branches that stay in use: norms feeding single-branch bypasses
        that read the normalized input.

        Example:
            >>> Recipe("m", [], []).kept_params([])
            0
        """
        by_label = {b.label: b for b in branches}
        return sum(by_label[r.labels[0]].norm_params for r in self.replacements
                   if (r.action == "slim" or (r.action == "bypass" and not r.is_span() and r.input == "normalized"))
                   and by_label[r.labels[0]].normalized)

    def slimmed_labels(self) -> list[str]:
        """Branches the recipe narrows (width pruning) rather than replaces.

        Example:
            >>> Recipe("m", [], [Replacement(("f",), "slim", "slim", "inner")]).slimmed_labels()
            ['f']
        """
        return [r.labels[0] for r in self.replacements if r.action == "slim"]

    def check_against(self, branches: list[Branch]) -> None:
        """Raise `RecipeMismatchError` unless the recipe fits a model with these branches.

        Example:
            >>> Recipe("x", [{"label": "a", "width": 4}], []).check_against([])  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            subfit_fx.errors.RecipeMismatchError: ...
        """
        found = {b.label: b for b in branches}
        missing = [b["label"] for b in self.branches if b["label"] not in found]
        if missing or len(found) != len(self.branches):
            raise RecipeMismatchError(
                f"recipe was made for another model: branch labels differ (e.g. {missing[:2] or sorted(found)[:2]});"
                " apply it to the model named in recipe.json or compress this model again")
        for b in self.branches:
            if (found[b["label"]].width, found[b["label"]].params) != (b["width"], b["params"]) or (
                    found[b["label"]].kind, found[b["label"]].layer) != (b["kind"], b["layer"]):
                have = found[b["label"]]
                raise RecipeMismatchError(
                    f"recipe branch '{b['label']}' is {b['kind']} of layer {b['layer']}, width {b['width']} / "
                    f"{b['params']} params but the model's is {have.kind} of layer {have.layer}, width "
                    f"{have.width} / {have.params}; apply it "
                    "to the model it was made for")
        for r in self.replacements:
            width = found[r.labels[0]].width
            for w_key, b_key in r.layers:
                if w_key not in self.tensors or (b_key and b_key not in self.tensors):
                    raise RecipeMismatchError(f"recipe tensor '{w_key}' is missing from the weights file; "
                                              "the recipe directory is incomplete: compress again")
            if r.layers and r.action != "slim":
                first, last = self.tensors[r.layers[0][0]], self.tensors[r.layers[-1][0]]
                if first.shape[1] != width or last.shape[0] != width:
                    raise RecipeMismatchError(
                        f"bypass of '{r.labels[0]}' maps {first.shape[1]} -> {last.shape[0]} features but "
                        f"the model's stream has {width}; apply the recipe to the model it was made for")

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON-able part (weights are stored separately)."""
        return {
            "format": FORMAT, "method": self.method, "base_model": self.base_model,
            "base_weights_sha256": self.base_sha256,
            "options": self.options, "branches": self.branches,
            "replacements": [_replacement_json(r) for r in self.replacements],
            "tensors": {k: list(v.shape) for k, v in sorted(self.tensors.items())},
        }

    def save(self, directory: Path, weights: bool = True) -> None:
        """Write `recipe.json` and (unless `weights` is False: a self-contained directory keeps the
        tensors in its model.safetensors) `weights.safetensors` into an existing directory.

        Example:
            >>> Recipe("subfit", [], []).save(Path("out"))  # doctest: +SKIP
        """
        directory = Path(directory)
        (directory / "recipe.json").write_text(dumps(self.to_json(), "recipe.json"))
        if not weights:
            return
        tensors = {k: v.detach().to("cpu", self.storage_dtype()).contiguous() for k, v in sorted(self.tensors.items())}
        save_file(tensors, str(directory / "weights.safetensors"), metadata={"format": FORMAT})

    @classmethod
    def load(cls, directory: Path) -> Recipe:
        """Read a recipe directory (safetensors only; nothing is unpickled).

        Example:
            >>> Recipe.load(Path("out"))  # doctest: +SKIP
        """
        directory = Path(directory)
        path = directory / "recipe.json"
        if not path.is_file():
            raise ModelLoadError(f"'{directory}' holds no recipe.json; pass a directory written by "
                                 "'subfit-fx compress' or Compressed.save()")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ModelLoadError(f"'{path}' is not valid JSON ({str(exc)[:120]}); compress again") from exc
        check_recipe(data, path, FORMAT)
        if data.get("format") != FORMAT:
            raise ModelLoadError(f"'{path}' has format {data.get('format')!r}, expected {FORMAT!r}; "
                                 "re-create it with this version of subfit_fx")
        try:
            tensors = _read_tensors(directory, list(data["tensors"]))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot read '{_tensors_file(directory)}' ({exc}); the file "
                                 "is corrupt or truncated: compress again") from exc
        check_recipe_tensors(data, tensors, _tensors_file(directory))
        replacements = [Replacement(labels=tuple(r["labels"]), action=r["action"], form=r["form"],
                                    input=r["input"], layers=[tuple(p) for p in r["layers"]], info=r["info"],
                                    producers=[tuple(p) for p in r.get("producers", [])])
                        for r in data["replacements"]]
        return cls(method=data["method"], branches=data["branches"], replacements=replacements,
                   tensors=tensors, base_model=data.get("base_model"), options=data.get("options", {}),
                   base_sha256=data.get("base_weights_sha256"))


def _replacement_json(r: Replacement) -> dict[str, Any]:
    out = {**asdict(r), "labels": list(r.labels), "layers": [list(pair) for pair in r.layers]}
    if r.producers:
        out["producers"] = [list(pair) for pair in r.producers]
    else:  # recipes without width pruning read as they always did
        del out["producers"]
    return out


def _tensors_file(directory: Path) -> Path:
    """Where a directory keeps its recipe tensors: weights.safetensors, or (self-contained) the
    model's weights file."""
    old = directory / "weights.safetensors"
    return old if old.is_file() or not (directory / WEIGHTS).is_file() else directory / WEIGHTS


def _read_tensors(directory: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    path = _tensors_file(directory)
    if path.name != WEIGHTS:
        return load_file(str(path)) if keys else {}
    # a self-contained directory: every tensor of the store (schema.check_recipe_tensors then
    # finds the ones recipe.json does not list, as well as the missing ones)
    return read_store(path)


def read_store(path: Path) -> dict[str, torch.Tensor]:
    """The recipe tensors kept in a self-contained directory's weights file, by recipe key.

    Example:
        >>> read_store(Path("out/model.safetensors"))  # doctest: +SKIP
        {'r0.0.weight': tensor(...)}
    """
    prefix = STORE + "."
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open is not iterable)
        # store_name's inverse: recipe keys hold no "__"
        return {k[len(prefix):].replace("__", "."): f.get_tensor(k) for k in keys}



def branch_records(branches: list[Branch]) -> list[dict[str, Any]]:
    """The per-branch identity a Recipe keeps (label, kind, layer, params, width).

    Example:
        >>> branch_records([])
        []
    """
    return [{"label": b.label, "kind": b.kind, "layer": b.layer, "params": b.params, "width": b.width}
            for b in branches]


def recipe_from_fits(method: str, branches: list[Branch], fits: dict[str, Fit], inputs: dict[str, str],
                     options: dict[str, Any] | None = None) -> Recipe:
    """Build a Recipe of single-branch replacements from fits (shared layers stored once).

    Example:
        >>> recipe_from_fits("subfit", [], {}, {}).replacements
        []
    """
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    replacements = []
    order = {b.label: i for i, b in enumerate(branches)}
    for i, label in enumerate(sorted(fits, key=order.__getitem__)):
        fit = fits[label]
        layers: list[tuple[str, str | None]] = []
        for j, (weight, bias) in enumerate(fit.layers):
            if j in fit.shared:
                # one tensor per distinct shared weight (fits may hold equal copies of one basis)
                key = next((k for k, t in shared.items() if t.shape == weight.shape and torch.equal(t, weight)), None)
                if key is None:
                    key = f"shared{len(shared)}.weight"
                    shared[key] = weight
                tensors[key] = shared[key]
                layers.append((key, None))
                continue
            w_key = f"r{i}.{j}.weight"
            tensors[w_key] = weight
            b_key = None
            if bias is not None:
                b_key = f"r{i}.{j}.bias"
                tensors[b_key] = bias
            layers.append((w_key, b_key))
        action = "remove" if fit.form == "remove" else "bypass"
        info = {"fit_error": fit.error, "ridge": fit.ridge, "params": fit.params}
        if fit.form in ("lowrank", "shared"):
            info["rank"] = int(fit.layers[0][0].shape[0])
        replacements.append(Replacement((label,), action, fit.form, fit.input or inputs.get(label, "normalized"),
                                        layers, info))
    return Recipe(method, branch_records(branches), replacements, tensors, options=options or {})
