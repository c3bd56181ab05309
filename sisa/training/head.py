"""The `head` backend: a frozen pretrained encoder embeds each text once (cached in the store), and
each shard trains a small classifier head (logistic with `hidden_sizes=()`, else an MLP) on the
embeddings, slice by slice."""

from __future__ import annotations

from sisa.config import TrainingConfig
from sisa.features import TextEncoder
from sisa.training.mlp import MLPBackend
from sisa.training.protocol import ModelSpec


class HeadBackend(MLPBackend):
    name = "head"
    input_kind = "text"

    def __init__(self, training: TrainingConfig, spec: ModelSpec) -> None:
        self._encoder = TextEncoder(training)
        if spec.input_dim is None:  # a text task: the head's input is the embedding
            spec = ModelSpec(num_classes=spec.num_classes, input_dim=self._encoder.dim)
        super().__init__(training, spec)

    def fingerprint(self) -> str:
        return self._encoder.fingerprint

    def encoder(self) -> TextEncoder:
        return self._encoder
