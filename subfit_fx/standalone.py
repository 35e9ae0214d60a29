"""Self-contained compressed directories: everything to run the compressed model without its base.

`write_standalone` adds to a compressed directory the kept weights and the bypass tensors
(`model.safetensors`, the bypass tensors under `subfit_tensors.*`, each stored once), the config
(with a `subfit` block: the replaced modules and the dropped weights), the tokenizer and
generation config of the base, and `modeling_subfit.py` (`subfit_fx.hf_modeling` plus generated
lines), so that both `subfit_fx.load(DIR)` and
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (`AutoModel` for encoders)
work after the base model is gone. The config's `model_type` is `subfit_<base>`: loading the
directory as a plain base model, whose replaced weights would be silently random, fails instead.

Module layouts are per architecture family (`LAYOUTS`); other families still get a self-contained
directory for `subfit_fx.load`, without the transformers modeling file.

Example:
    >>> sorted(LAYOUTS["llama"])
    ['attention', 'ffn']
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from subfit_fx import hf_modeling
from subfit_fx.errors import ModelLoadError
from subfit_fx.recipe import STORE, WEIGHTS, store_name

if TYPE_CHECKING:
    from subfit_fx.recipe import Recipe

__all__ = ["FORMAT", "LAYOUTS", "copy_model_files", "is_standalone", "load_base_skeleton", "weights_sha256",
           "write_standalone"]

FORMAT = "subfit-fx-hf/1"
MODELING = "modeling_subfit.py"
# tokenizer and generation files a model directory may hold (copied as they are)
_BASE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
               "chat_template.jinja", "*.model", "*.tiktoken", "generation_config.json")


@dataclass(frozen=True)
class BranchLayout:
    """Where a branch lives inside its layer module: the label suffix that identifies it, the entry
    module a bypass replaces (and whether it returns a tuple), modules after the entry that become
    identities, and the norm in front of it (an identity when the rewrite dropped its weights)."""

    label_suffix: str
    entry: str
    tuple_output: bool
    identities: tuple[str, ...] = ()
    norm: str | None = None


_PRENORM = {"attention": BranchLayout("self_attn", "self_attn", True, norm="input_layernorm"),
            "ffn": BranchLayout("mlp", "mlp", False, norm="post_attention_layernorm")}
_BERT = {"attention": BranchLayout("attention", "attention.self", True, ("attention.output.dense",)),
         "ffn": BranchLayout("intermediate+output", "intermediate", False, ("output.dense",))}
LAYOUTS: dict[str, dict[str, BranchLayout]] = {
    "llama": _PRENORM, "mistral": _PRENORM, "qwen2": _PRENORM, "qwen3": _PRENORM, "phi3": _PRENORM,
    "gemma": _PRENORM,
    "gpt2": {"attention": BranchLayout("attn", "attn", True, norm="ln_1"),
             "ffn": BranchLayout("mlp", "mlp", False, norm="ln_2")},
    "bert": _BERT, "roberta": _BERT,
}


def copy_model_files(source: Path, directory: Path) -> None:
    """Copy the tokenizer and generation config files of model directory `source` into `directory`
    (files already there stay).

    Example:
        >>> copy_model_files(Path("models/llama"), Path("out"))  # doctest: +SKIP
    """
    for pattern in _BASE_FILES:
        for path in Path(source).glob(pattern):
            if path.is_file() and not (Path(directory) / path.name).exists():
                shutil.copy2(path, Path(directory) / path.name)


def weights_sha256(model: torch.nn.Module,
                   value: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> str:
    """A hash of a model's weights (names, dtypes, shapes and bytes, tied weights once): the
    provenance a compressed directory records of its base. `value(name, tensor)` gives the
    values to hash in place of the model's own (weight offload reads them from the checkpoint).

    Example:
        >>> weights_sha256(torch.nn.Linear(2, 2, bias=False).requires_grad_(False).zero_())[:8]  # doctest: +SKIP
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        t = (value(name, tensor) if value is not None else tensor).detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def is_standalone(directory: Path) -> bool:
    """True when `directory` holds a self-contained compressed model (config with a subfit block).

    Example:
        >>> is_standalone(Path("/nonexistent"))
        False
    """
    config = Path(directory) / "config.json"
    if not (config.is_file() and (Path(directory) / WEIGHTS).is_file()):
        return False
    try:
        return isinstance(json.loads(config.read_text()).get("subfit"), dict)
    except (json.JSONDecodeError, AttributeError):
        return False


def _layer_path(label: str) -> str | None:
    match = re.match(r"^(.*\.\d+)\.[^.]+", label)
    return match.group(1) if match else None


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each key whose tensor an earlier key already holds (tied weights) -> that earlier key."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in first and tensor.numel():
            aliases[key] = first[ptr]
        else:
            first.setdefault(ptr, key)
    return aliases


class _Plan:
    """The module swaps that turn the base model into the compressed one, in transformers terms."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, kept: set[str]) -> None:
        self.model, self.recipe, self.kept = model, recipe, kept
        self.layout = LAYOUTS.get(getattr(model.config, "model_type", ""))
        self.kinds = {b["label"]: b["kind"] for b in recipe.branches}
        self.swapped: list[str] = []  # module paths whose weights leave the model
        self.replacements: list[dict[str, Any]] = []

    def _cache_layer(self, layer: str) -> int | None:
        if not self.model.can_generate():
            return None
        attention = self.layout["attention"].entry
        return getattr(self.model.get_submodule(f"{layer}.{attention}"), "layer_idx", None)

    def _layers(self, r: Any) -> list[list[str | None]]:
        return [[store_name(w), store_name(b) if b else None] for w, b in r.layers]

    def branch(self, r: Any) -> None:
        label = r.labels[0]
        kind = self.kinds[label]
        layout, layer = self.layout[kind], _layer_path(label)
        if layer is None or label != f"{layer}.{layout.label_suffix}":
            raise ValueError(f"branch '{label}' does not have the {kind} layout of this architecture")
        identities = [f"{layer}.{p}" for p in layout.identities]
        norm = f"{layer}.{layout.norm}" if layout.norm else None
        if norm and not any(k.startswith(norm + ".") for k in self.kept):
            identities.append(norm)
        entry = f"{layer}.{layout.entry}"
        self.swapped += [entry, *identities]
        self.replacements.append({
            "type": "branch", "entry": entry, "identities": identities, "tuple_output": layout.tuple_output,
            "cache_layer": self._cache_layer(layer) if kind == "attention" else None, "layers": self._layers(r)})

    def slim(self, r: Any) -> None:
        modules = r.info.get("modules") or []
        pairs = [*r.producers, *r.layers]
        try:
            linear = all(isinstance(self.model.get_submodule(m), torch.nn.Linear) for m in modules)
        except AttributeError:
            linear = False
        if len(modules) != len(pairs) or not linear:
            raise ValueError(f"width-pruned branch '{r.labels[0]}' does not map onto linear modules")
        self.swapped += modules
        entry = {"type": "slim", "modules": modules,
                 "layers": [[store_name(w), store_name(b) if b else None] for w, b in pairs]}
        if r.info.get("kind") == "attention":
            entry["heads"] = [modules[0].rpartition(".")[0], r.info["groups"], r.info["kept_groups"]]
        self.replacements.append(entry)

    def span(self, r: Any) -> None:
        layers = list(dict.fromkeys(_layer_path(label) for label in r.labels))
        covered = [label for label in self.kinds if _layer_path(label) in layers]
        if None in layers or sorted(covered) != sorted(r.labels):
            raise ValueError(f"span {r.labels[0]}..{r.labels[-1]} does not cover whole layers")
        self.swapped += layers
        self.replacements.append({"type": "layers", "modules": layers,
                                  "cache_layers": [self._cache_layer(p) for p in layers],
                                  "layers": self._layers(r) if r.action == "bypass" else []})

    def build(self) -> dict[str, Any]:
        if self.layout is None:
            raise ValueError(f"no module layout for model_type '{self.model.config.model_type}' (supported: "
                             f"{', '.join(LAYOUTS)})")
        for r in self.recipe.replacements:
            if r.action == "slim":
                self.slim(r)
            elif r.is_span():
                self.span(r)
            else:
                self.branch(r)
        return {"replacements": self.replacements}


def _kept_weights(program: torch.export.ExportedProgram, prefix: str = "hf.") -> set[str]:
    return {k[len(prefix):] for k in program.state_dict if k.startswith(prefix)}


def write_standalone(program: torch.export.ExportedProgram, recipe: Recipe, base: torch.nn.Module,
                     directory: Path, base_dir: Path | None = None) -> list[str]:
    """Write the self-contained part of a compressed directory; return notes (e.g. why transformers
    cannot load it). Does nothing (returns a note) for a base that is not a transformers model.

    Example:
        >>> write_standalone(c.program, c.recipe, c.base_model, Path("out"))  # doctest: +SKIP
        []
    """
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel):
        return ["the base is not a transformers model: the directory needs it to load (load(dir, model=...))"]
    directory = Path(directory)
    state = base.state_dict()
    aliases = _tied_aliases(state)
    kept_program = _kept_weights(program)
    unknown = kept_program - set(state)
    if unknown:
        raise ModelLoadError(f"the compressed program holds weights the base lacks ({sorted(unknown)[:2]}); "
                             "save the result of compress() on its own base model")
    notes: list[str] = []
    plan = _Plan(base, recipe, kept_program)
    try:
        spec = plan.build()
        kept = {k for k in state if not any(k.startswith(p + ".") for p in plan.swapped)}
        canonical = {aliases.get(k, k) for k in kept_program}
        extra = {aliases.get(k, k) for k in kept} - canonical
        # weights the dense program never used either (BERT's pooler) may stay; a weight of a
        # replaced layer that the rewrite dropped may not
        touched = {_layer_path(label) for label in recipe.replaced_labels()}
        if not canonical <= {aliases.get(k, k) for k in kept} or any(_layer_path(k) in touched for k in extra):
            raise ValueError("its module swaps do not keep exactly the weights the rewrite keeps")
    except ValueError as exc:
        notes.append(f"transformers cannot load this directory ({exc}); subfit_fx.load(DIR) can")
        spec, kept = None, set(kept_program)
    kept = {aliases.get(k, k) for k in kept}  # a tied weight under the name its first holder has
    tensors = {k: state[k].detach().cpu().contiguous() for k in sorted(kept)}
    tensors.update({f"{STORE}.{store_name(k)}": v.detach().to("cpu", recipe.storage_dtype()).contiguous()
                    for k, v in recipe.tensors.items()})
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    _write_config(base, recipe, spec, sorted(set(state) - kept - set(aliases)), directory)
    if base_dir is not None and base_dir.is_dir():
        copy_model_files(base_dir, directory)
    if base.can_generate() and not (directory / "generation_config.json").is_file():
        base.generation_config.save_pretrained(directory)
    return notes


def _write_config(base: Any, recipe: Recipe, spec: dict[str, Any] | None, dropped: list[str],
                  directory: Path) -> None:
    config = base.config.to_dict()
    model_type, causal = config["model_type"], base.can_generate()
    block: dict[str, Any] = {
        "format": FORMAT, "base_model_type": model_type, "base_architectures": config.get("architectures")
        or [type(base).__name__], "task": "causal-lm" if causal else "encoder", "dropped": dropped,
        "base_weights_sha256": recipe.base_sha256, "method": recipe.method,
        "tensors": {store_name(k): list(v.shape) for k, v in sorted(recipe.tensors.items())},
        "removed_attention_layers": recipe.removed_attention_layers(),
    }
    if spec is not None:
        block["replacements"] = spec["replacements"]
        stem = "Subfit" + type(base).__name__
        config_cls = "Subfit" + type(base.config).__name__
        config["auto_map"] = {"AutoConfig": f"modeling_subfit.{config_cls}",
                              ("AutoModelForCausalLM" if causal else "AutoModel"): f"modeling_subfit.{stem}"}
        config["architectures"] = [stem]
        source = Path(hf_modeling.__file__).read_text()
        (directory / MODELING).write_text(
            f"{source}\n\n# --- generated by subfit_fx: binds this file to {type(base).__name__} ---\n"
            f"from transformers import {type(base.config).__name__} as _BaseConfig  # noqa: E402\n"
            f"from transformers import {type(base).__name__} as _BaseModel  # noqa: E402\n\n\n"
            f"class {config_cls}(_BaseConfig):\n    model_type = \"subfit_{model_type}\"\n\n\n"
            f"class {stem}(SubfitMixin, _BaseModel):\n    config_class = {config_cls}\n")
    config["model_type"] = f"subfit_{model_type}"
    config["subfit"] = block
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_base_skeleton(directory: Path) -> torch.nn.Module:
    """The base architecture with the kept weights of a self-contained directory; the weights the
    compression dropped are zeros (the rewrite removes every use of them).

    Example:
        >>> model = load_base_skeleton(Path("out"))  # doctest: +SKIP
    """
    import transformers as tf

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    block = config.pop("subfit")
    config.pop("auto_map", None)
    config.pop("model_type")
    config["architectures"] = block["base_architectures"]
    try:
        base_config = tf.AutoConfig.for_model(block["base_model_type"], **config)
    except Exception as exc:  # transformers raises several types for an unknown / bad config
        raise ModelLoadError(f"cannot rebuild the '{block['base_model_type']}' config of '{directory}' "
                             f"({str(exc).splitlines()[0][:120]}); update transformers or compress again") from exc
    cls = tf.AutoModelForCausalLM if block["task"] == "causal-lm" else tf.AutoModel
    with torch.random.fork_rng():
        model = cls.from_config(base_config)
    weights = {k: v for k, v in load_file(str(directory / WEIGHTS)).items() if not k.startswith(STORE + ".")}
    # the base runs in the dtype it was compressed in (its weights were saved in it), not float32
    model = model.to(next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32))
    own = model.state_dict()
    aliases = _tied_aliases(own)
    unexpected = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
    absent = sorted(set(own) - set(weights) - set(block["dropped"]) - set(aliases))
    if unexpected or absent:
        raise ModelLoadError(f"'{directory / WEIGHTS}' does not match its config (unexpected or misshapen "
                             f"{unexpected[:2]}, missing {absent[:2]}); compress again")
    model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    with torch.no_grad():
        for key in block["dropped"]:
            state[key].zero_()
    return model.eval()
