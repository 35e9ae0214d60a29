"""What an exporter can start from: a Hugging Face model, a captured program, or a compressed model.

`as_source` normalizes the Python objects; `load_source` reads the CLI's MODEL_OR_DIR strings
(`builtin:ARCH`, a Hugging Face model directory, or a directory written by `Compressed.save`,
recognized by its `recipe.json`).

Example:
    >>> from subfit_fx.zoo import tiny_model
    >>> src = as_source(tiny_model("llama"))
    >>> src.vocab_size, src.causal, src.recipe is None
    (128, True, True)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from subfit_fx.capture import HFWrapper, capture, is_causal_lm
from subfit_fx.errors import InputError, ModelLoadError

__all__ = ["ExportSource", "as_source", "load_source", "tokenizer_dir"]

RECIPE_FILE = "recipe.json"


class ExportSource:
    """A model to export: the eager model (when known), its recipe (when compressed) and the
    no-cache program (captured on first use).

    `reference` is what ONNX outputs are checked against: the eager model for a dense model, the
    rewritten program for a compressed one.
    """

    def __init__(self, *, model: torch.nn.Module | None = None,
                 program: torch.export.ExportedProgram | None = None, recipe: Any = None,
                 name: str = "model", tokenizer_dir: Path | None = None) -> None:
        if model is None and program is None:
            raise InputError("an export source needs a model or a captured program")
        self.model = model
        self.recipe = recipe
        self.name = name
        self.tokenizer_dir = tokenizer_dir
        self._program = program

    @functools.cached_property
    def program(self) -> torch.export.ExportedProgram:
        """The no-cache program `(input_ids, attention_mask) -> logits | last_hidden_state`."""
        if self._program is not None:
            return self._program
        if self.recipe is not None:
            from subfit_fx.rewrite import apply_recipe

            return apply_recipe(capture(self.model), self.recipe)
        return capture(self.model)

    @property
    def causal(self) -> bool:
        """True for a causal LM (output `logits`), False for an encoder (`last_hidden_state`)."""
        if self.model is not None:
            return is_causal_lm(self.model)
        return self.vocab_size == _output_width(self.program)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (it sets the parity tolerance)."""
        params = self.model.parameters() if self.model is not None else self.program.state_dict.values()
        return next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    @property
    def output_name(self) -> str:
        """The ONNX output name of the plain graph."""
        return "logits" if self.causal else "last_hidden_state"

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of token ids the model embeds (random validation tokens are drawn below it)."""
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "vocab_size", None):
            return int(config.vocab_size)
        return _embedding_rows(self.program)

    def metadata(self) -> dict[str, str]:
        """What exported files record about their source (read back by runtime and CLI)."""
        from subfit_fx.capture import max_positions
        from subfit_fx.onnx_format import CONTEXT_KEY, SOURCE_KEY, TOKENIZER_KEY, VOCAB_KEY

        meta = {SOURCE_KEY: self.name, VOCAB_KEY: str(self.vocab_size)}
        if self.model is not None and max_positions(self.model):
            meta[CONTEXT_KEY] = str(max_positions(self.model))
        if self.tokenizer_dir is not None:
            meta[TOKENIZER_KEY] = str(Path(self.tokenizer_dir).resolve())
        return meta

    @property
    def reference(self) -> Any:
        """`(input_ids, attention_mask) -> tensor` in torch, for parity checks."""
        if self.model is not None and self.recipe is None and self._program is None:
            wrapper = self.model if isinstance(self.model, HFWrapper) else HFWrapper(self.model)
            return wrapper.eval()
        return self.program.module()


def _output_width(ep: torch.export.ExportedProgram) -> int:
    out = next(n for n in ep.graph.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], list | tuple) else out.args[0]
    return int(first.meta["val"].shape[-1])


def _embedding_rows(ep: torch.export.ExportedProgram) -> int:
    """Rows of the embedding table that `input_ids` indexes."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            indices = node.args[1]
            if getattr(indices, "name", None) == "input_ids":
                return int(node.args[0].meta["val"].shape[0])
    raise InputError("cannot find the token embedding of the program (no aten.embedding reading "
                     "input_ids); pass a Hugging Face model instead of the program")


def as_source(obj: Any, *, name: str | None = None) -> ExportSource:
    """Wrap a Hugging Face model, an `ExportedProgram` or a `Compressed` result as an `ExportSource`.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> as_source(tiny_model("bert")).output_name
        'last_hidden_state'
    """
    if isinstance(obj, ExportSource):
        return obj
    if obj is None:
        raise InputError("nothing to export: pass a model, an ExportedProgram or a compressed model")
    if isinstance(obj, torch.export.ExportedProgram):
        return ExportSource(program=obj, name=name or "program")
    if hasattr(obj, "recipe") and hasattr(obj, "base_model") and hasattr(obj, "program"):
        if _low_precision(obj.base_model):  # re-applied to a float32 copy: the program is bf16 / fp16
            return ExportSource(model=_float32(obj.base_model), recipe=obj.recipe, name=name or "compressed")
        return ExportSource(model=obj.base_model, program=obj.program, recipe=obj.recipe,
                            name=name or "compressed")
    if isinstance(obj, torch.nn.Module):
        model = obj.hf if isinstance(obj, HFWrapper) else obj
        model = _float32(model) if _low_precision(model) else model
        return ExportSource(model=model.eval(), name=name or type(model).__name__)
    raise InputError(f"cannot export a {type(obj).__name__}: pass a Hugging Face model, an "
                     "ExportedProgram or the result of subfit_fx.compress()")


def _low_precision(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and any(
        p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


def _float32(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy of a bfloat16 / float16 model: ONNX files are float32 (ONNX Runtime's CPU
    provider has no bfloat16 MatMul), and the upcast of the weights is exact, so the file computes
    the model's function at higher precision (docs/deploy.md, "Precision")."""
    import copy

    return copy.deepcopy(model).to("cpu", torch.float32)


def load_source(spec: str) -> ExportSource:
    """Resolve MODEL_OR_DIR: `builtin:ARCH`, a Hugging Face model directory, or a compressed directory.

    Example:
        >>> load_source("builtin:llama").model.config.num_hidden_layers
        4
    """
    path = Path(spec)
    if not spec.startswith("builtin:") and (path / RECIPE_FILE).is_file():
        try:
            from subfit_fx import load
        except ImportError as exc:
            raise ModelLoadError(f"'{spec}' is a compressed model but this subfit_fx has no "
                                 "subfit_fx.load(); update subfit_fx") from exc
        compressed = load(path)
        base = getattr(compressed.recipe, "base_model", None)
        # the base spec first: `generate` falls back to byte tokens for builtin: models
        src = as_source(compressed, name=f"{base}+{path.name}" if base else path.name)
        src.tokenizer_dir = tokenizer_dir(path) or tokenizer_dir(_base_dir(compressed))
        return src
    from subfit_fx.models import resolve_model

    model = resolve_model(spec, dtype="float32")  # ONNX files are float32 (see _float32)
    return ExportSource(model=model, name=spec if spec.startswith("builtin:") else path.name,
                        tokenizer_dir=None if spec.startswith("builtin:") else tokenizer_dir(path))


def _base_dir(compressed: Any) -> Path | None:
    recipe = getattr(compressed, "recipe", None)
    base = getattr(compressed, "base_dir", None) or getattr(recipe, "base_model", None)
    return Path(base) if isinstance(base, str | Path) else None


def tokenizer_dir(path: Path | None) -> Path | None:
    """`path` when it holds tokenizer files, else None.

    Example:
        >>> tokenizer_dir(None) is None
        True
    """
    if path is None:
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return path if any((path / n).is_file() for n in names) else None
