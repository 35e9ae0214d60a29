"""GGUF checkpoints as model input: dequantize once into a float32 safetensors directory (cached).

transformers reads GGUF files (`from_pretrained(dir, gguf_file=...)`, with the `gguf` and
`accelerate` packages) and dequantizes them, but the model it returns refuses `save_pretrained`
("quantized with gguf"). We rebuild the model from its config without the quantization entry,
load the dequantized state dict, tie weights and save an ordinary directory. Every command then
treats a `.gguf` path exactly like that directory.

Example:
    >>> is_gguf("model.Q4_1.gguf"), is_gguf("runs/model")
    (True, False)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from subfit_fx.errors import ModelLoadError

__all__ = ["cache_root", "gguf_directory", "is_gguf"]

GGUF_MAGIC = b"GGUF"


def is_gguf(spec: str | Path) -> bool:
    """True when `spec` names a GGUF file (by its suffix).

    Example:
        >>> is_gguf("a/b.GGUF")
        True
    """
    return str(spec).lower().endswith(".gguf")


def cache_root() -> Path:
    """Where converted checkpoints live: $SUBFIT_FX_CACHE, else ~/.cache/subfit_fx.

    Example:
        >>> cache_root().name in ("subfit_fx", os.environ.get("SUBFIT_FX_CACHE", "subfit_fx").split("/")[-1])
        True
    """
    env = os.environ.get("SUBFIT_FX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "subfit_fx"


def _fingerprint(path: Path) -> str:
    """Content hash of the file's size, head and tail (fast on multi-GB files, changes on edits)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"GGUF file '{path}' does not exist; pass the path of a .gguf checkpoint")
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a regular file; pass the path of a .gguf checkpoint")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic bytes); pass a file written by "
                                 "llama.cpp's convert script or the gguf package")


def _architecture(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # the reader raises many types on truncated or corrupt files
        raise ModelLoadError(f"cannot read GGUF file '{path}': {_first_line(exc)}; the file may be truncated "
                             "or corrupt: download it again") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _supported() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # section names, not architectures


def gguf_directory(path: str | Path, cache: Path | None = None) -> Path:
    """The float32 safetensors directory for a GGUF file, converting it on first use.

    The directory (config, tokenizer, model.safetensors) sits in `cache` (default `cache_root()/gguf`)
    under the file's name and a content fingerprint, so an edited file is converted again.

    Example:
        >>> d = gguf_directory("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> sorted(p.name for p in d.iterdir())  # doctest: +SKIP
        ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', ...]
    """
    path = Path(path).resolve()
    _check_file(path)
    out = (cache or cache_root() / "gguf") / f"{path.stem}-{_fingerprint(path)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    arch = _architecture(path)
    if arch not in _supported():
        raise ModelLoadError(f"GGUF architecture '{arch}' in '{path.name}' is not supported by transformers' "
                             f"GGUF loader (supported: {', '.join(sorted(_supported()))}); convert the model "
                             "to a Hugging Face directory with safetensors weights instead")
    from subfit_fx.atomic import atomic_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, force=True) as tmp:
        _convert(path, tmp)
    return out


def _convert(path: Path, out: Path) -> None:
    import torch
    import transformers as tf

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model, info = tf.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                              output_loading_info=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot load GGUF file '{path}': {_first_line(exc)}; check that the file is "
                             "complete, or convert it to a Hugging Face directory") from exc
    config = model.config
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    if missing:  # transformers would fill them with random values: a silently wrong model
        raise ModelLoadError(f"GGUF file '{path}' lacks {len(missing)} weight(s) the model needs (e.g. "
                             f"'{missing[0]}'); the file is incomplete or of another architecture variant")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    clean = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, strict=False)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
