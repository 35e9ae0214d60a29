"""Helpers of the reliability tests: calibration text, CLI runs and the checks every failure must pass."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

ERROR_PREFIX = "subfit-fx: error:"
# Lines the CLI may print to stderr before it fails (progress, not part of the error message).
PROGRESS_PREFIXES = ("compressing ",)

_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
          "quietly", "judge", "boxing", "matches", "and", "a", "graph", "of", "residual", "branches", "learns",
          "to", "bypass", "itself")


def calib_text(words: int = 600, seed: int = 0) -> str:
    """Deterministic sentences, about 6 bytes (= byte-tokenizer tokens) per word."""
    rng = random.Random(seed)
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(5, 12))
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        left -= n
    return " ".join(sentences) + "\n"


def stderr_lines(err: str) -> list[str]:
    """What a terminal would show of each stderr line: the text after the last carriage return
    (tqdm redraws and clears its bar with '\\r'), empty lines dropped."""
    lines = (line.split("\r")[-1] for line in err.splitlines())
    return [line for line in lines if line.strip()]


def assert_one_line_error(err: str, *needles: str, prefix: str = ERROR_PREFIX) -> str:
    """Exactly one non-progress line on stderr, starting with `prefix`, holding every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in stderr_lines(err) if not line.startswith(PROGRESS_PREFIXES)
             and not _is_progress_bar(line)]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    line = lines[0]
    assert line.startswith(prefix), line
    assert stderr_lines(err)[-1] == line, "the error must be the last thing on stderr"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def _is_progress_bar(line: str) -> bool:
    return "|" in line and ("it/s]" in line or "batch/s]" in line or "s/it]" in line or "s/batch]" in line)


def assert_no_output(path: Path) -> None:
    """`path` does not exist and no temporary sibling of it is left in its parent."""
    path = Path(path)
    assert not path.exists(), f"{path} exists after a failed run"
    parent = path.parent
    if parent.is_dir():
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{path.name}.")
                     or p.name.endswith((".partial", ".tmp"))]
        assert not leftovers, f"temporary siblings left behind: {leftovers}"


def cli_env() -> dict[str, str]:
    """Environment of a CLI subprocess: offline, unbuffered, no debug."""
    env = {k: v for k, v in os.environ.items() if k != "SUBFIT_DEBUG"}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_cli(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m subfit_fx ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "subfit_fx", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def read_recipe_tensors(directory: Path) -> dict:
    """The recipe tensors of a compressed directory (self-contained: the store in model.safetensors)."""
    from subfit_fx.recipe import WEIGHTS, read_store

    return read_store(Path(directory) / WEIGHTS)


def write_recipe_tensors(directory: Path, tensors: dict) -> None:
    """Replace the recipe tensors of a self-contained compressed directory (the model's other weights stay)."""
    from safetensors.torch import load_file, save_file

    from subfit_fx.recipe import STORE, WEIGHTS, store_name

    path = Path(directory) / WEIGHTS
    kept = {k: v for k, v in load_file(str(path)).items() if not k.startswith(STORE + ".")}
    save_file({**kept, **{f"{STORE}.{store_name(k)}": v for k, v in tensors.items()}}, str(path),
              metadata={"format": "pt"})


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Yield `proc`; whatever happens in the block, it is not left running (killed and waited for)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
