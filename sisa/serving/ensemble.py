"""The shard models that may serve, loaded once and scored together.

An ensemble holds the live checkpoint of every servable shard (non-empty, no deletion pending) in
one scorer (for the adapter backends: one base model, every adapter on it). Its `version` is a
digest of the checkpoints it holds, so a caller can tell when the store has moved on. What the
shards' outputs mean (votes, a next-token mixture) is the task's business.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sisa.errors import InputKindError
from sisa.features import Features
from sisa.status import model_version
from sisa.training.protocol import Backend

if TYPE_CHECKING:
    from sisa.serving.scorers import Scorer


class Ensemble:
    """Shard models loaded once (`scorer`); `shard_proba` scores a batch on every shard."""

    def __init__(self, backend: Backend, features: Features, scorer: Scorer,
                 shas: Mapping[int, str]) -> None:
        self.backend = backend
        self.features = features
        self.scorer = scorer
        self.shards = sorted(shas)
        self.shas = {s: shas[s] for s in self.shards}  # shard -> weights sha256
        self.version = model_version(self.shas)

    def subset(self, shards: Collection[int]) -> Ensemble:
        """These shards only, sharing this ensemble's models (loads nothing, changes nothing)."""
        view = copy.copy(self)
        view.scorer = self.scorer.subset(shards)
        view.shards = [s for s in self.shards if s in set(shards)]
        view.shas = {s: self.shas[s] for s in view.shards}
        view.version = model_version(view.shas)
        return view

    def shard_proba(self, inputs: Sequence[Any] | np.ndarray) -> dict[int, np.ndarray]:
        """Each shard's class probabilities, shape (n, num_classes)."""
        scorer: Any = self.scorer
        if not hasattr(scorer, "shard_proba"):
            raise InputKindError("this store holds a causal LM: it has no classes to predict; use "
                                 "generate or score")
        return scorer.shard_proba(self.backend.prepare(self.features.model_inputs(inputs)))
