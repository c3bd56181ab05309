"""The `mlp` backend: a small torch MLP over numeric feature columns, trained with AdamW."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sisa.config import TrainingConfig
from sisa.errors import ConfigError
from sisa.records import Input
from sisa.training.protocol import ModelSpec
from sisa.training.state import export_state, import_state


class MLPModel:
    def __init__(self, net: nn.Module, training: TrainingConfig) -> None:
        self.net = net
        self.batch_size = training.batch_size
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )

    def train_epoch(self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor) -> None:
        self.net.train()
        for batch in order.split(self.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.net(inputs[batch]), labels[batch])
            loss.backward()
            self.optimizer.step()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return export_state(self.net, self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        import_state(self.net, self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.softmax(self.net(inputs), dim=-1)


class MLPBackend:
    name = "mlp"

    def __init__(self, training: TrainingConfig, spec: ModelSpec) -> None:
        if spec.input_dim is None:
            raise ConfigError(
                "backend 'mlp' needs numeric --feature-columns, not a text column"
            )
        self.training = training
        self.spec = spec

    def prepare(self, inputs: Sequence[Input]) -> torch.Tensor:
        if not inputs:
            return torch.empty((0, self.spec.input_dim or 0), dtype=torch.float32)
        return torch.tensor([list(x) for x in inputs], dtype=torch.float32)

    def create(self, seed: int) -> MLPModel:
        torch.manual_seed(seed)  # parameter initialisation draws from the global generator
        layers: list[nn.Module] = []
        width = self.spec.input_dim or 0
        for hidden in self.training.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.spec.num_classes))
        return MLPModel(nn.Sequential(*layers), self.training)
