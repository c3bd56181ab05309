"""A frozen text encoder for the `head` backend: mean-pooled, L2-normalised sentence embeddings.

Each text is encoded on its own (batch of one, no padding) with a fixed thread count, so its
embedding never depends on which other texts were encoded with it: a store after a deletion and a
store trained from scratch see the same floats. The driver caches the vectors (`sisa.features`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sisa.config import HeadConfig
from sisa.models import model_fingerprint, quiet_transformers, resolve_model


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TextEncoder:
    """The sentence-transformers recipe: mean pooling over tokens, then L2 normalisation."""

    def __init__(self, config: HeadConfig) -> None:
        self.model_name = config.model
        self.max_length = config.max_length
        self.threads = config.torch_threads
        self._model: Any = None
        self._tokenizer: Any = None
        self.encoded = 0  # texts actually run through the encoder (cache misses)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Digest of the model files and the pooling settings: the embedding cache's key."""
        settings = f"mean-pool/l2/max_length={self.max_length}"
        return hashlib.blake2b(
            f"{model_fingerprint(self.model_name)}/{settings}".encode(), digest_size=16
        ).hexdigest()

    @functools.cached_property
    def dim(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_model(self.model_name)).hidden_size)

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            quiet_transformers()
            path = resolve_model(self.model_name)
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n, dim) float32 embeddings, one text at a time."""
        self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch_threads(self.threads):
            for i, text in enumerate(texts):
                enc = self._tokenizer(text, truncation=True, max_length=self.max_length,
                                      return_tensors="pt")
                hidden = self._model(**enc).last_hidden_state[0]  # (tokens, dim)
                mask = enc["attention_mask"][0].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(0) / mask.sum().clamp(min=1.0)
                out[i] = torch.nn.functional.normalize(pooled, dim=0).numpy()
                self.encoded += 1
                if on_progress is not None:
                    on_progress(i + 1)
        return out
