"""Resolve a MODEL argument: a local Hugging Face directory or a built-in tiny model.

Example:
    >>> resolve_model("builtin:gpt2").config.model_type
    'gpt2'
"""

from __future__ import annotations

import torch

from subfit_fx.capture import load_model
from subfit_fx.errors import InputError
from subfit_fx.zoo import ARCHITECTURES, tiny_model

__all__ = ["BUILTIN_DEFAULT", "resolve_model"]

BUILTIN_DEFAULT = "builtin:llama"


def resolve_model(spec: str) -> torch.nn.Module:
    """Load `spec`: `builtin:ARCH` (random-init, 4 layers, hidden 64), a model directory or a .gguf file.

    Example:
        >>> resolve_model("builtin:bert").config.num_hidden_layers
        4
    """
    if spec.startswith("builtin:"):
        arch = spec.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise InputError(f"unknown built-in model {spec!r}; use builtin:ARCH with ARCH one of "
                             f"{', '.join(ARCHITECTURES)}")
        return tiny_model(arch, hidden=64, layers=4)
    return load_model(spec)
