"""The `lora` backend: one frozen `AutoModelForSequenceClassification` base, one peft LoRA adapter
per shard (the classification head trains with it, as a peft `modules_to_save`).

Checkpoints hold the adapter and head weights, optimizer and RNG state in `weights.safetensors`,
plus the adapter saved the peft way in `adapter/` (load it with `PeftModel.from_pretrained(base,
".../adapter")`). Serving (`sisa.serving.LoraScorer`) loads the base once with every shard's adapter
as a named adapter and scores all shards in one mixed-adapter forward pass; the adapter
construction is `sisa.adapters`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sisa.adapters import adapter_tensors, load_adapter, lora_config, with_adapter
from sisa.config import LoraConfig
from sisa.errors import InputKindError
from sisa.models import model_fingerprint, quiet_transformers, resolve_model
from sisa.records import Input
from sisa.tasks import ModelSpec
from sisa.training.optim import AdamW
from sisa.training.protocol import State
from sisa.training.state import export_state, import_state

ADAPTER_DIR = "adapter"


class TextInputs:
    """Texts indexable by a tensor of positions (tokenised per batch, with dynamic padding)."""

    def __init__(self, texts: Sequence[str]) -> None:
        for t in texts:
            if not isinstance(t, str):
                raise InputKindError("the lora backend needs texts, not numeric features")
        self.texts = list(texts)

    def __getitem__(self, index: torch.Tensor) -> list[str]:
        return [self.texts[i] for i in index.tolist()]

    def __len__(self) -> int:
        return len(self.texts)


def base_model(training: LoraConfig, num_classes: int, seed: int) -> Any:
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    """The frozen base classifier; its new classification head is initialised from the global
    generator, seeded here."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(training.model), num_labels=num_classes)


class LoraModel:
    def __init__(self, training: LoraConfig, num_classes: int, seed: int, tokenizer: Any,
                 device: str) -> None:
        self.training = training
        self.tokenizer = tokenizer
        self.device = device
        self.model = with_adapter(base_model(training, num_classes, seed), lora_config(training, "SEQ_CLS"))
        self.model.to(device)
        self.optimizer = AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=training.learning_rate, weight_decay=training.weight_decay,
        )

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.training.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _autocast(self) -> Any:
        if self.training.bf16 and self.device.startswith("cuda"):
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_epoch(self, inputs: TextInputs, targets: torch.Tensor, order: torch.Tensor) -> None:
        self.model.train()
        for batch in order.split(self.training.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.model(**self._encode(inputs[batch])).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch].to(self.device))
            loss.backward()
            self.optimizer.step()

    def state(self) -> State:
        return export_state(adapter_tensors(self.model), self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        import_state(lambda t: load_adapter(self.model, t), self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: TextInputs) -> torch.Tensor:
        self.model.eval()
        out = []
        for start in range(0, len(inputs), 64):
            texts = inputs.texts[start:start + 64]
            with self._autocast():
                out.append(torch.softmax(self.model(**self._encode(texts)).logits.float(), -1).cpu())
        return torch.cat(out) if out else torch.empty((0, 0))

    def export_files(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            return {f"{ADAPTER_DIR}/{p.name}": p.read_bytes()
                    for p in sorted(Path(tmp).iterdir()) if p.is_file() and p.name != "README.md"}


class LoraBackend:
    name = "lora"
    encoder = None

    def __init__(self, config: LoraConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            quiet_transformers()
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.config.model))
        return self._tokenizer

    def fingerprint(self) -> str:
        return model_fingerprint(self.config.model)

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> TextInputs:
        return TextInputs([x for x in inputs])  # type: ignore[misc]

    def create(self, seed: int, device: str = "cpu") -> LoraModel:
        return LoraModel(self.config, self.spec.num_classes, seed, self.tokenizer, device)

