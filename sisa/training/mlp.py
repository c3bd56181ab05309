"""The `mlp` backend: a small torch MLP over numeric feature columns, trained with AdamW.

The `head` backend (sisa/training/head.py) reuses it over frozen-encoder embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sisa.config import HeadConfig, MLPConfig
from sisa.records import Input
from sisa.tasks import ModelSpec
from sisa.training.optim import AdamW
from sisa.training.protocol import State
from sisa.training.state import export_state, import_state

if TYPE_CHECKING:
    from sisa.training.encoder import TextEncoder


class MLPModel:
    def __init__(self, net: nn.Module, config: MLPConfig | HeadConfig, device: str) -> None:
        self.device = device
        self.net = net.to(device)
        self.batch_size = config.batch_size
        self.optimizer = AdamW(
            net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )

    def train_epoch(self, inputs: torch.Tensor, targets: torch.Tensor, order: torch.Tensor) -> None:
        self.net.train()
        for batch in order.split(self.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.net(inputs[batch].to(self.device))
            loss = nn.functional.cross_entropy(logits, targets[batch].to(self.device))
            loss.backward()
            self.optimizer.step()

    def state(self) -> State:
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
    encoder: TextEncoder | None = None

    def __init__(self, config: MLPConfig | HeadConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec

    def fingerprint(self) -> str:
        return ""

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> torch.Tensor:
        if len(inputs) == 0:
            return torch.empty((0, self.spec.input_dim or 0), dtype=torch.float32)
        return torch.as_tensor(np.asarray(inputs, dtype=np.float32))

    def create(self, seed: int, device: str = "cpu") -> MLPModel:
        return MLPModel(self.network(seed), self.config, device)

    def network(self, seed: int) -> nn.Module:
        """A fresh network of this shape, initialised from `seed`."""
        torch.manual_seed(seed)  # parameter initialisation draws from the global generator
        layers: list[nn.Module] = []
        width = self.spec.input_dim or 0
        for hidden in self.config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.spec.num_classes))
        return nn.Sequential(*layers)
