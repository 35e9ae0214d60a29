"""Exporters: ONNX without and with KV cache, ONNX post-passes, and their numerical checks.

Names load on first use, so importing `subfit_fx.exporters.cli_commands` (which the CLI does
at startup) does not pull in onnx, onnxscript and ONNX Runtime.

Example:
    >>> from subfit_fx.exporters import export_onnx, export_onnx_kv
    >>> export_onnx_kv(compressed, "out/model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ExportResult",
    "ParityReport",
    "Tolerance",
    "cache_program",
    "export_onnx",
    "export_onnx_kv",
    "optimize_onnx",
    "quantize_int4",
    "quantize_int8",
    "tolerance_for",
]

_HOMES = {
    "ExportResult": "onnx_export", "export_onnx": "onnx_export",
    "cache_program": "kv_cache", "export_onnx_kv": "kv_cache",
    "optimize_onnx": "postprocess", "quantize_int4": "postprocess", "quantize_int8": "postprocess",
    "ParityReport": "validate", "Tolerance": "validate", "tolerance_for": "validate",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'subfit_fx.exporters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"subfit_fx.exporters.{_HOMES[name]}"), name)
