"""The ONNX file format subfit_fx writes and reads: metadata keys and cache tensor names, in one place.

The exporters write these; the runtime, the CLI and the post-passes read them.

Example:
    >>> PAST.format(3, "key"), PAST_PATTERN.match("past_key_values.3.value").groups()
    ('past_key_values.3.key', ('3', 'value'))
"""

from __future__ import annotations

import re

__all__ = ["CACHE_LAYERS_KEY", "CONTEXT_KEY", "KIND_KEY", "KIND_KV_CACHE", "KIND_PLAIN", "PASSES_KEY", "PAST",
           "PAST_PATTERN", "PAST_SEQUENCE", "PRESENT", "SOURCE_KEY", "TOKENIZER_KEY", "VOCAB_KEY"]

KIND_KEY = "subfit_fx.kind"  # which graph: KIND_PLAIN or KIND_KV_CACHE
KIND_PLAIN = "plain"
KIND_KV_CACHE = "kv-cache"
SOURCE_KEY = "subfit_fx.source"  # the model directory or compressed directory exported
VOCAB_KEY = "subfit_fx.vocab_size"
TOKENIZER_KEY = "subfit_fx.tokenizer"  # where the tokenizer was found at export time
CACHE_LAYERS_KEY = "subfit_fx.cache_layers"  # comma-separated layers that keep a KV cache
PASSES_KEY = "subfit_fx.passes"  # post-passes applied, in order
CONTEXT_KEY = "subfit_fx.max_positions"  # the model's context in tokens (absent: unbounded or unknown)

PAST = "past_key_values.{}.{}"  # .format(layer, "key" | "value"): a cache input
PRESENT = "present.{}.{}"  # the matching cache output
PAST_SEQUENCE = "past_sequence_length"  # the symbolic dimension of cached positions
PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
