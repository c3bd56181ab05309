"""Stage 5 of the pipeline: the shard models that may serve, loaded once, scored together.

An ensemble holds the live checkpoint of every servable shard (non-empty, no deletion pending) and
scores a batch for all of them (for LoRA: one base model, one mixed-adapter pass). Its `version` is
a digest of the checkpoints it holds, so a caller can tell when the store has moved on. What the
shards' outputs mean (votes, a next-token mixture) is the task's business.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from sisa.checkpoint import Checkpoint
from sisa.errors import NoServableShardError
from sisa.features import Features
from sisa.status import model_version
from sisa.training.jobs import init_seed
from sisa.training.protocol import Backend


class Ensemble:
    """Shard models loaded once; `shard_proba` scores any batch of inputs on every shard."""

    def __init__(self, backend: Backend, features: Features, checkpoints: Mapping[int, Checkpoint],
                 seed: int) -> None:
        if not checkpoints:
            raise NoServableShardError(
                "no shard can serve: every shard is empty or has a deletion pending")
        self.backend = backend
        self.features = features
        states = {s: (c.tensors(), c.manifest.state) for s, c in sorted(checkpoints.items())}
        self.scorer = backend.scorer(states, init_seed(seed, min(states)))
        self.shards = sorted(states)
        self.shas = {s: c.sha256 for s, c in sorted(checkpoints.items())}  # shard -> weights sha256
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
        return self.scorer.shard_proba(self.backend.prepare(self.features.model_inputs(inputs)))
