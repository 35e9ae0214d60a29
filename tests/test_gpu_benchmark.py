"""benchmarks/gpu.py fails fast, in one line with exit code 2, where it cannot run (the full CPU
smoke run, `--device cpu --tiny`, takes about 30 s here and is left to the benchmark itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), *argv], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_one_line_exit_2(tmp_path):
    proc = _run("--out", str(tmp_path / "gpu"))
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--device cpu --tiny" in proc.stderr and proc.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_full_size_model_on_the_cpu_is_refused(tmp_path):
    proc = _run("--device", "cpu", "--out", str(tmp_path / "gpu"))
    assert proc.returncode == 2 and "pass --tiny" in proc.stderr and proc.stderr.count("\n") == 1
