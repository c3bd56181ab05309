"""Frozen-encoder features for the `head` backend, cached in the store.

Each text is encoded on its own (batch of one, no padding) with a fixed thread count, so its
embedding never depends on which other texts were encoded with it: a store after a deletion and a
store trained from scratch see the same floats. Vectors are cached per (encoder fingerprint, input
digest), so retraining after a deletion never re-encodes a text.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from shard_store.store import ShardStore
from sisa.config import TrainingConfig
from sisa.errors import ConfigError
from sisa.models import model_fingerprint, quiet_transformers, resolve_model
from sisa.records import input_digest


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""

    def __init__(self, training: TrainingConfig) -> None:
        self.model_name = training.model
        self.max_length = training.max_length
        self.threads = training.torch_threads
        self._model: Any = None
        self._tokenizer: Any = None
        self.encoded = 0  # texts actually run through the encoder (cache misses), for tests

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


class EmbeddingCache:
    """Embeddings of texts through the store's cache; encodes only the misses."""

    def __init__(self, store: ShardStore, encoder: TextEncoder,
                 progress: Callable[[str, int], Callable[[Any], None]] | None = None) -> None:
        self.store = store
        self.encoder = encoder
        self.progress = progress

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        for t in texts:
            if not isinstance(t, str):
                raise ConfigError("the head backend needs a --text-column, not numeric features")
        digests = [input_digest(t) for t in texts]
        cached = self.store.get_embeddings(self.encoder.fingerprint, digests)
        missing = list(dict.fromkeys(d for d in digests if d not in cached))
        if missing:
            first = {d: t for d, t in zip(digests, texts, strict=True)}
            tick = None
            if self.progress is not None:
                bar = self.progress("encoding texts", len(missing))
                tick = lambda _i: bar(None)  # noqa: E731 - one tick per text
            fresh = self.encoder.encode([first[d] for d in missing], tick)
            new = {d: fresh[i].astype("<f4").tobytes() for i, d in enumerate(missing)}
            self.store.put_embeddings(self.encoder.fingerprint, fresh.shape[1], new)
            cached.update(new)
        return np.stack([np.frombuffer(cached[d], dtype="<f4") for d in digests]) if digests else \
            np.zeros((0, self.encoder.dim), dtype=np.float32)
