"""The `head` backend: a frozen pretrained encoder embeds each text once (the driver caches the
embeddings), and each shard trains a small classifier head (logistic with `hidden_sizes=()`, else
an MLP) on the embeddings, slice by slice."""

from __future__ import annotations

from sisa.config import HeadConfig
from sisa.tasks import ModelSpec
from sisa.training.encoder import TextEncoder
from sisa.training.mlp import MLPBackend


class HeadBackend(MLPBackend):
    name = "head"

    def __init__(self, config: HeadConfig, spec: ModelSpec) -> None:
        encoder = TextEncoder(config)
        if spec.input_dim is None:  # a text task: the head's input is the embedding
            spec = ModelSpec(num_classes=spec.num_classes, input_dim=encoder.dim)
        super().__init__(config, spec)
        self.text_encoder = encoder
        self.encoder = encoder

    def fingerprint(self) -> str:
        return self.text_encoder.fingerprint
