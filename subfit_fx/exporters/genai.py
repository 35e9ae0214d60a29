"""onnxruntime-genai for ONNX folders: cache names it can follow, and its genai_config.json.

onnxruntime-genai names every layer's cache `past_key_values.%d.key` for %d in
0..num_hidden_layers-1 and allocates one cache per index. A compressed model has no cache for
removed attention, so its cache tensors are renumbered 0..K-1 over the layers that keep one
(`CACHE_LAYERS_KEY` in the file's metadata still lists their real layer indices) and
genai_config.json declares K layers. Tested: genai's greedy tokens equal our runner's on a
compressed Llama whose layer-0 attention is removed.

Example:
    >>> GENAI_TYPES[:3]
    ('llama', 'mistral', 'qwen2')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from subfit_fx.onnx_format import CACHE_LAYERS_KEY, PAST, PAST_PATTERN, PRESENT

__all__ = ["GENAI_CONFIG", "GENAI_TYPES", "renumber_cache", "write_genai_config"]

GENAI_CONFIG = "genai_config.json"
# decoder-only families whose genai model type takes our graph's inputs (ids, mask, positions, cache)
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")


def renumber_cache(path: Path) -> int:
    """Rename a KV-cache graph's cache inputs / outputs to 0..K-1 in layer order, in place (weights
    in an external data file are left where they are); return K.

    Example:
        >>> renumber_cache(Path("folder/model.onnx"))  # doctest: +SKIP
        10
    """
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    layers = sorted({int(m[1]) for m in (PAST_PATTERN.match(i.name) for i in graph.input) if m})
    mapping = {}
    for new, old in enumerate(layers):
        for part in ("key", "value"):
            mapping[PAST.format(old, part)] = PAST.format(new, part)
            mapping[PRESENT.format(old, part)] = PRESENT.format(new, part)
    if any(old != new for old, new in mapping.items()):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            value.name = mapping.get(value.name, value.name)
        for node in graph.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
        if not any(p.key == CACHE_LAYERS_KEY for p in model.metadata_props):  # the real layer indices
            model.metadata_props.add(key=CACHE_LAYERS_KEY, value=",".join(map(str, layers)))
        onnx.save(model, str(path))
    return len(layers)


def cache_heads(path: Path) -> list[int]:
    """Key/value heads of each cached layer of a KV-cache ONNX file (from its `past_key_values.*.key`
    input shapes), in input order.

    Example:
        >>> cache_heads(Path("folder/model.onnx"))  # doctest: +SKIP
        [3, 3, 2]
    """
    model = onnx.load(str(path), load_external_data=False)
    return [i.type.tensor_type.shape.dim[1].dim_value for i in model.graph.input
            if i.name.startswith("past_key_values.") and i.name.endswith(".key")]


def write_genai_config(folder: Path, config: Any, cached_layers: int, generation: Any = None,
                       kv_heads: int | None = None) -> bool:
    """Write genai_config.json for `folder/model.onnx` (renumbered by `renumber_cache`); return
    False (and write nothing) for a model type onnxruntime-genai would not run with our inputs.
    `kv_heads`: the key/value heads every cached layer has, when width pruning changed them (the
    query heads follow: the same number per group).

    Example:
        >>> write_genai_config(Path("folder"), model.config, 10)  # doctest: +SKIP
        True
    """
    model_type = getattr(config, "model_type", "")
    if model_type not in GENAI_TYPES:
        return False
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    context = getattr(config, "max_position_embeddings", None) or 2048
    eos = getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    decoder = {
        "filename": "model.onnx", "head_size": head_size, "hidden_size": config.hidden_size,
        "num_attention_heads": heads // groups * (kv_heads or groups), "num_key_value_heads": kv_heads or groups,
        "num_hidden_layers": cached_layers, "session_options": {"log_id": "subfit_fx", "provider_options": []},
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    genai = {
        "model": {"type": model_type, "context_length": context, "vocab_size": config.vocab_size,
                  "bos_token_id": getattr(config, "bos_token_id", None) or 0,
                  "eos_token_id": eos if eos is not None else 0, "pad_token_id": pad if pad is not None else 0,
                  "decoder": decoder},
        "search": {"max_length": context, "min_length": 0, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "top_k": 1, "top_p": 1.0, "temperature": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    (Path(folder) / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
    return True
