"""The featurisation stage, on the driver: raw record inputs -> what the shard models consume.

For a backend with a frozen text encoder (`head`), texts become embeddings, cached in the store per
(encoder fingerprint, input digest), so retraining after a deletion never re-encodes a text and a
deleted text's embedding is purged with it. For the other backends inputs pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shard_store import ShardStore
from sisa.errors import InputKindError
from sisa.records import input_digest

if TYPE_CHECKING:
    from sisa.training.encoder import TextEncoder

# The library's progress hook: progress(description, total) returns a tick, called per item done.
Progress = Callable[[str, int], Callable[[Any], None]]


class Features:
    """Model inputs of records: cached encoder embeddings, or the inputs themselves."""

    def __init__(self, store: ShardStore, encoder: TextEncoder | None,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.encoder = encoder
        self.progress = progress

    def model_inputs(self, inputs: Sequence[Any] | np.ndarray) -> Any:
        if self.encoder is None:
            return inputs
        return self.embeddings(inputs)

    def embeddings(self, texts: Sequence[Any] | np.ndarray) -> np.ndarray:
        """(n, dim) float32 embeddings through the store's cache; encodes only the misses."""
        encoder = self.encoder
        if encoder is None:
            raise InputKindError("this backend has no text encoder")
        for t in texts:
            if not isinstance(t, str):
                raise InputKindError("the head backend needs texts, not numeric features")
        digests = [input_digest(t) for t in texts]
        cached = self.store.get_embeddings(encoder.fingerprint, digests)
        missing = list(dict.fromkeys(d for d in digests if d not in cached))
        if missing:
            first = {d: t for d, t in zip(digests, texts, strict=True)}
            tick = None
            if self.progress is not None:
                bar = self.progress("encoding texts", len(missing))
                tick = lambda _i: bar(None)  # noqa: E731 - one tick per text
            fresh = encoder.encode([first[d] for d in missing], tick)
            new = {d: fresh[i].astype("<f4").tobytes() for i, d in enumerate(missing)}
            self.store.put_embeddings(encoder.fingerprint, fresh.shape[1], new)
            cached.update(new)
        if not digests:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        return np.stack([np.frombuffer(cached[d], dtype="<f4") for d in digests])
