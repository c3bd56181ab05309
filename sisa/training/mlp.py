"""The `mlp` backend: a small torch MLP over numeric feature columns, trained with AdamW.

The `head` backend (sisa/training/head.py) reuses it over frozen-encoder embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sisa.config import TrainingConfig
from sisa.errors import ConfigError
from sisa.records import Input
from sisa.training.protocol import ModelSpec, PerShardScorer
from sisa.training.state import export_state, import_state

if TYPE_CHECKING:
    from sisa.features import TextEncoder


class MLPModel:
    def __init__(self, net: nn.Module, training: TrainingConfig, device: str) -> None:
        self.device = device
        self.net = net.to(device)
        self.batch_size = training.batch_size
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )

    def train_epoch(self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor) -> None:
        self.net.train()
        for batch in order.split(self.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.net(inputs[batch].to(self.device))
            loss = nn.functional.cross_entropy(logits, labels[batch].to(self.device))
            loss.backward()
            self.optimizer.step()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return export_state(self.net.state_dict(), self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        import_state(self.net.load_state_dict, self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.softmax(self.net(inputs.to(self.device)), dim=-1).cpu()

    def export_files(self) -> dict[str, bytes]:
        return {}


class MLPBackend:
    name = "mlp"
    input_kind = "features"

    def __init__(self, training: TrainingConfig, spec: ModelSpec) -> None:
        if spec.input_dim is None:
            raise ConfigError(
                f"backend {self.name!r} needs numeric --feature-columns; for a --text-column use "
                "the 'head' or 'lora' backend"
            )
        self.training = training
        self.spec = spec

    def fingerprint(self) -> str:
        return ""

    def encoder(self) -> TextEncoder | None:
        return None

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> torch.Tensor:
        if len(inputs) == 0:
            return torch.empty((0, self.spec.input_dim or 0), dtype=torch.float32)
        return torch.as_tensor(np.asarray(inputs, dtype=np.float32))

    def create(self, seed: int, device: str = "cpu") -> MLPModel:
        torch.manual_seed(seed)  # parameter initialisation draws from the global generator
        layers: list[nn.Module] = []
        width = self.spec.input_dim or 0
        for hidden in self.training.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.spec.num_classes))
        return MLPModel(nn.Sequential(*layers), self.training, device)

    def scorer(self, states: Mapping[int, tuple[dict[str, torch.Tensor], dict[str, Any]]],
               seed: int) -> PerShardScorer:
        models = {}
        for shard, (tensors, meta) in states.items():
            model = self.create(seed)
            model.load_state(tensors, meta)
            models[shard] = model
        return PerShardScorer(models)
