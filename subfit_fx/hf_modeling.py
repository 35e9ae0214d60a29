"""Modeling code that lets transformers load a compressed directory written by subfit_fx.

This file is copied verbatim into every compressed directory as `modeling_subfit.py`, followed by
a few generated lines that bind it to the base architecture (a config class with its own
`model_type` and a model class that subclasses the base one), so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

returns the base architecture with the replaced branches swapped for bypass modules. It imports
only torch and transformers (it must run where subfit_fx is not installed). The plan it follows
lives in `config.subfit` (written by `subfit_fx.standalone`): module paths of each replaced
branch's entry module, the modules that become identities, and the bypass tensors, which are
stored once in `model.subfit_tensors` (a shared basis is used by several bypasses).

A removed attention has no K/V. transformers reads the cache length from layer 0 (and builds its
masks from it), so each removed attention layer keeps a 1-wide placeholder (batch x 1 x seq x 1)
in the cache: the length bookkeeping stays right while the K/V memory of that layer is gone.

Example:
    >>> spec = {"tensors": {"r0__0__weight": [4, 4]}, "replacements": []}
    >>> model = torch.nn.Module()
    >>> install_replacements(model, spec)
    >>> sorted(model.subfit_tensors)
    ['r0__0__weight']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BranchBypass", "LayerBypass", "StoredLinear", "SubfitMixin", "install_replacements", "narrow_heads"]

# Head counts some attention modules read in forward (OPT views by `num_heads`); most use -1.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size")


def _chain(store: nn.ParameterDict, layers: list[list[str | None]], x: torch.Tensor) -> torch.Tensor:
    out = x
    for w_key, b_key in layers:
        weight = store[w_key].to(x.dtype)
        out = nn.functional.linear(out, weight, store[b_key].to(x.dtype) if b_key else None)
    return out


def _keep_cache_length(kwargs: dict[str, Any], layer_idx: int | None, x: torch.Tensor) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or layer_idx is None or not hasattr(cache, "update"):
        return
    stub = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
    cache.update(stub, stub, layer_idx)


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class BranchBypass(nn.Module):
    """Stands in for a replaced branch's entry module: returns `chain(input)` (zeros for a removed
    branch) in the entry module's output format."""

    def __init__(self, store: nn.ParameterDict, layers: list[list[str | None]], tuple_output: bool,
                 cache_layer: int | None) -> None:
        super().__init__()
        self._store = [store]  # a list: the store is registered once, on the model
        self.layers = [list(pair) for pair in layers]
        self.tuple_output = tuple_output
        self.cache_layer = cache_layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = _first_input(args, kwargs)
        y = _chain(self._store[0], self.layers, x) if self.layers else torch.zeros_like(x)
        _keep_cache_length(kwargs, self.cache_layer, x)
        return (y, None) if self.tuple_output else y


class LayerBypass(nn.Module):
    """Stands in for a whole replaced layer of a span: `x + chain(x)` for the span's first layer
    when the span is bypassed, `x` otherwise."""

    def __init__(self, store: nn.ParameterDict, layers: list[list[str | None]], cache_layer: int | None) -> None:
        super().__init__()
        self._store = [store]
        self.layers = [list(pair) for pair in layers]
        self.cache_layer = cache_layer

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = _first_input(args, kwargs)
        _keep_cache_length(kwargs, self.cache_layer, x)
        return x + _chain(self._store[0], self.layers, x) if self.layers else x


class StoredLinear(nn.Module):
    """Stands in for a linear layer of a width-pruned branch: the same map with the narrower
    weight (and bias) kept in the store."""

    def __init__(self, store: nn.ParameterDict, weight: str, bias: str | None) -> None:
        super().__init__()
        self._store = [store]
        self.weight_key, self.bias_key = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chain(self._store[0], [[self.weight_key, self.bias_key]], x)


def narrow_heads(module: nn.Module, groups: int, kept: int) -> None:
    """Scale the head-count attributes of an attention `module` from `groups` key/value groups to
    `kept` of them (its projections are narrowed separately).

    Example:
        >>> m = nn.Module(); m.num_heads = 8; narrow_heads(m, 4, 1); m.num_heads
        2
    """
    for name in HEAD_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % groups == 0:
            setattr(module, name, value // groups * kept)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def install_replacements(model: nn.Module, spec: dict[str, Any]) -> None:
    """Swap the modules `spec` names (the `subfit` block of config.json) for bypass modules and
    give `model` the parameter store `subfit_tensors` they read."""
    store = nn.ParameterDict({name: nn.Parameter(torch.zeros(shape), requires_grad=False)
                              for name, shape in spec["tensors"].items()})
    model.subfit_tensors = store
    for r in spec["replacements"]:
        for path in r.get("identities", []):
            _set_module(model, path, nn.Identity())
        if r["type"] == "slim":
            for path, (w_key, b_key) in zip(r["modules"], r["layers"], strict=True):
                _set_module(model, path, StoredLinear(store, w_key, b_key))
            if r.get("heads"):  # [attention module, key/value groups, kept groups]
                narrow_heads(model.get_submodule(r["heads"][0]), r["heads"][1], r["heads"][2])
        elif r["type"] == "branch":
            _set_module(model, r["entry"], BranchBypass(store, r["layers"], r["tuple_output"], r["cache_layer"]))
        else:
            for i, (path, cache_layer) in enumerate(zip(r["modules"], r["cache_layers"], strict=True)):
                _set_module(model, path, LayerBypass(store, r["layers"] if i == 0 else [], cache_layer))


class SubfitMixin:
    """Mixed in before a transformers model class: builds the base model, then installs the
    replacements of `config.subfit` (the checkpoint then fills every parameter)."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        install_replacements(self, config.subfit)
