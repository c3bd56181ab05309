"""The backend Protocol: what a model family must provide to be trained slice by slice.

A backend turns record inputs into model inputs and creates shard models; a shard model trains one
epoch in a given order, exports and restores its full state (weights, optimizer, RNG) as tensors plus
JSON, and scores inputs. A backend may carry a frozen text encoder whose features the driver
computes (and caches) before training, and may score all shards at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sisa.config import TrainingConfig
from sisa.records import Input
from sisa.tasks import ModelSpec

if TYPE_CHECKING:
    import torch

    from sisa.training.encoder import TextEncoder

# torch is imported where a model is built, never by importing this module (nor the driver's).
State = tuple[dict[str, "torch.Tensor"], dict[str, Any]]  # tensors for safetensors, JSON metadata


class ShardModel(Protocol):
    def train_epoch(self, inputs: Any, targets: torch.Tensor, order: torch.Tensor) -> None:
        """One pass over `inputs[order]` in mini-batches; all randomness is already seeded."""

    def state(self) -> State:
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

    def subset(self, shards: Collection[int]) -> Scorer:
        """A scorer of these shards only, sharing this one's models (nothing is loaded again or
        changed: both may run at once)."""


class Backend(Protocol):
    name: str
    config: TrainingConfig
    spec: ModelSpec  # the task's shape, resolved (e.g. the head's input is the embedding width)
    encoder: TextEncoder | None  # a frozen encoder whose (cached) features replace the texts

    def fingerprint(self) -> str:
        """Digest of external artifacts the weights depend on (a base model); '' if none."""

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> Any:
        """Model inputs for these records, indexable by a tensor of positions."""

    def create(self, seed: int, device: str = "cpu") -> ShardModel:
        """A fresh shard model (and optimizer) initialised from `seed`."""

    def scorer(self, states: Mapping[int, State], seed: int) -> Scorer:
        """Something that scores every shard's model on one batch of prepared inputs."""


class PerShardScorer:
    """The default scorer: one independent model per shard."""

    def __init__(self, models: Mapping[int, ShardModel]) -> None:
        self.models = dict(models)

    def shard_proba(self, inputs: Any) -> dict[int, np.ndarray]:
        import torch

        with torch.no_grad():
            return {s: m.predict_proba(inputs).double().cpu().numpy() for s, m in self.models.items()}

    def subset(self, shards: Collection[int]) -> PerShardScorer:
        return PerShardScorer({s: self.models[s] for s in shards})
