"""The backend Protocol: what a model family must provide to be trained slice by slice.

A backend turns record inputs into model inputs and creates shard models; a shard model trains one
epoch in a given order, exports and restores its full state (weights, optimizer, RNG) as tensors plus
JSON, and predicts class probabilities. A backend may also name a frozen text encoder whose
features the driver computes (and caches) before training, and may score all shards at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from sisa.config import TrainingConfig
from sisa.records import Input

if TYPE_CHECKING:
    from sisa.features import TextEncoder


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the task, fixed when a store is trained."""

    num_classes: int
    input_dim: int | None = None  # numeric features (or embedding width); None for raw text


class ShardModel(Protocol):
    def train_epoch(self, inputs: Any, labels: torch.Tensor, order: torch.Tensor) -> None:
        """One pass over `inputs[order]` in mini-batches; all randomness is already seeded."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """CPU tensors (weights, optimizer moments, RNG) and JSON metadata that resume exactly."""

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def predict_proba(self, inputs: Any) -> torch.Tensor:
        """Class probabilities, shape (n, num_classes)."""

    def export_files(self) -> dict[str, bytes]:
        """Extra files for the checkpoint directory (e.g. a peft adapter); may be empty."""


class Scorer(Protocol):
    def shard_proba(self, inputs: Any) -> dict[int, np.ndarray]:
        """Each shard's class probabilities for prepared inputs."""


class Backend(Protocol):
    name: str
    input_kind: str  # "features" (numeric columns) or "text" (a text column)
    spec: ModelSpec  # the task's shape, resolved (e.g. the head's input is the embedding width)

    def __init__(self, training: TrainingConfig, spec: ModelSpec) -> None: ...

    def fingerprint(self) -> str:
        """Digest of external artifacts the weights depend on (a base model); '' if none."""

    def encoder(self) -> TextEncoder | None:
        """A frozen encoder whose (cached) features replace texts before training, or None."""

    def prepare(self, inputs: Sequence[Input]) -> Any:
        """Model inputs for these records, indexable by a tensor of positions."""

    def create(self, seed: int, device: str = "cpu") -> ShardModel:
        """A fresh shard model (and optimizer) initialised from `seed`."""

    def scorer(self, states: Mapping[int, tuple[dict[str, torch.Tensor], dict[str, Any]]],
               seed: int) -> Scorer:
        """Something that scores every shard's model on one batch of prepared inputs."""


class PerShardScorer:
    """The default scorer: one independent model per shard."""

    def __init__(self, models: Mapping[int, ShardModel]) -> None:
        self.models = dict(models)

    def shard_proba(self, inputs: Any) -> dict[int, np.ndarray]:
        with torch.no_grad():
            return {s: m.predict_proba(inputs).double().cpu().numpy() for s, m in self.models.items()}
