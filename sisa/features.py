"""The featurisation stage, on the driver: raw record inputs -> what the shard models consume.

For a backend with a frozen text encoder (`head`), texts become embeddings, cached in the store per
(encoder fingerprint, input digest), so retraining after a deletion never re-encodes a text and a
deleted text's embedding is purged with it. A causal LM adapted on its top layers only gets the
frozen lower layers' outputs through the same cache. Other backends' inputs pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shard_store import ShardStore
from sisa.errors import InputKindError
from sisa.records import conversation, input_digest

if TYPE_CHECKING:
    from sisa.training.protocol import Backend, Encoder

# The library's progress hook: progress(description, total) returns a tick, called once per item
# done; an item that is a str says where the work is now (a renderer shows it by the description).
Progress = Callable[[str, int], Callable[[Any], None]]


class Features:
    """Model inputs of records: cached encoder embeddings, or the inputs themselves."""

    def __init__(self, store: ShardStore, backend: Backend,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.backend = backend
        self.progress = progress

    @property
    def encoder(self) -> Encoder | None:
        """The backend's frozen encoder, or None; asked for only when inputs are featurised (a
        store opened for its audit builds no model)."""
        return self.backend.encoder

    def model_inputs(self, inputs: Sequence[Any] | np.ndarray,
                     contexts: Sequence[str | None] | None = None) -> Any:
        """`contexts`: what each input follows (a causal LM's prompts)."""
        if self.encoder is None:
            return inputs
        if getattr(self.encoder, "per_token", False):
            return self.lm_inputs(inputs, contexts)
        return self.embeddings(inputs)

    def lm_inputs(self, texts: Sequence[Any] | np.ndarray,
                  prompts: Sequence[str | None] | None = None) -> Any:
        """A causal LM's tokens, with the frozen lower layers' outputs through the store's cache
        (where the backend adapts only the top layers)."""
        encoder: Any = self.encoder
        examples = encoder.examples(texts, prompts)
        if not encoder.caches:
            return encoder.inputs(examples, None)
        prompts = list(prompts) if prompts is not None else [None] * len(texts)
        chat = bool(getattr(encoder, "chat", False))
        if chat:  # keyed by the canonical JSON the store holds (the examples checked them)
            texts = [conversation(t)[0] or "" for t in texts]
        digests = [input_digest(t, prompt=p, messages=chat) for t, p in zip(texts, prompts, strict=True)]
        index = {d: i for i, d in enumerate(digests)}
        vectors = self._cached(
            encoder.fingerprint, encoder.dim, digests,
            lambda missing, tick: [a.astype("<f4").tobytes()
                                   for a in encoder.lower([examples[index[d]] for d in missing], tick)],
            f"frozen layers of {_short(encoder.config.model)} on {{n}} texts")
        lower = [np.frombuffer(v, dtype="<f4").reshape(-1, encoder.dim) for v in vectors]
        return encoder.inputs(examples, lower)

    def _cached(self, model: str, dim: int, digests: list[str],
                compute: Callable[[list[str], Callable[[int], None] | None], list[bytes]],
                description: str) -> list[bytes]:
        """The cached vectors of these input digests, computing (and caching) only the misses.
        `description` names the work, `{n}` standing for how many inputs it computes."""
        cached = self.store.get_embeddings(model, digests)
        missing = list(dict.fromkeys(d for d in digests if d not in cached))
        if missing:
            tick: Callable[[int], None] | None = None
            if self.progress is not None:
                bar = self.progress(description.format(n=len(missing)), len(missing))
                ticked = [0]

                def count(done: int) -> None:  # the encoders count the inputs done so far
                    for _ in range(done - ticked[0]):
                        bar(None)
                    ticked[0] = max(ticked[0], done)

                tick = count

            new = dict(zip(missing, compute(missing, tick), strict=True))
            self.store.put_embeddings(model, dim, new)
            cached.update(new)
        return [cached[d] for d in digests]

    def embeddings(self, texts: Sequence[Any] | np.ndarray) -> np.ndarray:
        """(n, dim) float32 embeddings through the store's cache; encodes only the misses."""
        encoder: Any = self.encoder  # a sisa.training.encoder.TextEncoder
        if encoder is None:
            raise InputKindError("this backend has no text encoder")
        for t in texts:
            if not isinstance(t, str):
                raise InputKindError("the head backend needs texts, not numeric features")
        digests = [input_digest(t) for t in texts]
        first = {d: t for d, t in zip(digests, texts, strict=True)}
        vectors = self._cached(
            encoder.fingerprint, encoder.dim, digests,
            lambda missing, tick: [v.astype("<f4").tobytes()
                                   for v in encoder.encode([first[d] for d in missing], tick)],
            f"encoding {{n}} texts with {_short(encoder.model_name)}")
        if not digests:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        return np.stack([np.frombuffer(v, dtype="<f4") for v in vectors])


def _short(model: str) -> str:
    """A model's name as a person calls it (a directory's last part)."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def counter(progress: Progress | None, description: str) -> Callable[[int, int], None] | None:
    """An `on_progress(done, total)` callback for work that counts its own steps: it opens a bar
    of `progress` on its first call and ticks it up to `done` (None without `progress`)."""
    if progress is None:
        return None
    state: dict[str, Any] = {"tick": None, "done": 0}

    def on_progress(done: int, total: int) -> None:
        if state["tick"] is None:
            state["tick"] = progress(description, total)
        for _ in range(done - state["done"]):
            state["tick"](None)
        state["done"] = max(state["done"], done)

    return on_progress
