"""Shared fixtures: tiny random-init models, captured once per session."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers

from subfit_fx import capture
from subfit_fx.zoo import tiny_model

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one worker per core (make test: -n 2); tiny models gain nothing from
    # intra-op threads, and two workers with two threads each would fight over two cores
    torch.set_num_threads(1)


@functools.cache
def captured(arch: str, layers: int = 2, hidden: int = 64):
    """(model, ExportedProgram) for a tiny `arch`, cached across tests (treat as read-only)."""
    model = tiny_model(arch, hidden=hidden, layers=layers)
    return model, capture(model)


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """Tests may switch autograd off globally; never let that leak into the next test."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture
def tokens():
    """A (2, 12) batch of token ids with left padding in the first row."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def example_module(name: str) -> ModuleType:
    """examples/NAME.py imported as module NAME (examples/ is not a package; its scripts import
    each other by plain name, as when run from there)."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

