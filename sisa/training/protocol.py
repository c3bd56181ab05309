"""The backend Protocol: what a model family must provide to be trained slice by slice.

A backend turns record inputs into model inputs and creates shard models; a shard model trains one
epoch in a given order, exports and restores its full state (weights, optimizer, RNG) as tensors plus
JSON, and scores inputs. A backend may carry a frozen text encoder whose features the driver
computes (and caches) before training. Serving the trained shards is `sisa.serving`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sisa.config import TrainingConfig
from sisa.records import Input
from sisa.tasks import ModelSpec

if TYPE_CHECKING:
    import torch

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


class Encoder(Protocol):
    """A frozen model whose outputs, computed once per input on the driver and cached in the
    store, replace the raw inputs (`sisa.features` runs it)."""

    @property
    def fingerprint(self) -> str:
        """Digest of the model and its settings: the cache's key."""

    @property
    def dim(self) -> int:
        """Width of what it outputs per input (or per token)."""


class Backend(Protocol):
    name: str
    config: TrainingConfig

    @property
    def spec(self) -> ModelSpec:
        """The task's shape, resolved (e.g. the head's input is the embedding width)."""

    @property
    def encoder(self) -> Encoder | None:
        """A frozen encoder whose (cached) features replace the texts, or None."""

    def fingerprint(self) -> str:
        """Digest of external artifacts the weights depend on (a base model); '' if none."""

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> Any:
        """Model inputs for these records, indexable by a tensor of positions."""

    def create(self, seed: int, device: str = "cpu") -> ShardModel:
        """A fresh shard model (and optimizer) initialised from `seed`."""
