"""A frozen text encoder for the `head` backend: mean-pooled, L2-normalised sentence embeddings.

A text's embedding must never depend on which other texts were encoded with it: a store after a
deletion and a store trained from scratch must see the same floats. Its definition is the text
encoded on its own (a batch of one, no padding) with a fixed thread count (`encode_alone`).
`encode` computes exactly that, faster: texts of the same token count go through the model
together (so there is no padding, and each text's tokens meet the same operations as alone), in
batches of up to BATCH texts, and several batches at once on worker threads, each operation still
running on the configured number of torch threads. `tests/test_encoder_batches.py` proves on the
machine that runs it that every text comes out bit-identical to its encoding alone, whatever batch
it is in (`benchmarks/encoding.py` measures the speed). The driver caches the vectors
(`sisa.features`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sisa.config import HeadConfig
from sisa.models import encoder_fingerprint, quiet_transformers, resolve_model

BATCH = 64  # at most this many texts (of one token count) per forward pass
# Batches encoded at once, each by a worker thread (torch runs without the GIL); every operation
# keeps the configured torch thread count, so the floats do not depend on this.
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _rows(tokens: Any, rows: list[int]) -> dict[str, torch.Tensor]:
    """The tokenizer's outputs (ids, mask, token types) for these texts, as one batch."""
    return {k: torch.tensor([v[i] for i in rows]) for k, v in tokens.items()}


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
        return encoder_fingerprint(self.model_name, self.max_length)

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

    def encode(self, texts: Sequence[str], on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n, dim) float32 embeddings, each bit-identical to `encode_alone`'s (see the module)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        tokens = self.tokens(texts)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(tokens["input_ids"]):
            by_length.setdefault(len(ids), []).append(i)
        groups = [members[start:start + BATCH] for _, members in sorted(by_length.items())
                  for start in range(0, len(members), BATCH)]
        done = 0
        with torch_threads(self.threads), ThreadPoolExecutor(WORKERS) as pool:
            for group, pooled in zip(groups, pool.map(lambda g: self._pooled(_rows(tokens, g)), groups),
                                     strict=True):
                out[group] = pooled
                done += len(group)
                self.encoded += len(group)
                if on_progress is not None:
                    on_progress(done)
        return out

    @torch.no_grad()  # grad mode is per thread: each worker sets it
    def _pooled(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        hidden = self._model(**batch).last_hidden_state  # (texts, tokens, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=1).numpy()

    def tokens(self, texts: Sequence[str]) -> Any:
        """The tokenizer's outputs for these texts (lists of ids, masks, token types; no padding)."""
        self._load()
        return self._tokenizer(list(texts), truncation=True, max_length=self.max_length)

    @torch.no_grad()
    def encode_alone(self, texts: Sequence[str]) -> np.ndarray:
        """The definition: each text encoded on its own (a batch of one, no padding)."""
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
        return out
