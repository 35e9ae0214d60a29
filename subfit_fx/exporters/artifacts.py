"""ONNX files on disk: all-or-nothing writes, the 2 GB rule for external data, sizes and metadata.

Every exporter writes into a temporary folder next to the destination, validates there, and only
then moves the files into place, so a failed export or validation leaves no output behind.

Example:
    >>> with staged_output("out/model.onnx", force=True) as tmp:  # doctest: +SKIP
    ...     save_model(ir_model, tmp)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from subfit_fx.atomic import atomic_file
from subfit_fx.errors import InputError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "model_bytes",
    "model_files",
    "save_model",
    "set_metadata",
    "staged_output",
]

# protobuf cannot serialize messages of 2 GiB or more; leave headroom for the graph itself
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


def data_path(path: str | Path) -> Path:
    """The external-data sidecar of an ONNX file (`model.onnx` -> `model.onnx.data`).

    Example:
        >>> data_path("out/model.onnx").name
        'model.onnx.data'
    """
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def model_files(path: str | Path) -> list[Path]:
    """The files that make up a saved ONNX model: the file and its sidecar when there is one.

    Example:
        >>> model_files("missing.onnx")
        []
    """
    return [p for p in (Path(path), data_path(path)) if p.is_file()]


def model_bytes(path: str | Path) -> int:
    """Bytes on disk of an ONNX model, external data included.

    Example:
        >>> model_bytes("missing.onnx")
        0
    """
    return sum(p.stat().st_size for p in model_files(path))


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of all initializers of `model` (main graph and subgraphs).

    Example:
        >>> initializer_bytes(ir.load("model.onnx"))  # doctest: +SKIP
        1048576
    """
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def save_model(model: ir.Model, path: str | Path) -> None:
    """Save `model` to `path`: one file, or weights in `<name>.data` when they pass about 2 GB.

    Example:
        >>> save_model(ir_model, "out/model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=data_path(path).name)
    else:
        ir.save(model, path)


def set_metadata(model: ir.Model, values: dict[str, str]) -> None:
    """Add string key/values to the model's `metadata_props` (read back by `subfit_fx.runtime`).

    Example:
        >>> set_metadata(ir_model, {"subfit_fx.kind": "plain"})  # doctest: +SKIP
    """
    model.metadata_props.update({k: str(v) for k, v in values.items()})


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR inside the block (exporters' "torchvision is not
    installed"-style noise), restoring their levels after.

    Example:
        >>> with quiet_loggers("torch.onnx"): pass
    """
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def staged_output(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path named like `path`; on normal exit move it (and its sidecar) into place
    (`subfit_fx.atomic.atomic_file`; the parent directory is created).

    Raises `OutputExistsError` when `path` exists and `force` is false. If the block raises, nothing
    is written and an existing output is left untouched.

    Example:
        >>> with staged_output("out/model.onnx", force=True) as tmp:  # doctest: +SKIP
        ...     save_model(ir_model, tmp)
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"output '{path}' must end in .onnx")
    if path.is_dir():
        raise InputError(f"output '{path}' is a directory; pass a file name ending in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force, companions=[data_path(path).name]) as staged:
        yield staged
