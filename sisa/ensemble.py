"""Stage 5 of the pipeline: the aggregator over every servable shard's live checkpoint.

Soft voting averages the shards' class probabilities; hard voting takes the majority of their
predicted classes (ties broken by the mean probability), like scikit-learn's VotingClassifier.
The backend's scorer evaluates all shards (for LoRA: one base model, one mixed-adapter pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shard_store.checkpoints import CheckpointPayload
from sisa.config import SisaConfig, Voting
from sisa.errors import StoreError
from sisa.training import get_backend
from sisa.training.protocol import ModelSpec
from sisa.training.shard_trainer import init_seed, payload_state


class Ensemble:
    """Shard models loaded once; `predict_proba` / `predict` over any batch of inputs."""

    def __init__(
        self,
        config: SisaConfig,
        spec: ModelSpec,
        checkpoints: Mapping[int, CheckpointPayload],
        voting: Voting | None = None,
        transform: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not checkpoints:
            raise StoreError(
                "no shard can serve: every shard is empty or has a deletion pending "
                "(run `sisa recover`)"
            )
        self.config = config
        self.spec = spec
        self.voting: Voting = voting or config.voting
        self.transform = transform  # e.g. texts -> cached frozen-encoder embeddings
        self.backend = get_backend(config.training.backend)(config.training, spec)
        states = {s: payload_state(p) for s, p in sorted(checkpoints.items())}
        self.scorer = self.backend.scorer(states, init_seed(config.partition.seed, min(states)))
        self.shards = sorted(states)

    def shard_proba(self, inputs: list[Any]) -> dict[int, np.ndarray]:
        """Each shard's class probabilities, shape (n, num_classes)."""
        model_inputs = self.transform(inputs) if self.transform is not None else inputs
        return self.scorer.shard_proba(self.backend.prepare(model_inputs))

    @staticmethod
    def aggregate(per_shard: Mapping[int, np.ndarray], voting: Voting) -> np.ndarray:
        stacked = np.stack(list(per_shard.values()))  # (shards, n, classes)
        if voting == "soft":
            return stacked.mean(axis=0)
        classes = stacked.shape[-1]
        votes = np.eye(classes)[stacked.argmax(axis=-1)].sum(axis=0)  # (n, classes)
        return votes / stacked.shape[0]

    @staticmethod
    def decide(per_shard: Mapping[int, np.ndarray], voting: Voting) -> np.ndarray:
        """Predicted class indices; hard-vote ties go to the higher mean probability."""
        proba = Ensemble.aggregate(per_shard, voting)
        if voting == "hard":
            # Vote fractions differ by >= 1/S; the added term is < 1/(S+1), so it only breaks ties.
            proba = proba + Ensemble.aggregate(per_shard, "soft") / (len(per_shard) + 1)
        return np.asarray(proba.argmax(axis=-1))

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return self.aggregate(self.shard_proba(inputs), self.voting)

    def predict(self, inputs: list[Any]) -> np.ndarray:
        return self.decide(self.shard_proba(inputs), self.voting)
