"""Resolve a MODEL argument: a local Hugging Face directory, a Hub id, a .gguf file or a built-in
tiny model, in a dtype on a device.

Example:
    >>> resolve_model("builtin:gpt2").config.model_type
    'gpt2'
"""

from __future__ import annotations

from pathlib import Path

import torch

from subfit_fx.capture import load_model
from subfit_fx.errors import InputError
from subfit_fx.zoo import ARCHITECTURES, tiny_model

__all__ = ["BUILTIN_DEFAULT", "local_spec", "resolve_model"]

BUILTIN_DEFAULT = "builtin:llama"


def local_spec(spec: str, revision: str | None = None, *, trust_remote_code: bool = False) -> str:
    """`spec` with a Hub id replaced by its local snapshot directory (downloaded unless offline);
    other specs as they are. `revision` applies to Hub ids only.

    Example:
        >>> local_spec("builtin:llama")
        'builtin:llama'
    """
    from subfit_fx.hub import hub_snapshot, is_hub_id

    if is_hub_id(spec):
        return str(hub_snapshot(spec, revision, trust_remote_code=trust_remote_code))
    if revision is not None:
        raise InputError(f"--revision applies to Hub ids (org/name), not to {spec!r}; leave it out")
    return spec


def resolve_model(spec: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                  revision: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load `spec`: `builtin:ARCH` (random-init, 4 layers, hidden 64, float32), a model directory, a
    Hub id (`org/name`, at `revision`) or a .gguf file (dequantized to float32).

    `dtype` (None or "auto": the checkpoint's own) and `device` (None: cpu; "auto": cuda when
    available) say where and in what precision the model runs.

    Example:
        >>> resolve_model("builtin:bert").config.num_hidden_layers
        4
        >>> resolve_model("builtin:llama", dtype="bfloat16").dtype
        torch.bfloat16
    """
    from subfit_fx.devices import place, resolve_device, resolve_dtype

    resolve_dtype(dtype)  # bad names fail before any loading
    if device is not None:
        resolve_device(device)
    if spec.startswith("builtin:"):
        arch = spec.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise InputError(f"unknown built-in model {spec!r}; use builtin:ARCH with ARCH one of "
                             f"{', '.join(ARCHITECTURES)}")
        if revision is not None:
            raise InputError("--revision applies to Hub ids (org/name), not to built-in models; leave it out")
        model = tiny_model(arch, hidden=64, layers=4)
        return place(model, dtype, device).eval()
    path = local_spec(spec, revision, trust_remote_code=trust_remote_code)
    model = load_model(Path(path) if path != spec else spec, dtype, trust_remote_code=trust_remote_code)
    return place(model, None, device).eval()
