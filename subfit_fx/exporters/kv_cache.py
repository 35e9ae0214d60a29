"""Decoder-with-KV-cache ONNX export: one graph for prefill (past length 0) and decode.

Inputs `input_ids`, `attention_mask` (past + new tokens), `position_ids` and
`past_key_values.{j}.key/value`; outputs `logits` and `present.{j}.key/value` (optimum's naming,
which its `ORTModelForCausalLM` expects). The graph is our own `torch.export` capture of a wrapper
that builds a `DynamicCache` from the flat past tensors, rather than transformers'
`DynamoExporter`: we need the `ExportedProgram` between capture and ONNX conversion to apply the
recipe, choose which layers have a cache at all, and give every layer's past length one symbol.

A recipe that replaces attention layers is applied to this capture with `apply_recipe`. The
capture leaves those layers out of the cache inputs and outputs from the start: the wrapper gives
each of them a zero cache of the right length, built from the sizes of a kept layer's cache (or
of `attention_mask` when none is kept), so nothing in the graph reads a removed layer's cache -
Hugging Face sizes the causal mask from layer 0's cache, and a removed layer 0 must not break
that - and the rewrite's dead-code elimination takes the zero cache away with the attention.
(Passing the removed caches through and pruning them after conversion does not work reliably:
`torch.onnx.export` re-traces the program and reads shared sizes from whichever input carries
them, removed caches included.)

Example:
    >>> from subfit_fx.zoo import tiny_model
    >>> r = export_onnx_kv(tiny_model("llama"), "out/llama-kv.onnx", force=True)  # doctest: +SKIP
    >>> r.inputs[:3]  # doctest: +SKIP
    ['input_ids', 'attention_mask', 'position_ids']
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers.cache_utils import DynamicCache

from subfit_fx.capture import is_causal_lm
from subfit_fx.eager import slim_modules
from subfit_fx.errors import CaptureError, InputError, RecipeMismatchError
from subfit_fx.exporters.artifacts import model_bytes, save_model, set_metadata, staged_output
from subfit_fx.exporters.onnx_export import BATCH, OPSET, SEQUENCE, ExportError, ExportResult, check_opset, to_onnx
from subfit_fx.exporters.onnx_graph import drop_unused_inputs, rename_dims
from subfit_fx.exporters.sources import ExportSource, as_source
from subfit_fx.exporters.validate import Reference, Tolerance, check_kv, tolerance_for
from subfit_fx.onnx_format import CACHE_LAYERS_KEY, KIND_KEY, KIND_KV_CACHE, PAST, PAST_SEQUENCE, PRESENT

__all__ = [
    "CacheCapture", "CacheWrapper", "cache_program", "cache_shapes", "capture_with_cache", "export_onnx_kv",
    "removed_attention_layers",
]

TOTAL_SEQUENCE = "total_sequence_length"


def cache_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer's cache, read off one eager step.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> cache_shapes(tiny_model("llama", layers=2))
        [(2, 16), (2, 16)]
    """
    with torch.no_grad():
        out = model(input_ids=torch.full((1, 2), 3, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in cache.layers]


class CacheWrapper(torch.nn.Module):
    """`(input_ids, attention_mask, position_ids, past) -> (logits, present)` over a Hugging Face causal LM.

    `past` and `present` hold one (key, value) pair per layer in `cache_layers` (default: all),
    shaped (batch, kv_heads, length, head_dim); the other layers get a zero cache of the same
    length (their attention is about to be replaced). The model sits under `.hf`, as in
    `HFWrapper`, so branch labels match the plain capture.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> w = CacheWrapper(tiny_model("llama"))
        >>> ids = torch.ones(1, 3, dtype=torch.long)
        >>> past = [(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))] * 2
        >>> logits, present = w(ids, torch.ones_like(ids), torch.arange(3)[None], past)
        >>> tuple(present[0][0].shape)
        (1, 2, 3, 16)
    """

    def __init__(self, model: torch.nn.Module, cache_layers: list[int] | None = None) -> None:
        super().__init__()
        self.hf = model
        self.shapes = cache_shapes(model)
        self.cache_layers = list(range(len(self.shapes))) if cache_layers is None else sorted(cache_layers)
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed the kwarg to `cache` (`past_key_values` is deprecated)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.takes_positions = "position_ids" in params

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list]:
        given = dict(zip(self.cache_layers, past, strict=True))
        if past:
            batch, past_len = past[0][0].shape[0], past[0][0].shape[2]
        else:
            batch, past_len = input_ids.shape[0], attention_mask.shape[1] - input_ids.shape[1]
        # Without a config every layer is a plain DynamicLayer: a sliding-window layer would cut
        # its cache with Python ints fixed at trace time (the mask still applies the window).
        cache = DynamicCache()
        for layer, (heads, head_dim) in enumerate(self.shapes):
            if layer in given:
                key, value = given[layer]
            else:
                key = value = torch.zeros(batch, heads, past_len, head_dim, dtype=self.dtype,
                                          device=input_ids.device)
            cache.update(key, value, layer)
        kwargs = {"position_ids": position_ids} if self.takes_positions else {}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **{self.cache_kwarg: cache}, **kwargs)
        grown = getattr(out, "cache", None) or out.past_key_values
        return out.logits, [(grown.layers[j].keys, grown.layers[j].values) for j in self.cache_layers]


def _sdpa_with_gqa() -> contextlib.AbstractContextManager:
    """Trace grouped-query attention as one SDPA call with `enable_gqa` instead of `repeat_kv`.

    transformers copies every key/value head `groups` times before SDPA unless this switch is on
    (it keeps the copy on CUDA for kernel reasons). In an exported graph that copy runs on the
    whole cache at every decode step; without it, opset 23's Attention op reads the cache's
    key/value heads directly.
    """
    return mock.patch.dict(os.environ, {"TRANSFORMERS_SDPA_FORCE_GQA": "1"})


@dataclass
class CacheCapture:
    """A KV-cache capture: the program, the ONNX names of its flat inputs/outputs, the cached layers."""

    program: torch.export.ExportedProgram
    input_names: list[str]
    output_names: list[str]
    cache_layers: list[int]


def capture_with_cache(model: torch.nn.Module, cache_layers: list[int] | None = None) -> CacheCapture:
    """Capture a causal LM with the KV cache of `cache_layers` (default all) as inputs and outputs.

    Batch, new-token and past lengths are dynamic; all layers share one past-length symbol.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> cap = capture_with_cache(tiny_model("llama"), cache_layers=[1])
        >>> cap.input_names[3:], cap.output_names
        (['past_key_values.1.key', 'past_key_values.1.value'], ['logits', 'present.1.key', 'present.1.value'])
    """
    if not is_causal_lm(model):
        raise InputError(f"{type(model).__name__} is not a causal LM; a KV-cache export needs one "
                         "(export encoders without the KV cache)")
    model.eval()
    wrapper = CacheWrapper(model, cache_layers)
    layers = wrapper.cache_layers
    if any(j < 0 or j >= len(wrapper.shapes) for j in layers):
        raise InputError(f"cache layers {layers} out of range for {len(wrapper.shapes)} layers")
    batch, seq, past_len = 2, 3, 5  # >= 2 each, or torch.export fixes the dimension
    gen = torch.Generator().manual_seed(0)
    past = [tuple(torch.randn(batch, wrapper.shapes[j][0], past_len, wrapper.shapes[j][1], generator=gen,
                              dtype=wrapper.dtype) for _ in range(2)) for j in layers]
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, -1)
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    # One `past` Dim for all layers gives them one symbol. The mask length gets its own symbol:
    # relating it to past + seq leaves a derived input dim, which the ONNX decomposition rejects.
    dynamic = ({0: b, 1: s}, {0: b, 1: torch.export.Dim.DYNAMIC}, {0: b, 1: s},
               [({0: b, 2: p}, {0: b, 2: p}) for _ in layers])
    try:
        with torch.no_grad(), _sdpa_with_gqa():
            ep = torch.export.export(wrapper, (ids, mask, pos, past), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CaptureError(f"torch.export could not capture {type(model).__name__} with a KV cache: {first}; "
                           "export it without the KV cache") from exc
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [PAST.format(j, kv) for j in layers for kv in ("key", "value")]
    outputs = ["logits"] + [PRESENT.format(j, kv) for j in layers for kv in ("key", "value")]
    return CacheCapture(ep, inputs, outputs, layers)


def removed_attention_layers(recipe: Any) -> list[int]:
    """Layer indices whose attention `recipe` replaces (removed, or bypassed by a linear map).

    Example:
        >>> removed_attention_layers(None)
        []
    """
    if recipe is None:
        return []
    return recipe.removed_attention_layers()


def _check_labels(branches: list[Any], recipe: Any, removed: list[int]) -> None:
    attention = {b.label: b.layer for b in branches if b.kind == "attention"}
    for label in recipe.removed_attention_labels():
        if attention.get(label) not in removed:
            raise RecipeMismatchError(f"recipe replaces attention '{label}', which this model does not have "
                                      f"(its attention branches: {', '.join(list(attention)[:3])}, ...); "
                                      "was the recipe made for this model?")


def cache_program(model_or_compressed: Any, recipe: Any = None) -> CacheCapture:
    """The KV-cache capture of a causal LM with `recipe` (default: the compressed model's) applied.

    Layers whose attention the recipe replaces have no cache inputs or outputs. The program runs
    in torch: `program.module()(input_ids, attention_mask, position_ids, past)`.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> cap = cache_program(tiny_model("llama"))
        >>> cap.cache_layers
        [0, 1]
    """
    src = as_source(model_or_compressed)
    if src.model is None:
        raise InputError("a KV-cache export needs the Hugging Face model (a captured program has no cache "
                         "inputs); pass the model or the result of subfit_fx.compress()")
    recipe = recipe if recipe is not None else src.recipe
    removed = removed_attention_layers(recipe)
    model = src.model
    if recipe is not None:
        # narrowed key/value groups change the shape of the layer's cache: narrow before capturing
        model, recipe = slim_modules(model, recipe, kinds=("attention",))
    layers = len(cache_shapes(model))
    cap = capture_with_cache(model, [j for j in range(layers) if j not in removed])
    if recipe is not None:
        from subfit_fx.branches import find_branches
        from subfit_fx.rewrite import apply_recipe

        branches = find_branches(cap.program)
        _check_labels(branches, recipe, removed)
        # check=False: the recipe's per-branch parameter counts were taken on the no-cache capture;
        # here k/v projections of cached layers also feed `present`, so their branches own fewer.
        cap.program = apply_recipe(cap.program, recipe, check=False, inplace=True, branches=branches)
    return cap


def export_onnx_kv(model_or_compressed: Any, path: str | Path, *, recipe: Any = None,
                   validate: bool = True, force: bool = False, tolerance: Tolerance | None = None,
                   reference: Reference | None = None, opset: int = OPSET) -> ExportResult:
    """Export a causal LM (dense or compressed) as one ONNX graph with KV cache inputs and outputs.

    `recipe` defaults to the compressed model's. Layers whose attention the recipe replaces have no
    cache inputs or outputs. With `validate`, prefill from an empty cache, one decode step and a
    2-token step must match `reference` (default: the eager dense model, or the rewritten no-cache
    program) within `tolerance` (default: `tolerance_for` the weights' dtype), or `ValidationError`
    is raised and nothing is written. An existing
    `path` raises `OutputExistsError` unless `force`. `opset` is the ONNX opset (default 23, whose
    Attention op serves grouped-query attention straight from the cache).

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> r = export_onnx_kv(tiny_model("llama"), "out/kv.onnx", force=True)  # doctest: +SKIP
        >>> r.details["cache_layers"]  # doctest: +SKIP
        [0, 1]
    """
    check_opset(opset)
    src = as_source(model_or_compressed)
    if recipe is not None and src.recipe is None:
        # the torch reference must be the rewritten model, not the dense one
        src = ExportSource(model=src.model, recipe=recipe, name=src.name, tokenizer_dir=src.tokenizer_dir)
    cap = cache_program(src)
    kept = cap.cache_layers
    removed = removed_attention_layers(src.recipe)
    model = to_onnx(cap.program, cap.input_names, cap.output_names, opset)
    drop_unused_inputs(model)
    gone = tuple(name.format(j, "") for j in removed for name in (PAST, PRESENT))
    stray = [v.name for v in [*model.graph.inputs, *model.graph.outputs] if v.name.startswith(gone)]
    if stray:  # internal invariant: the capture never had them
        raise ExportError(f"the graph has cache tensors {stray} of removed attention layers")
    past_dims = (BATCH, None, PAST_SEQUENCE, None)
    rename_dims(model, {"input_ids": (BATCH, SEQUENCE), "attention_mask": (BATCH, TOTAL_SEQUENCE),
                        **{PAST.format(j, kv): past_dims for j in kept for kv in ("key", "value")}})
    set_metadata(model, {KIND_KEY: KIND_KV_CACHE, CACHE_LAYERS_KEY: ",".join(map(str, kept)), **src.metadata()})
    with staged_output(path, force) as staged:
        save_model(model, staged)
        parity = None
        if validate:
            parity = check_kv(staged, reference or src.reference, vocab_size=src.vocab_size,
                              tolerance=tolerance or tolerance_for(src.dtype))
            parity.enforce("the KV-cache graph does not reproduce the no-cache logits")
        size = model_bytes(staged)
    names = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    details = {"cache_layers": kept, "removed_attention_layers": removed}
    return ExportResult(Path(path), *names, parity, size, details)
