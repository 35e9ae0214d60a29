"""Where and in what precision a model runs: `--device` and `--dtype`, checked before any work.

The model runs in its dtype on its device; statistics and fits stay float64 whatever that dtype
is (`subfit_fx.stats`, `subfit_fx.fit`), and bypass weights are stored in the model's dtype.

Example:
    >>> resolve_device("cpu"), resolve_dtype("bfloat16")
    (device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

import os

import torch

from subfit_fx.errors import InputError

__all__ = ["DEVICE_HELP", "DTYPES", "DTYPE_CHOICES", "check_dtype_on_device", "dtype_name", "model_dtype",
           "module_device", "place", "resolve_device", "resolve_dtype", "to_device"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype a `--dtype` value names; None for "auto" (the checkpoint's own).

    Example:
        >>> resolve_dtype("auto") is None, resolve_dtype(torch.float16)
        (True, torch.float16)
    """
    if spec is None or spec == "auto":
        return None
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise InputError(f"dtype {spec} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return spec
    if spec not in DTYPES:
        raise InputError(f"unknown dtype {spec!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """The `--dtype` name of a torch dtype (what a recipe records).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a `--device` value names: "auto" is cuda when this torch has a GPU (the local
    rank's under torchrun), else cpu. `cuda` without a usable GPU is an `InputError`.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: unknown device 'tpu'; use auto (cuda when available, else cpu), ...
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec or "auto"
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun each rank takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r}; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InputError(f"unknown device {spec!r}; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise InputError(f"--device {spec} asks for CUDA, but this machine has {build}; use --device cpu "
                         "(or auto), or run on a GPU machine with a CUDA build of torch")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of those")
    return torch.device("cuda", index)


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot run (bfloat16 on a GPU older than Ampere).

    Example:
        >>> check_dtype_on_device(torch.bfloat16, torch.device("cpu"))
    """
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; pass --dtype float16 "
                         "or --dtype float32")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (cpu for a module without any).

    Example:
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def place(model: torch.nn.Module, dtype: str | torch.dtype | None = None,
          device: str | torch.device | None = None) -> torch.nn.Module:
    """Move `model` to `device` and cast its floating-point weights to `dtype` (None: leave as is),
    after checking that the pair can run.

    Example:
        >>> place(torch.nn.Linear(2, 2), "bfloat16", "cpu").weight.dtype
        torch.bfloat16
    """
    target = resolve_dtype(dtype)
    where = resolve_device(device) if device is not None else None
    check_dtype_on_device(target or _float_dtype(model), where or module_device(model))
    if where is not None:
        model = model.to(where)
    if target is not None:
        model = model.to(target)
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (float32 if none).

    Example:
        >>> model_dtype(torch.nn.Linear(2, 2).half())
        torch.float16
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


_float_dtype = model_dtype


def to_device(batches: list[tuple[torch.Tensor, ...]], device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Token batches moved to `device` once, so every forward, loss and mask of a policy lives there.

    Example:
        >>> to_device([(torch.ones(1, 2), torch.ones(1, 2))], torch.device("cpu"))[0][0].device
        device(type='cpu')
    """
    return [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch) for batch in batches]
