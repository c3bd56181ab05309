"""The backend Protocol: what a model family must provide to be trained slice by slice.

A backend turns record inputs into model inputs and creates shard models; a shard model trains one
epoch in a given order, exports and restores its full state (weights, optimizer, RNG) as tensors plus
JSON, and predicts class probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sisa.config import TrainingConfig
from sisa.records import Input


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the task, fixed when a store is trained."""

    num_classes: int
    input_dim: int | None = None  # numeric features; None for text


class ShardModel(Protocol):
    def train_epoch(self, inputs: Any, labels: torch.Tensor, order: torch.Tensor) -> None:
        """One pass over `inputs[order]` in mini-batches; all randomness is already seeded."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (weights, optimizer moments) and JSON metadata that resume training exactly."""

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def predict_proba(self, inputs: Any) -> torch.Tensor:
        """Class probabilities, shape (n, num_classes)."""


class Backend(Protocol):
    name: str

    def __init__(self, training: TrainingConfig, spec: ModelSpec) -> None: ...

    def prepare(self, inputs: Sequence[Input]) -> Any:
        """Model inputs for these records, indexable by a tensor of positions."""

    def create(self, seed: int) -> ShardModel:
        """A fresh shard model (and optimizer) initialised from `seed`."""
