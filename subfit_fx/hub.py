"""Hugging Face Hub ids as model input: resolve `org/name` to a local snapshot directory first.

Only configs, safetensors weights, tokenizer files (and, with `trust_remote_code`, the repository's
Python files) are fetched, never pickled weights; the snapshot is then loaded exactly like a local
directory, with the same safety checks. Offline (`HF_HUB_OFFLINE=1`, or no network) the snapshot
comes from the local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub).

Example:
    >>> is_hub_id("HuggingFaceTB/SmolLM2-135M"), is_hub_id("./runs/model"), is_hub_id("builtin:llama")
    (True, False, False)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from subfit_fx.errors import ModelLoadError

__all__ = ["ALLOW_PATTERNS", "hub_cache_dir", "hub_offline", "hub_snapshot", "is_hub_id"]

# what a model directory needs: configs, safetensors weights (+ index), tokenizer files
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(spec: str | Path) -> bool:
    """True when `spec` reads as a Hub repository id (`org/name`) and is not an existing local path.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.2-1B"), is_hub_id("/abs/path"), is_hub_id("m.gguf")
        (True, False, False)
    """
    text = str(spec)
    return (bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(".gguf") and ".." not in text
            and not Path(text).exists())


def hub_offline() -> bool:
    """Whether downloads are off: `HF_HUB_OFFLINE` (read now, not at import as huggingface_hub does).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> Path:
    """The Hub cache in use: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.

    Example:
        >>> hub_cache_dir().name
        'hub'
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def hub_snapshot(repo_id: str, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """The local snapshot directory of Hub model `repo_id` at `revision` (default main),
    downloading its config, safetensors and tokenizer files unless offline.

    Example:
        >>> hub_snapshot("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/...')
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline, cache = hub_offline(), hub_cache_dir()
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise ModelLoadError(f"Hub model {where} is not in the local cache {cache} and HF_HUB_OFFLINE=1 forbids "
                                 "downloading it; download it once online (unset HF_HUB_OFFLINE), point "
                                 "HF_HUB_CACHE at a cache that has it, or pass a local directory") from None
        raise ModelLoadError(f"cannot download Hub model {where} (no network?) and it is not in the local cache "
                             f"{cache}; connect, or pass a local model directory") from None
    except GatedRepoError:
        raise ModelLoadError(f"Hub model {where} is gated; accept its license on huggingface.co and log in "
                             "(hf auth login or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Hub model {where} does not exist (or is private); check the id, or log in "
                             "(hf auth login or HF_TOKEN) for a private model") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"Hub model '{repo_id}' has no revision '{revision}'; pass an existing "
                             "branch, tag or commit to --revision") from None
    except (HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot get Hub model {where}: {first}; retry, or pass a local model "
                             "directory") from None
    _check_snapshot(path, repo_id, offline)
    return path


def _check_snapshot(path: Path, repo_id: str, offline: bool) -> None:
    """A snapshot lacking config.json or weights (an interrupted download, or a repo that has only
    pickled weights) is named here with its missing files, before transformers looks."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not missing:
        return
    how = ("download them once online (unset HF_HUB_OFFLINE)" if offline else
           "the repository may hold only pickled weights, which subfit_fx never loads: convert it to safetensors")
    raise ModelLoadError(f"Hub model '{repo_id}' snapshot {path} lacks {' and '.join(missing)}; {how}")
