"""Stage 5 of the pipeline: the aggregator over every servable shard's live checkpoint.

Soft voting averages the shards' class probabilities; hard voting takes the majority of their
predicted classes (ties broken by the mean probability), like scikit-learn's VotingClassifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shard_store.checkpoints import CheckpointPayload
from sisa.config import SisaConfig, Voting
from sisa.errors import StoreError
from sisa.training import get_backend
from sisa.training.protocol import ModelSpec, ShardModel
from sisa.training.shard_trainer import load_model


class Ensemble:
    """Shard models loaded once; `predict_proba` / `predict` over any batch of inputs."""

    def __init__(
        self,
        config: SisaConfig,
        spec: ModelSpec,
        checkpoints: Mapping[int, CheckpointPayload],
        voting: Voting | None = None,
    ) -> None:
        if not checkpoints:
            raise StoreError(
                "no shard can serve: every shard is empty or has a deletion pending "
                "(run `sisa recover`)"
            )
        self.config = config
        self.spec = spec
        self.voting: Voting = voting or config.voting
        self.backend = get_backend(config.training.backend)(config.training, spec)
        self.models: dict[int, ShardModel] = {
            shard: load_model(config, spec, payload) for shard, payload in sorted(checkpoints.items())
        }

    @property
    def shards(self) -> list[int]:
        return list(self.models)

    def shard_proba(self, inputs: list[Any]) -> dict[int, np.ndarray]:
        """Each shard's class probabilities, shape (n, num_classes)."""
        prepared = self.backend.prepare(inputs)
        with torch.no_grad():
            return {s: m.predict_proba(prepared).double().numpy() for s, m in self.models.items()}

    @staticmethod
    def aggregate(per_shard: Mapping[int, np.ndarray], voting: Voting) -> np.ndarray:
        stacked = np.stack(list(per_shard.values()))  # (shards, n, classes)
        if voting == "soft":
            return stacked.mean(axis=0)
        classes = stacked.shape[-1]
        votes = np.eye(classes)[stacked.argmax(axis=-1)].sum(axis=0)  # (n, classes)
        return votes / stacked.shape[0]

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return self.aggregate(self.shard_proba(inputs), self.voting)

    def predict(self, inputs: list[Any]) -> np.ndarray:
        per_shard = self.shard_proba(inputs)
        proba = self.aggregate(per_shard, self.voting)
        if self.voting == "hard":
            # Vote fractions differ by >= 1/S; the mean probability (< 1/S scaled) only breaks ties.
            soft = self.aggregate(per_shard, "soft")
            proba = proba + soft / (len(per_shard) + 1)
        return np.asarray(proba.argmax(axis=-1))
